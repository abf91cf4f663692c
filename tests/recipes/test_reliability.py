"""Crash safety and numerical safety of `alambic distill`.

- a non-finite loss stops the run (exit 3), keeps the last good checkpoint, exports nothing;
  a transient one is skipped when train.nonfinite_skips allows it;
- a damaged newest checkpoint is named and skipped, and the resumed run ends with exactly the
  weights of an uninterrupted one;
- a run killed after its last checkpoint but before its export re-exports with real metrics;
- stale temporaries of a killed run are removed on start;
- two runs on one folder: the second exits 2 naming the first, which finishes untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, invoke, kd_config, write_config


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _weights(folder).values() if t.is_floating_point())


def _distill(capsys, tmp_path, name, mapping, *extra):
    """Runs in-process; stderr comes back with spaces removed (the console wraps long lines mid-word)."""
    code, out, err = invoke(capsys, "distill", write_config(tmp_path / f"{name}.yaml", mapping), *extra)
    return code, out, err.replace(" ", "")


# ----------------------------------------------------------------------------- non-finite guard


def test_exploding_run_stops_with_exit_3_and_exports_nothing(capsys, tmp_path, tiny_setup):
    # lr 1e30 is finite, so the config accepts it; the first step moves weights to ~1e30 and the
    # second step's loss is not finite.
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=6, save_every=1, lr=1e30, max_grad_norm=None)
    config["train"]["eval_batches"] = 1
    code, _, err = _distill(capsys, tmp_path, "nan", config)
    assert code == 3, err
    assert "non-finite" in err and "step-000001" in err and "nomodelwasexported" in err
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert not (run / "final").exists()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000001"]
    assert _all_finite(checkpoints[0])


def test_exploding_run_skips_up_to_k_steps_then_stops(capsys, tmp_path, tiny_setup):
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=8, lr=1e30, max_grad_norm=1.0, nonfinite_skips=2)
    code, _, err = _distill(capsys, tmp_path, "skips", config)
    assert code == 3, err
    assert err.count("skipped:non-finite") == 2 and "afterskipping2step(s)" in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_transient_nan_step_is_skipped_and_the_export_is_finite(capsys, tmp_path, tiny_setup, monkeypatch):
    import alambic.training.loop as loop

    real, calls = loop.loss_sums, {"n": 0}

    def nan_on_third_call(*args, **kwargs):
        sums = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            sums["loss"] = sums["loss"] * float("nan")
        return sums

    monkeypatch.setattr(loop, "loss_sums", nan_on_third_call)
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=5, nonfinite_skips=1)
    code, _, err = _distill(capsys, tmp_path, "transient", config)
    assert code == 0, err
    assert "step3skipped" in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 5]
    assert _all_finite(tmp_path / "run" / "final")


def test_non_finite_weights_are_never_exported(tmp_path, tiny_setup):
    from alambic.models.module import StudentModule
    from alambic.models import load_model
    from alambic.config import ModelConfig
    from alambic.training.finite import NonFiniteError, check_finite_weights

    model = load_model(ModelConfig(model=str(tiny_setup["student_init"])), "causal_lm", role="student")
    check_finite_weights(model, "test")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="not finite"):
        check_finite_weights(StudentModule(model, None), "final export")


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 2, 4, 6."""
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    folder = tmp_path_factory.mktemp("reference")
    mapping = kd_config(tiny_setup, folder / "run", max_steps=6, save_every=2, keep_last=3)
    run_distillation(DistillConfig.model_validate(mapping))
    return mapping, folder / "run"


