"""DDP on CPU: 2 processes under `accelerate launch` match 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from alambic.config import DistillConfig
from alambic.training.loop import run_distillation
from helpers import REPO, kd_config, write_config


def test_two_process_cpu_ddp_matches_single_process(tiny_setup, tmp_path):
    two = kd_config(tiny_setup, tmp_path / "ddp", max_steps=6, batch_size=2, eval_every=0)
    two["loss"]["alpha"] = 0.5
    config = write_config(tmp_path / "ddp.yaml", two)
    digests = tmp_path / "digests"
    digests.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "recipes" / "ddp_worker.py"), str(config), str(digests),
    ]
    result = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (digests / "rank0.txt").read_text(), (digests / "rank1.txt").read_text()
    assert rank0 == rank1, "ranks ended with different weights"

    one = kd_config(tiny_setup, tmp_path / "single", max_steps=6, batch_size=4, eval_every=0)
    one["loss"]["alpha"] = 0.5
    single = run_distillation(DistillConfig.model_validate(one))
    ddp_history = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_history) == len(single.history) == 6
    for ddp_record, single_record in zip(ddp_history, single.history):
        assert ddp_record["loss"] == pytest.approx(single_record["loss"], rel=1e-4)
        assert ddp_record["kd"] == pytest.approx(single_record["kd"], rel=1e-4)
