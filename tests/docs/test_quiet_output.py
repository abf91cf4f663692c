"""Quiet by default, detail with --verbose (issue 16, item 11), checked in fresh processes as a user runs them."""

from __future__ import annotations

import re

from helpers import kd_config, run_cli_subprocess, write_config


def test_verbose_restores_progress_bars_and_full_config(tiny_setup, tmp_path):
    config = write_config(tmp_path / "kd.yaml", kd_config(tiny_setup, tmp_path / "run", max_steps=1))
    # (the test session itself turns hub progress bars off; a user's shell does not)
    verbose = run_cli_subprocess("--verbose", "distill", config, "rollout.lambda=0", env={"HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    assert verbose.returncode == 0, verbose.stderr
    assert "objective: forward_kl" in verbose.stdout and re.search(r"^  lambda: 0", verbose.stdout, re.M)
    assert "lambda_" not in verbose.stdout  # keys printed as they are written in configs
    assert "Loading weights" in verbose.stderr + verbose.stdout

    # The quiet default (no bars even where the environment asks for them) is checked by
    # tests/recipes/test_distill_e2e.py on its main run.


def test_validate_prints_one_line_unless_verbose(capsys, monkeypatch):
    from helpers import REPO, invoke

    monkeypatch.setenv("ALAMBIC_VERBOSE", "0")  # restored after the test: --verbose below sets it

    code, out, _ = invoke(capsys, "validate", REPO / "configs" / "onpolicy_gkd.yaml")
    assert code == 0 and "rollout on_policy" in out and "valid (DistillConfig)" in out
    assert "lambda" not in out  # one summary line, not the config
    code, out, _ = invoke(capsys, "validate", REPO / "configs" / "onpolicy_gkd.yaml", "--verbose")
    assert code == 0 and "lambda: 0.5" in out and "lambda_" not in out


def test_tiny_setup_ends_with_a_readable_summary(tiny_setup):
    from alambic.testing import describe_tiny_setup

    text = describe_tiny_setup(tiny_setup)
    assert "PosixPath" not in text and "{" not in text
    assert str(tiny_setup["teacher"]) in text and "alambic distill configs/tiny_kd.yaml" in text
