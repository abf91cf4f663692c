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

    quiet = run_cli_subprocess("distill", config, f"train.output_dir={tmp_path / 'quiet'}", env={"HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr + quiet.stdout and "Writing model shards" not in quiet.stderr
    assert len(quiet.stdout.splitlines()) <= 3, quiet.stdout  # summary line, (progress), where the student is


def test_validate_prints_one_line_unless_verbose(tmp_path):
    from helpers import REPO

    quiet = run_cli_subprocess("validate", REPO / "configs" / "onpolicy_gkd.yaml")
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 2, quiet.stdout
    assert "rollout on_policy" in quiet.stdout and "valid (DistillConfig)" in quiet.stdout
    verbose = run_cli_subprocess("validate", REPO / "configs" / "onpolicy_gkd.yaml", "--verbose")
    assert "lambda: 0.5" in verbose.stdout and "lambda_" not in verbose.stdout


def test_tiny_setup_ends_with_a_readable_summary(tiny_setup):
    from alambic.testing import describe_tiny_setup

    text = describe_tiny_setup(tiny_setup)
    assert "PosixPath" not in text and "{" not in text
    assert str(tiny_setup["teacher"]) in text and "alambic distill configs/tiny_kd.yaml" in text
