"""Against a real server: `transformers serve` with a tiny local model on 127.0.0.1, through the openai client.

- plain collection with provenance;
- a fault-injecting proxy (429 + Retry-After, 500, timeouts, truncated and invalid JSON):
  the run completes, every record once, the error counts match what was injected;
- kill -9 at random points, several times: no prompt whose answer was stored is ever
  requested again, and the final output holds every record exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter

import pytest
from generate_child import run_generate
from helpers_generate import read_jsonl, invoke_cli, summary_of, write_jsonl

from alambic.generate.cache import RECORDS_FILE
from alambic.generate.testing.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow  # a real server process: ~10 s to start on two cores

WORDS = "the a good bad movie film plot actor cat dog sat on mat great awful fine".split()


def prompts(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(5))} for i in range(count)]


def real_config(config_from, tmp_path, server_url: str, model: str, inputs, **teacher):
    return config_from(
        "generate_answer.yaml",
        teacher={"base_url": server_url, "model": model, "max_in_flight": 4, **teacher},
        sampling={"temperature": 0.0, "max_tokens": 6, "logprobs": False, "top_logprobs": 0, "seed": None},
        input={"path": str(inputs)}, prompt={"system": None}, filters={"dedupe": False, "min_chars": 0},
    )


def test_collects_answers_from_transformers_serve(transformers_server, config_from, tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    model = str(transformers_server.model_dir)
    config = real_config(config_from, tmp_path, transformers_server.base_url, model, inputs)
    assert invoke_cli("generate", config) == 0
    rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    assert [r["id"] for r in rows] == list(range(6)) and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["served_model"] == model and row["finish_reason"] in ("stop", "length")
        assert row["usage"]["prompt_tokens"] > 5 and 0 < row["usage"]["completion_tokens"] <= 6
    assert len(read_jsonl(tmp_path / "run" / "train.jsonl")) == 6


def test_fault_proxy_run_completes_with_every_record_once(transformers_server, config_from, tmp_path):
    rates = {"rate_limit": 0.06, "server_error": 0.06, "timeout": 0.05, "truncated": 0.06, "invalid_json": 0.06}
    # Seed 17 draws every kind of fault within the first 30 requests.
    proxy = FaultProxy("127.0.0.1", transformers_server.port, rates, retry_after="0.3", hang_s=20, seed=17)
    proxy.start_in_thread()
    try:
        inputs = write_jsonl(tmp_path / "in.jsonl", prompts(30, seed=1))
        config = real_config(config_from, tmp_path, proxy.base_url, str(transformers_server.model_dir), inputs,
                             timeout_s=2.0, retry={"max_attempts": 12, "base_delay_s": 0.02, "max_delay_s": 0.2})
        assert invoke_cli("generate", config) == 0
    finally:
        proxy.stop()
    injected = proxy.counts()
    assert all(injected.get(fault, 0) >= 1 for fault in rates), injected  # every kind of fault happened
    rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    assert sorted(r["id"] for r in rows) == list(range(30)) and all(r["status"] == "ok" for r in rows)
    errors = summary_of(tmp_path / "run")["requests"]["errors_by_kind"]
    # A slow answer on a loaded machine may time out on its own, so timeouts are at least those injected.
    assert errors.pop("timeout") >= injected["timeout"]
    assert errors == {"rate_limited": injected["rate_limit"], "server_error": injected["server_error"],
                      "connection": injected["truncated"], "invalid_response": injected["invalid_json"]}
    for event in (e for e in proxy.events if e.fault == "rate_limit"):
        retry = min(e.time for e in proxy.events if e.prompt == event.prompt and e.time > event.time)
        assert retry - event.time >= 0.3, "Retry-After was not honoured"


def stored_prompts(cache_file) -> set[str]:
    """Prompts whose answer is on disk (complete lines only, as a restart reads them)."""
    if not cache_file.exists():
        return set()
    data = cache_file.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    return {json.loads(line)["messages"][-1]["content"] for line in lines
            if line.strip() and json.loads(line)["status"] == "ok"}


def kill_when_stored(process, cache_file, target: int, deadline_s: float = 60.0) -> bool:
    """SIGKILL the process once `target` answers are stored; False if it finished first."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.is_alive():
        if cache_file.exists() and cache_file.read_bytes().count(b"\n") >= target:
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
            return True
        time.sleep(0.005)
    process.join(deadline_s)
    return False


def test_kill_9_at_random_points_never_resends_a_stored_answer(transformers_server, generate_forkserver, config_from,
                                                               tmp_path):
    seed = int(os.environ.get("ALAMBIC_KILL_SEED", time.time_ns() % 10_000))  # set it to replay a failure
    rng = random.Random(seed)
    proxy = FaultProxy("127.0.0.1", transformers_server.port, {}).start_in_thread()  # logs answers only
    count, rounds = 30, 3
    inputs = write_jsonl(tmp_path / "in.jsonl", prompts(count, seed=2))
    config = real_config(config_from, tmp_path, proxy.base_url, str(transformers_server.model_dir), inputs)
    cache_file = tmp_path / "run" / "cache" / RECORDS_FILE
    kills = 0
    try:
        for _ in range(rounds):
            before = stored_prompts(cache_file)
            mark = len(proxy.answered)
            target = len(before) + rng.randint(1, max(1, (count - len(before)) // 3))
            process = generate_forkserver.Process(target=run_generate, args=(str(config),))
            process.start()
            kills += kill_when_stored(process, cache_file, target)
            resent = before & set(proxy.answered[mark:])
            assert not resent, f"stored answers requested again (ALAMBIC_KILL_SEED={seed}): {sorted(resent)[:3]}"
        mark, before = len(proxy.answered), stored_prompts(cache_file)
        assert invoke_cli("generate", config) == 0
        assert not before & set(proxy.answered[mark:]), f"ALAMBIC_KILL_SEED={seed}"
    finally:
        proxy.stop()
    assert kills == rounds, "a run ended before it could be killed"
    rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    assert Counter(r["messages"][-1]["content"] for r in rows) == Counter(p["prompt"] for p in prompts(count, 2))
    assert all(r["status"] == "ok" for r in rows)
    # Only answers in flight at a kill may have been answered twice: at most max_in_flight per kill.
    repeats = sum(n - 1 for n in Counter(proxy.answered).values())
    assert repeats <= 4 * kills
