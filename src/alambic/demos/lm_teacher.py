"""Train the LM demo's teacher once, seeded, and ship it (safetensors, < 20 MB) with the package.

A teacher worth distilling is trained well past what the student gets at its
budget; that takes ~20 minutes on 2 CPU cores, too long for every demo run, so
this script trains it once and `alambic demo --task lm` loads the result from
`alambic/assets/lm_teacher`. The manifest next to the weights records the
command, the seed, the Python version and, by path, which standard-library
modules the teacher trained on and which it never saw: the demo draws its
validation and held-out modules only from the unseen ones, on any interpreter.

    python -m alambic.demos.lm_teacher                      # writes src/alambic/assets/lm_teacher
    python -m alambic.demos.lm_teacher --steps 50 --out /tmp/t   # a smoke run

A killed run continues from its last checkpoint when started again (same command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from alambic.demos.lm_assets import MANIFEST, SHIPPED, read_modules, stdlib_split

def train_teacher(out: Path, steps: int, seed: int, lr: float, work: Path) -> dict:
    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.demos.bbc import write_jsonl
    from alambic.demos.demo_stages import train
    from alambic.demos.lm_demo import LMDemoConfig, build_llama, lm_train_config
    from alambic.durable import atomic_dir
    from alambic.training.loop import run_distillation

    config = LMDemoConfig(seed=seed, teacher_steps=steps, teacher_lr=lr, warmup_steps=100, eval_every=250)
    split = stdlib_split(seed)
    texts = {name: read_modules(paths) for name, paths in split.items() if name != "heldout"}
    data = {name: write_jsonl([{"text": t} for t in rows], work / "data" / f"{name}.jsonl") for name, rows in texts.items()}
    tokenizer = build_tokenizer(texts["train"], vocab_size=config.vocab_size)
    init = work / "teacher_init"
    if not (init / "config.json").exists():
        build_llama(config, config.teacher, tokenizer, init, seed)
    distill = lm_train_config(config, data, init, work / "teacher", None, steps, lr)
    distill.train.save_every = 250  # resumable: the loop continues from the last checkpoint
    run = run_distillation(distill)
    final = run.output_dir / "final"
    with atomic_dir(out) as staging:
        shutil.copytree(final, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.md", "training_args*", "alambic_*"))
        weights = (staging / "model.safetensors").read_bytes()
        manifest = {
            "command": "python -m alambic.demos.lm_teacher " + " ".join(sys.argv[1:]),
            "python": sys.version.split()[0], "seed": seed, "steps": steps, "lr": lr,
            "batch_size": config.batch_size, "max_length": config.max_length, "vocab_size": config.vocab_size,
            "size": config.teacher.model_dump(), "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "final_eval": {k: v for k, v in run.history[-1].items() if k.startswith("eval_")} if run.history else {},
            "modules": split,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SHIPPED))
    parser.add_argument("--work", default="runs/lm-teacher", help="checkpoints and data while training")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    manifest = train_teacher(Path(args.out), args.steps, args.seed, args.lr, Path(args.work))
    print(json.dumps({k: manifest[k] for k in ("command", "steps", "final_eval", "weights_sha256")}, indent=1))


if __name__ == "__main__":
    main()
