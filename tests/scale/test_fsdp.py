"""train.strategy=fsdp on 2 CPU processes (gloo, torchrun) against the plain 1-process run.

One uninterrupted 2-process FSDP run (6 steps, a checkpoint every 2) is the
reference for: equality with 1 process at the same global batch, what each
process holds, `final/`, kill -9 + resume, and resuming on 1 <-> 2 processes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alambic.config import DistillConfig
from alambic.training.loop import run_distillation
from helpers import REPO, kd_config, write_config

WORKER = REPO / "tests" / "scale" / "fsdp_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _mapping(setup, output_dir, batch_size=2):
    mapping = kd_config(setup, output_dir, max_steps=6, batch_size=batch_size, eval_every=0, save_every=2, keep_last=3)
    mapping["loss"]["alpha"] = 0.5  # KD + CE: the fused path with a sharded teacher and student head
    mapping["train"]["strategy"] = "fsdp"
    return mapping


def _torchrun(config: Path, report: Path, extra_env=None, wait=True, resume=False, accelerate=False):
    report.mkdir(exist_ok=True)
    launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if accelerate:  # the documented other launcher: a plain multi-process Accelerate launch
        launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, "-m", *launcher, str(WORKER), str(config), str(report), *(["--resume"] if resume else [])]
    env = {**ENV, **(extra_env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _history(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _assert_same_weights(actual: dict, expected: dict, tol=1e-5):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=tol, rtol=tol, msg=key)


@pytest.fixture(scope="module")
def fsdp_run(tiny_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mapping = _mapping(tiny_setup, folder / "run")
    config = write_config(folder / "fsdp.yaml", mapping)
    _torchrun(config, folder / "report")
    return {"folder": folder, "mapping": mapping, "run": folder / "run", "report": folder / "report"}


def test_fsdp_two_processes_equal_one_process_at_same_global_batch(fsdp_run, tiny_setup, tmp_path):
    single = _mapping(tiny_setup, tmp_path / "single", batch_size=4)
    single["train"]["strategy"] = "ddp"  # the plain path: no process group, no sharding
    single_run = run_distillation(DistillConfig.model_validate(single))
    fsdp_history = _history(fsdp_run["run"])
    assert [r["step"] for r in fsdp_history] == list(range(1, 7))
    for sharded, plain in zip(fsdp_history, single_run.history):
        for key in ("loss", "kd", "ce"):
            assert sharded[key] == pytest.approx(plain[key], rel=1e-5), (sharded["step"], key)
    _assert_same_weights(_final(fsdp_run["run"]), _final(single_run.output_dir))


def test_each_process_holds_half_of_student_and_teacher(fsdp_run):
    reports = [json.loads((fsdp_run["report"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        # Measured from the local shards; embedding and head are sharded too (their rows split in two).
        assert 0.45 <= report["student_local"] / report["student_full"] <= 0.55, report
        assert 0.45 <= report["teacher_local"] / report["teacher_full"] <= 0.55, report
        assert report["embedding_local_rows"] * 2 >= report["head_local_rows"] > 0
    vocab_rows = sum(r["head_local_rows"] for r in reports)
    assert vocab_rows == load_file(str(fsdp_run["run"] / "final" / "model.safetensors"))["lm_head.weight"].shape[0]


def test_final_is_one_hf_folder_equal_to_the_trained_model(fsdp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = fsdp_run["run"] / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert (final / "README.md").exists() and AutoTokenizer.from_pretrained(final) is not None
    model = AutoModelForCausalLM.from_pretrained(final)
    trained = load_file(str(fsdp_run["report"] / "trained.safetensors"))  # gathered from the live shards
    loaded = {f"model.{k}": v for k, v in model.state_dict().items()}
    _assert_same_weights(loaded, trained, tol=0)


def _wait_for(path: Path, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (path / "state.json").exists():
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path.name}: {process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun starts each rank in a session of its own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_9_tree(process, timeout=60) -> None:
    """kill -9 the launcher and every rank, and wait until all are gone (only then is the run lock free)."""
    pids = [process.pid, *_descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.time() + timeout
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        if time.time() > deadline:
            raise AssertionError(f"processes {pids} still alive {timeout} s after kill -9")
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_kill_9_then_resume_equals_uninterrupted_run(fsdp_run, tmp_path):
    mapping = {**fsdp_run["mapping"], "train": {**fsdp_run["mapping"]["train"], "output_dir": str(tmp_path / "killed")}}
    config = write_config(tmp_path / "killed.yaml", mapping)
    process = _torchrun(config, tmp_path / "report1", {"ALAMBIC_DEBUG_STEP_SLEEP": "0.5"}, wait=False)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step-000002", process)
    _kill_9_tree(process)  # kill -9 of every process of the run (launcher and ranks), mid-training
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    # A torn checkpoint (killed while writing) is ignored and replaced.
    torn = tmp_path / "killed" / "checkpoints" / ".tmp-step-000004"
    torn.mkdir(exist_ok=True)
    (torn / "__0_0.distcp").write_bytes(b"torn")
    _torchrun(config, tmp_path / "report2")
    _assert_same_weights(_final(tmp_path / "killed"), _final(fsdp_run["run"]))
    assert [r["step"] for r in _history(tmp_path / "killed")] == list(range(1, 7))


def _copy_at(run: Path, step: int, into: Path) -> Path:
    """A copy of `run` as it was after checkpoint `step` (later checkpoints, final/ removed)."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "final")
    for checkpoint in (into / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    config = (into / "config.yaml").read_text().replace(str(run), str(into))
    (into / "config.yaml").write_text(config)
    return into


def test_resume_two_to_one_and_one_to_two_processes(fsdp_run, tmp_path):
    # 2 -> 1: the checkpoint at step 2 written by 2 processes, continued by 1 (a 1-process group).
    one = _copy_at(fsdp_run["run"], 2, tmp_path / "one")
    mapping = {**fsdp_run["mapping"], "train": {**fsdp_run["mapping"]["train"], "output_dir": str(one), "batch_size": 4}}
    resumed = run_distillation(DistillConfig.model_validate(mapping), resume=True)
    _assert_same_weights(_final(resumed.output_dir), _final(fsdp_run["run"]))
    state = json.loads((one / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 1
    # 1 -> 2: the checkpoint at step 4 written by that 1 process, continued by 2.
    two = _copy_at(one, 4, tmp_path / "two")
    mapping = {**fsdp_run["mapping"], "train": {**fsdp_run["mapping"]["train"], "output_dir": str(two)}}
    mapping["train"]["fsdp"] = {"shard_teacher": False}  # and a replicated teacher, copied from the main process
    config = write_config(tmp_path / "two.yaml", mapping)
    _torchrun(config, tmp_path / "report", resume=True, accelerate=True)  # --resume: batch_size went back from 4 to 2
    _assert_same_weights(_final(two), _final(fsdp_run["run"]))
    report = json.loads((tmp_path / "report" / "rank1.json").read_text())
    # sharded under accelerate launch too
    assert report["world_size"] == 2 and report["student_local"] * 2 == report["student_full"]
    assert report["teacher_local"] == report["teacher_full"] > 0


def test_a_damaged_shard_is_found_and_an_older_checkpoint_resumes(fsdp_run, tmp_path, capsys):
    run = _copy_at(fsdp_run["run"], 4, tmp_path / "damaged")
    newest = run / "checkpoints" / "step-000004"
    assert set(json.loads((newest / "checksums.json").read_text())) >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged
    shard.write_bytes(bytes(data))
    mapping = {**fsdp_run["mapping"], "train": {**fsdp_run["mapping"]["train"], "output_dir": str(run), "batch_size": 4}}
    resumed = run_distillation(DistillConfig.model_validate(mapping), resume=True)
    assert "step-000004 is damaged" in capsys.readouterr().err  # named, then step 2 is used
    _assert_same_weights(_final(resumed.output_dir), _final(fsdp_run["run"]))
    assert [r["step"] for r in _history(run)][-4:] == [3, 4, 5, 6]


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_fsdp_or_deepspeed_plugins_are_refused(variable, tiny_setup, tmp_path, monkeypatch):
    from alambic.errors import ConfigError

    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match="train.strategy"):
        run_distillation(DistillConfig.model_validate(_mapping(tiny_setup, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def _cache(setup, tmp_path) -> Path:
    from alambic.cache.cli import cache_logits

    config = write_config(tmp_path / "cache.yaml", kd_config(setup, tmp_path / "unused"))
    cache_logits(str(config), [], 16, str(tmp_path / "cache"), 64, 8, "auto", 250, False, False, "cpu", False)
    return tmp_path / "cache"


@pytest.mark.parametrize("path", ["sft", "plain_logits", "top_k", "cache", "activation_checkpointing"])
def test_each_loss_path_under_fsdp_equals_the_plain_path(path, tiny_setup, tmp_path):
    """One process in a 1-process group: the same FSDP wrapping (DTensor parameters, gathered heads)."""
    mapping = kd_config(tiny_setup, tmp_path / "plain", max_steps=3, batch_size=4, eval_every=0)
    mapping["loss"]["alpha"] = 0.5
    if path == "sft":
        mapping["teacher"], mapping["loss"]["alpha"] = None, 1.0
    elif path == "plain_logits":
        mapping["loss"]["fused"] = False
    elif path == "top_k":
        mapping["loss"]["top_k"] = 8
    elif path == "cache":
        mapping["teacher"] = {"cache": str(_cache(tiny_setup, tmp_path))}
    plain = run_distillation(DistillConfig.model_validate(mapping))
    mapping["train"] = {**mapping["train"], "strategy": "fsdp", "output_dir": str(tmp_path / "fsdp")}
    if path == "activation_checkpointing":  # recomputed layers give the same values
        mapping["train"]["fsdp"] = {"activation_checkpointing": True}
    sharded = run_distillation(DistillConfig.model_validate(mapping))
    for a, b in zip(sharded.history, plain.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    _assert_same_weights(_final(sharded.output_dir), _final(plain.output_dir))


def test_a_checkpoint_of_the_other_strategy_is_refused(tiny_setup, tmp_path):
    from alambic.errors import ConfigError

    mapping = kd_config(tiny_setup, tmp_path / "run", max_steps=2, batch_size=4, eval_every=0, save_every=1)
    mapping["train"]["strategy"] = "ddp"
    run_distillation(DistillConfig.model_validate(mapping))
    (tmp_path / "run" / "final").rename(tmp_path / "final-ddp")
    mapping["train"]["strategy"] = "fsdp"
    with pytest.raises(ConfigError, match="train.strategy=ddp"):
        run_distillation(DistillConfig.model_validate(mapping), resume=True)
    assert not torch.distributed.is_initialized()