def _damage(checkpoint: Path, kind: str) -> None:
    if kind == "truncated-weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif kind == "truncated-optimizer":
        data = (checkpoint / "optimizer.pt").read_bytes()
        (checkpoint / "optimizer.pt").write_bytes(data[:100])
    elif kind == "flipped-byte":
        data = bytearray((checkpoint / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (checkpoint / "model.safetensors").write_bytes(bytes(data))
    else:  # invalid state.json
        (checkpoint / "state.json").write_text("{not json")


@pytest.mark.parametrize("kind", ["truncated-weights", "truncated-optimizer", "flipped-byte", "invalid-state"])
def test_damaged_newest_checkpoint_falls_back_and_matches_an_uninterrupted_run(
    capsys, tmp_path, reference_run, kind
):
    import shutil

    mapping, reference = reference_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")  # the run "was killed" after its last checkpoint
    _damage(run / "checkpoints" / "step-000006", kind)
    mapping = {**mapping, "train": {**mapping["train"], "output_dir": str(run)}}
    code, out, err = _distill(capsys, tmp_path, "resume", mapping, "--resume")
    assert code == 0, err
    assert "step-000006isdamaged" in err and "resumingfromstep-000004" in err
    assert "(step 4)" in out
    resumed, uninterrupted = _weights(run / "final"), _weights(reference / "final")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_every_checkpoint_damaged_is_a_clear_error(capsys, tmp_path, reference_run):
    import shutil

    mapping, reference = reference_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for checkpoint in (run / "checkpoints").iterdir():
        _damage(checkpoint, "invalid-state")
    mapping = {**mapping, "train": {**mapping["train"], "output_dir": str(run)}}
    code, _, err = _distill(capsys, tmp_path, "all_bad", mapping, "--resume")
    assert code == 2 and "everycheckpoint" in err and "--overwrite" in err


def test_kill_before_export_reexports_with_metrics_and_cleans_temporaries(capsys, tmp_path, reference_run):
    """A kill during the final export leaves temporaries and no final/: the rerun cleans them and
    exports model, metrics and card together, with the real held-out metrics."""
    import shutil

    mapping, reference = reference_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    stale = [run / ".final.tmp-999-abcdef12", run / ".tmp-final-999", run / "checkpoints" / ".step-000008.tmp-999-x",
             run / ".metrics.jsonl.tmp-999-y"]
    for path in stale[:-1]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    stale[-1].write_text("partial")
    mapping = {**mapping, "train": {**mapping["train"], "output_dir": str(run)}}
    code, _, err = _distill(capsys, tmp_path, "rerun", mapping, "--resume")
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    metrics = json.loads((run / "final" / "final_metrics.json").read_text())
    assert metrics == json.loads((reference / "final" / "final_metrics.json").read_text())
    assert "eval_ce" in metrics and "(no eval set)" not in (run / "final" / "README.md").read_text()


def test_stale_cleanup_restores_an_old_version_killed_between_renames(tmp_path):
    from alambic.training.run_lock import remove_stale_temporaries

    (tmp_path / ".final.old-1-aaaa").mkdir()  # killed after moving final aside, before the new one went in
    (tmp_path / ".final.tmp-1-bbbb").mkdir()
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-000002.old-1-cccc").mkdir()  # the new one is in: the old goes
    (tmp_path / "keep.txt").write_text("user file")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".final.tmp-1-bbbb", ".step-000002.old-1-cccc"]
    assert (tmp_path / "final").is_dir() and (tmp_path / "keep.txt").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


# ----------------------------------------------------------------------------- one run per folder


def test_second_run_on_a_live_folder_exits_2_and_the_first_finishes_untouched(capsys, tmp_path, tiny_setup):
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=6, save_every=2, keep_last=1)
    path = write_config(tmp_path / "live.yaml", config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALAMBIC_DEBUG_STEP_SLEEP": "0.5",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "alambic.cli", "distill", str(path)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        for extra in ((), ("--overwrite",), ("--resume",)):
            code, _, err = invoke(capsys, "distill", path, *extra)
            assert code == 2, err
            assert "inusebyanotheralambicrun" in err.replace(" ", "") and f"pid{first.pid}" in err.replace(" ", "")
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    # Once the first has finished (or died), the folder is free again.
    code, _, err = invoke(capsys, "distill", path, "--overwrite")
    assert code == 0, err


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    from alambic.errors import ConfigError
    from alambic.folder_lock import FolderLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from alambic.folder_lock import FolderLock;"
         "held = FolderLock(sys.argv[2], 'lock', 'busy', 'wait').acquire(); print('held', flush=True); time.sleep(60)",
         str(REPO / "src"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            FolderLock(tmp_path, "lock", "busy", "wait").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path, "lock", "busy", "wait").acquire()  # kill -9 released it
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()


# ----------------------------------------------------------------------------- check first, write after


@pytest.mark.parametrize("bad_label", [-1, 7])
def test_class_ids_outside_the_head_are_refused_before_writing(capsys, tmp_path, bad_label):
    from modes_micro import build_micro, classifier_config

    micro = build_micro(tmp_path / "micro")
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": [bad_label, 0, 1][i % 3]}) + "\n"
                            for i in range(6)))
    config = classifier_config(micro, tmp_path / "run", loss={"objective": "forward_kl", "alpha": 0.5})
    config["data"]["train"] = str(data)
    code, _, err = _distill(capsys, tmp_path, "labels", config)
    assert code == 2 and f"classid{bad_label}" in err and "ids0..2" in err, err
    assert not (tmp_path / "run").exists()


def test_a_corrupted_logit_cache_is_found_before_the_run_folder_is_written(capsys, tmp_path, tiny_setup):
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=2)
    config["data"]["eval"] = None
    path = write_config(tmp_path / "cache.yaml", config)
    code, _, err = invoke(capsys, "cache-logits", path, "--k", "4", "--out", tmp_path / "cache", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    shard = tmp_path / "cache" / manifest["shards"][-1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    code, _, err = invoke(capsys, "distill", path, "teacher.model=null", f"teacher.cache={tmp_path / 'cache'}")
    assert code == 2 and "corrupted" in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_that_stopped_before_its_first_step_does_not_block_the_corrected_rerun(capsys, tmp_path, tiny_setup):
    config = kd_config(tiny_setup, tmp_path / "run", max_steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(write_config(tmp_path / "old.yaml", {
        **config, "loss": {**config["loss"], "temperature": 3.0}}).read_text())
    code, _, err = _distill(capsys, tmp_path, "corrected", config)
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()
    # A folder holding a user's own config.yaml (not a run) is never taken over.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my: settings\n")
    config["train"]["output_dir"] = str(tmp_path / "mine")
    code, _, err = _distill(capsys, tmp_path, "mine", config)
    assert code == 2 and "differentrun" in err, err
    assert (tmp_path / "mine" / "config.yaml").read_text() == "my: settings\n"
