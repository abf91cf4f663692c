"""A served teacher under faults: injected errors change nothing, a dead server stops the run cleanly,
kill -9 + resume gives the uninterrupted weights, and bad input exits 2 before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import served_fixtures as sf
from alambic.config import DistillConfig
from alambic.generate.testing.fault_proxy import FaultProxy
from alambic.teachers.served_client import TeacherServerDown
from alambic.training.loop import run_distillation
from helpers import REPO, invoke, write_config


@pytest.fixture
def tiny(served_tiny):
    served_tiny.server.fail_from = None
    return served_tiny


@pytest.fixture(scope="module")
def reference(served_tiny, tmp_path_factory):
    """The fault-free served run (6 steps)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return run_distillation(DistillConfig.model_validate(sf.run_config(served_tiny, out, max_steps=6)), overwrite=True)


def test_injected_faults_give_the_fault_free_weights(tiny, reference, tmp_path):
    rates = {"rate_limit": 0.15, "server_error": 0.15, "truncated": 0.1, "invalid_json": 0.1, "timeout": 0.05}
    proxy = FaultProxy("127.0.0.1", tiny.server.port, rates, retry_after="0.05", hang_s=30, seed=3).start_in_thread()
    try:
        mapping = sf.run_config(tiny, tmp_path / "faulty", max_steps=6)
        mapping["teacher"]["server"] = proxy.base_url
        mapping["teacher"]["served"].update({"timeout_s": 1.0, "retry": {**sf.FAST_RETRY, "max_attempts": 12}})
        faulty = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    finally:
        proxy.stop()
    counts = proxy.counts()
    assert all(counts.get(fault, 0) >= 1 for fault in rates), counts  # every kind of fault happened
    sf.assert_same_run(faulty, reference, atol=0.0)  # the same answers, so bit-identical training


def test_a_server_that_stays_down_stops_the_run_with_its_checkpoint_intact(tiny, reference, tmp_path):
    mapping = sf.run_config(tiny, tmp_path / "run", max_steps=6, save_every=2)
    # Requests: the start-up probe, then 2 per step, sent up to 2 steps ahead: steps 1-3 get answers, step 4 none.
    tiny.server.completion_requests, tiny.server.fail_from = 0, 8
    try:
        with pytest.raises(TeacherServerDown) as stopped:
            run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    finally:
        tiny.server.fail_from = None
    assert stopped.value.exit_code == 3 and "--resume" in str(stopped.value)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"], checkpoints  # nothing half-written next to it
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3] and not (tmp_path / "run" / "final").exists()  # stopped in step 4, before its update
    resumed = run_distillation(DistillConfig.model_validate(mapping), resume=True)
    sf.assert_same_run(resumed, reference, atol=1e-6)


def _wait_for_checkpoint(run_dir, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        checkpoints = run_dir / "checkpoints"
        if checkpoints.exists() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_kill_and_resume_gives_the_uninterrupted_weights(tiny, reference, tmp_path):
    mapping = sf.run_config(tiny, tmp_path / "killed", max_steps=6, save_every=2)
    config = write_config(tmp_path / "kill.yaml", mapping)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ALAMBIC_DEBUG_STEP_SLEEP": "0.3"}
    process = subprocess.Popen([sys.executable, "-m", "alambic.cli", "distill", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path / "killed", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    resumed = run_distillation(DistillConfig.model_validate(mapping))  # same folder: resumes from the checkpoint
    for key, value in sf.weights(reference.output_dir).items():
        torch.testing.assert_close(sf.weights(resumed.output_dir)[key], value, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bad input: exit 2, nothing written


def _expect_exit_2(capsys, tmp_path, mapping, *needles):
    path = write_config(tmp_path / "bad.yaml", mapping)
    code, _, err = invoke(capsys, "distill", path)
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "fix:" in err
    assert not (tmp_path / "run").exists(), "a refused run left a folder behind"


def test_unreachable_server(capsys, tiny, tmp_path):
    mapping = sf.run_config(tiny, tmp_path / "run")
    mapping["teacher"]["server"] = "http://127.0.0.1:9/v1"
    _expect_exit_2(capsys, tmp_path, mapping, "cannot reach the teacher server", "vllm serve")


def test_wrong_model(capsys, tiny, tmp_path):
    mapping = sf.run_config(tiny, tmp_path / "run")
    mapping["teacher"]["server_model"] = "someone-else"
    _expect_exit_2(capsys, tmp_path, mapping, "serves 'tiny-teacher', not teacher.server_model 'someone-else'")


def test_k_above_the_server_limit(capsys, tiny, tmp_path):
    mapping = sf.run_config(tiny, tmp_path / "run")
    mapping["teacher"]["top_k"] = 32
    _expect_exit_2(capsys, tmp_path, mapping, "refused prompt_logprobs=32", "greater than max allowed: 20",
                   "--max-logprobs")


def test_server_without_prompt_logprobs(capsys, tiny, tmp_path):
    from alambic.teachers.testing.logprob_server import LogprobServer, model_scorer

    plain = LogprobServer(model_scorer(tiny.model), sf.NAME, tiny.tokenizer, prompt_logprobs_supported=False)
    plain.start_in_thread()
    try:
        mapping = sf.run_config(tiny, tmp_path / "run")
        mapping["teacher"]["server"] = plain.base_url
        _expect_exit_2(capsys, tmp_path, mapping, "answered without prompt_logprobs")
    finally:
        plain.stop()


def test_server_with_another_tokenizer(capsys, tiny, tmp_path):
    from transformers import AutoTokenizer

    from alambic.teachers.testing.logprob_server import LogprobServer, model_scorer
    from alambic.testing import write_stdlib_corpus

    other = AutoTokenizer.from_pretrained(write_stdlib_corpus(tmp_path / "other", n_train=2, n_heldout=1,
                                                              vocab_size=290, seed=5)["tokenizer"])
    foreign = LogprobServer(model_scorer(tiny.model), sf.NAME, other).start_in_thread()
    try:
        mapping = sf.run_config(tiny, tmp_path / "run")
        mapping["teacher"]["server"] = foreign.base_url
        _expect_exit_2(capsys, tmp_path, mapping, "uses another tokenizer than the student")
    finally:
        foreign.stop()


@pytest.mark.parametrize("section, key, value, needle", [
    ("loss", "temperature", 2.0, "loss.temperature"),
    ("data", "packing", True, "data.packing"),
])
def test_settings_a_served_teacher_cannot_run_with(capsys, tiny, tmp_path, section, key, value, needle):
    mapping = sf.run_config(tiny, tmp_path / "run")
    mapping[section][key] = value
    _expect_exit_2(capsys, tmp_path, mapping, needle)
