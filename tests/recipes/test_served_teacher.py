"""A served teacher (teacher.server) against a tiny real HF teacher behind the loopback prompt-logprob server.

Equivalence: training against the server equals training with the live teacher
restricted to the same top-k (loss and weights within 1e-5), on the fused and
the plain sparse paths, off- and on-policy; and a cache written from the same
teacher (or streamed from the server) trains to the same weights within its
quantisation error.
"""

from __future__ import annotations

import json

import pytest
import yaml

import served_fixtures as sf
from alambic.config import DistillConfig
from alambic.training.loop import run_distillation


@pytest.fixture
def tiny(served_tiny):
    served_tiny.server.fail_from = None
    return served_tiny


def _run(mapping, **kwargs):
    return run_distillation(DistillConfig.model_validate(mapping), overwrite=True, **kwargs)


@pytest.mark.parametrize("fused", [True, False])
def test_served_equals_live_teacher_restricted_to_top_k(tiny, tmp_path, monkeypatch, fused):
    served = sf.run_config(tiny, tmp_path / "served")
    served["loss"]["fused"] = fused
    served_run = _run(served)
    live = sf.run_config(tiny, tmp_path / "live", {"model": str(tiny.teacher)})
    live["loss"]["fused"] = fused
    monkeypatch.setattr("alambic.training.setup.LiveTeacher", sf.LiveTopK)
    live_run = _run(live)
    sf.assert_same_run(served_run, live_run, atol=1e-5)
    stats = json.loads((tmp_path / "served" / "served_teacher.json").read_text())
    assert stats["calls"] == 4 * 2 and stats["errors_by_kind"] == {}


def test_on_policy_gkd_scored_by_the_server(tiny, tmp_path, monkeypatch):
    """lambda > 0: the student's samples are scored by the server; no teacher weights load in the job."""
    rollout = {"policy": "on_policy", "lambda": 0.5, "max_new_tokens": 8}
    served = sf.run_config(tiny, tmp_path / "served", max_steps=4)
    served["rollout"], served["loss"] = rollout, {"objective": "jsd", "beta": 0.5, "alpha": 0.0}
    import alambic.models

    loaded = []
    original = alambic.models.load_model
    monkeypatch.setattr("alambic.training.setup.load_model", lambda cfg, *a, **k: loaded.append(cfg.model) or original(cfg, *a, **k))
    served_run = _run(served)
    assert loaded == [str(tiny.student)], loaded  # only the student was loaded
    monkeypatch.undo()
    live = sf.run_config(tiny, tmp_path / "live", {"model": str(tiny.teacher)}, max_steps=4)
    live["rollout"], live["loss"] = rollout, served["loss"]
    monkeypatch.setattr("alambic.training.setup.LiveTeacher", sf.LiveTopK)
    sf.assert_same_run(served_run, _run(live), atol=1e-5)


def test_cache_from_the_same_teacher_and_a_streamed_cache_train_alike(tiny, tmp_path):
    from alambic.cache.cli import cache_logits

    streamed = sf.run_config(tiny, tmp_path / "served")
    streamed["teacher"]["served"].update({"stream_cache": str(tmp_path / "stream"), "stream_cache_value_bits": 16,
                                          "stream_cache_shard_rows": 7})
    served_run = _run(streamed)
    stats = json.loads((tmp_path / "served" / "served_teacher.json").read_text())
    assert stats["stream_cache"]["complete"]

    live = sf.run_config(tiny, tmp_path / "unused", {"model": str(tiny.teacher)})
    config_path = tmp_path / "live.yaml"
    config_path.write_text(yaml.safe_dump(live))
    cache_logits(str(config_path), [], sf.TOP_K, str(tmp_path / "cache"), 7, 4, "16", 250, False, False, "cpu", False)
    runs = {folder: _run(sf.run_config(tiny, tmp_path / f"from_{folder}", {"cache": str(tmp_path / folder)}))
            for folder in ("cache", "stream")}
    # Both caches hold the same teacher's top-k at 16 bits: they train to the same weights.
    sf.assert_same_run(runs["cache"], runs["stream"], atol=1e-5)
    # Against the unquantised server signal each log-prob differs by up to |x_min| / 2^17: the losses agree
    # to 5e-5; Adam turns that into weight differences only where a gradient is ~0 (its sign can flip).
    for x, y in zip(served_run.history, runs["cache"].history):
        assert abs(x["loss"] - y["loss"]) <= 5e-5
    for key, value in sf.weights(served_run.output_dir).items():
        difference = (value - sf.weights(runs["cache"].output_dir)[key]).abs()
        assert float(difference.max()) < 1e-3 and float((difference > 5e-5).float().mean()) < 1e-3, key


def test_two_ddp_processes_share_one_server(tiny, tmp_path):
    """Each rank sends its own micro-batches: grad_accum requests of batch_size rows per step, plus one probe."""
    import os
    import subprocess
    import sys

    from helpers import REPO, write_config

    mapping = sf.run_config(tiny, tmp_path / "ddp", batch_size=2)
    config = write_config(tmp_path / "ddp.yaml", mapping)
    digests = tmp_path / "digests"
    digests.mkdir()
    before = len(tiny.server.log)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "tests" / "recipes" / "ddp_worker.py"), str(config), str(digests)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (digests / "rank0.txt").read_text() == (digests / "rank1.txt").read_text()
    rows_per_request = sorted(rows for _, rows, _ in tiny.server.log[before:])
    steps, accum, ranks = 4, 2, 2
    assert rows_per_request == [2] * (ranks * steps * accum + ranks), rows_per_request  # probes hold 2 rows too
    single = _run(sf.run_config(tiny, tmp_path / "single", batch_size=4))
    ddp_losses = [json.loads(line)["loss"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert ddp_losses == pytest.approx([r["loss"] for r in single.history], rel=1e-4)


def test_a_streamed_cache_continues_across_runs_to_the_same_bytes(tiny, tmp_path):
    """Shards finished by a stopped run are kept; the next run completes the folder, byte for byte."""
    def streamed(out, folder, steps, complete):
        mapping = sf.run_config(tiny, tmp_path / out, max_steps=steps)
        mapping["teacher"]["served"].update({"stream_cache": str(tmp_path / folder), "stream_cache_shard_rows": 3,
                                             "complete_stream_cache": complete})
        return _run(mapping)

    streamed("first", "partial", 3, complete=False)
    manifest = json.loads((tmp_path / "partial" / "manifest.json").read_text())
    assert 0 < len(manifest["shards"]) < manifest["num_shards"] and not manifest["complete"]
    streamed("second", "partial", 1, complete=True)
    streamed("whole", "whole", 1, complete=True)
    shards = {folder: {e["file"]: e["sha256"] for e in json.loads((tmp_path / folder / "manifest.json").read_text())["shards"]}
              for folder in ("partial", "whole")}
    assert shards["partial"] == shards["whole"] and json.loads((tmp_path / "partial" / "manifest.json").read_text())["complete"]
