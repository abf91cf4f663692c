"""Helpers for tests that run the CLI or build configs."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli_subprocess(*args, env=None, timeout=600, cwd=None):
    """Run `alambic ...` in a subprocess; returns CompletedProcess with text output.

    (In this process instead: `invoke`.) Passive OpenMP waiting: on a shared
    CPU, spinning threads slow every process down.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "160"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "alambic.cli", *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO,
    )


def write_config(path, mapping) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def kd_config(setup, output_dir, **train):
    """A distillation config on the tiny setup (teacher -> 1-layer student)."""
    return {
        "teacher": {"model": str(setup["teacher"])},
        "student": {"model": str(setup["student_init"])},
        "data": {"train": str(setup["train"]), "eval": str(setup["eval"]), "max_length": 96},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.0},
        "train": {"output_dir": str(output_dir), "max_steps": 10, "batch_size": 8, "lr": 3e-3,
                  "progress": False, "cpu": True, "eval_batches": 4, **train},
    }


def invoke(capsys, *args):
    """Run the CLI in this process; returns (exit code, stdout, stderr with whitespace collapsed)."""
    from alambic.cli import main

    old_argv = sys.argv
    sys.argv = ["alambic", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def expect_exit_2(capsys, tmp_path, mapping, *needles, command="distill", extra=(), fix=False):
    """Run `alambic COMMAND CONFIG` in this process on `mapping`: exit code 2, every needle in stderr,
    (with fix=True) a "fix:" hint, and no run folder `tmp_path / "run"` left behind. Returns stderr."""
    code, _, err = invoke(capsys, command, write_config(tmp_path / "c.yaml", mapping), *extra)
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    if fix:
        assert "fix:" in err, err
    assert not (tmp_path / "run").exists(), "a failed run left a folder behind"
    return err


def largest_tensor_recorder(dtype=None):
    """A TorchDispatchMode recording the largest numel of any tensor (of `dtype`, if given) an op produces.

    Used as `with largest_tensor_recorder() as recorder: ...; recorder.largest` to show a
    loss never materialises a full [tokens, vocab] tensor.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for value in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(value, torch.Tensor) and (dtype is None or value.dtype == dtype):
                    self.largest = max(self.largest, value.numel())
            return result

    return LargestTensor()
