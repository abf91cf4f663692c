"""The loop's arithmetic: accumulation invariance and exact resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from alambic.config import DistillConfig
from alambic.training.loop import run_distillation
from helpers import REPO, kd_config, write_config


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_grad_accumulation_invariance(tiny_setup, tmp_path):
    """batch 8 x accumulation 1 and batch 1 x accumulation 8 reach the same weights.

    Tolerance: 2e-5 absolute. The loss is normalised by the loss tokens of the
    whole optimiser step, so only float summation order (and padding inside the
    batch of 8) differs between the two runs.
    """
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("accum", 1, 8)):
        mapping = kd_config(tiny_setup, tmp_path / name, max_steps=4, batch_size=batch, grad_accum=accum)
        mapping["loss"].update({"objective": "jsd", "alpha": 0.5})
        mapping["train"]["max_grad_norm"] = None
        runs[name] = _weights(run_distillation(DistillConfig.model_validate(mapping), overwrite=True).output_dir)
    init = load_file(str(tiny_setup["student_init"] / "model.safetensors"))
    moved = False
    for key, value in runs["big"].items():
        torch.testing.assert_close(value, runs["accum"][key], atol=2e-5, rtol=0)
        moved |= not torch.allclose(value, init[key])
    assert moved, "training did not change the weights"


def _wait_for_checkpoint(run_dir, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        checkpoints = run_dir / "checkpoints"
        if checkpoints.exists() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_kill_matches_uninterrupted_run(tiny_setup, tmp_path):
    mapping = kd_config(tiny_setup, tmp_path / "reference", max_steps=8, save_every=2, eval_every=0)
    reference = _weights(run_distillation(DistillConfig.model_validate(mapping), overwrite=True).output_dir)

    killed_dir = tmp_path / "killed"
    mapping["train"]["output_dir"] = str(killed_dir)
    config = write_config(tmp_path / "kill.yaml", mapping)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ALAMBIC_DEBUG_STEP_SLEEP": "0.3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "alambic.cli", "distill", str(config)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    _wait_for_checkpoint(killed_dir, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"
    # Same config, same folder: resumes automatically from the last complete checkpoint.
    resumed = run_distillation(DistillConfig.model_validate(mapping))
    for key, value in reference.items():
        torch.testing.assert_close(_weights(resumed.output_dir)[key], value, atol=1e-6, rtol=0)
    steps = [r["step"] for r in resumed.history]
    assert steps == list(range(1, 9)), steps  # no step logged twice after the resume
