"""Run under `accelerate launch`: train from a config, then write this rank's weight digest."""

import hashlib
import sys
from pathlib import Path

from accelerate import PartialState

from alambic.config import load_config
from alambic.training.loop import run_distillation


def main(config_path: str, digest_dir: str) -> None:
    result = run_distillation(load_config(config_path))
    digest = hashlib.sha256()
    state = result.student.state_dict()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    Path(digest_dir, f"rank{PartialState().process_index}.txt").write_text(digest.hexdigest())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
