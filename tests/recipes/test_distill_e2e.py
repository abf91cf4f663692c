"""End to end: a teacher trained on real text is distilled into a smaller student."""

import json

from helpers import kd_config, run_cli_subprocess, write_config


def test_distill_cli_halves_heldout_kl_and_exports_student(tiny_setup, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "kd.yaml", kd_config(tiny_setup, out, max_steps=60, eval_every=60, lr=5e-3))
    # Held-out KL of the untrained student, measured by the same code path with 0 lr.
    before = run_cli_subprocess("distill", config, "train.max_steps=1", "train.lr=1e-12", f"train.output_dir={tmp_path / 'before'}")
    assert before.returncode == 0, before.stderr
    kl_before = json.loads((tmp_path / "before" / "final" / "final_metrics.json").read_text())["eval_kl"]

    result = run_cli_subprocess("distill", config, env={"HF_HUB_DISABLE_PROGRESS_BARS": "0"})  # quiet anyway
    assert result.returncode == 0, result.stderr
    # Quiet by default: the resolved config as one line, no library progress bars (--verbose: tests/docs).
    assert "forward_kl T=1 alpha=0 | 60 steps x 8" in result.stdout and "objective:" not in result.stdout
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    final = out / "final"
    metrics = json.loads((final / "final_metrics.json").read_text())
    assert metrics["eval_kl"] <= 0.5 * kl_before, (kl_before, metrics["eval_kl"])
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    card = (final / "README.md").read_text()
    assert str(tiny_setup["teacher"]) in card and "forward_kl" in card and "eval_kl" in card
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 61))
    assert history[-1]["loss"] < history[0]["loss"]
