"""The served teacher's answer parsing, request shape and prefetch bookkeeping (no model, no training)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alambic.config_served import ServedTeacherOptions
from alambic.generate.backends.base import TransientTeacherError
from alambic.teachers.served import ServedTeacher, batch_key, pad_signals
from alambic.teachers.served_client import MissingPromptLogprobs, PromptLogprobClient, parse_completion, tail_logmass


def _entry(pairs, actual=None):
    """A vLLM prompt_logprobs position: {id: {logprob, rank, decoded_token}}."""
    entry = {str(i): {"logprob": lp, "rank": r, "decoded_token": f"t{i}"} for i, lp, r in pairs}
    if actual is not None:
        entry[str(actual[0])] = {"logprob": actual[1], "rank": actual[2], "decoded_token": "x"}
    return entry


def test_parse_takes_the_top_k_by_rank_and_the_last_position_from_generated_logprobs():
    lp = [math.log(0.5), math.log(0.3), math.log(0.1)]
    choice = {
        "index": 0,
        "prompt_logprobs": [None, _entry([(7, lp[0], 1), (3, lp[1], 2)], actual=(9, lp[2], 3)),
                            _entry([(4, lp[0], 1), (5, lp[1], 2)])],
        "logprobs": {"top_logprobs": [{"token_id:2": lp[1], "token_id:8": lp[0]}]},
    }
    (signal,) = parse_completion({"choices": [choice]}, [[1, 9, 5]], k=2)
    # Position t holds the distribution after token t: the actual token (rank 3) is not in the top 2.
    assert signal.ids.tolist() == [[7, 3], [4, 5], [8, 2]]
    np.testing.assert_allclose(np.exp(signal.logprobs[0]), [0.5, 0.3], rtol=1e-6)
    np.testing.assert_allclose(np.exp(signal.tail), [0.2, 0.2, 0.2], rtol=1e-5)


def test_missing_last_position_is_marked_and_carries_all_mass_in_the_tail():
    choice = {"index": 0, "prompt_logprobs": [None, _entry([(1, -0.1, 1), (2, -3.0, 2)])]}
    (signal,) = parse_completion({"choices": [choice]}, [[0, 1]], k=2)
    assert signal.ids[1].tolist() == [-1, -1] and signal.tail[1] == 0.0


def test_choices_are_matched_to_rows_by_index():
    def choice(index, token):
        return {"index": index, "prompt_logprobs": [None, _entry([(token, -0.5, 1)])]}

    signals = parse_completion({"choices": [choice(1, 11), choice(0, 10)]}, [[0, 10], [0, 11]], k=1)
    assert [s.ids[0, 0] for s in signals] == [10, 11]


@pytest.mark.parametrize("answer", [
    {"choices": []}, {"choices": [{"index": 0, "prompt_logprobs": [None]}]}, {"nope": 1},
    {"choices": [{"index": 0, "prompt_logprobs": [None, {"1": {"rank": 1}}]}]},
])
def test_malformed_answers_are_transient(answer):
    with pytest.raises(TransientTeacherError):
        parse_completion(answer, [[0, 1]], k=1)


def test_an_answer_without_prompt_logprobs_is_recognised():
    with pytest.raises(MissingPromptLogprobs):
        parse_completion({"choices": [{"index": 0, "text": "hi"}]}, [[0, 1]], k=1)


def test_tail_mass_is_accurate_when_tiny():
    logprobs = np.log(np.array([[0.9, 0.1 - 1e-7]], dtype=np.float64)).astype(np.float32)
    tail = tail_logmass(np.array([[0, 1]]), logprobs)
    assert tail[0] < math.log(1e-5)  # 1 - sum is computed in float64 from the float32 values


def test_request_sends_token_ids_not_text():
    client = PromptLogprobClient("http://127.0.0.1:1/v1", "m", 5, timeout_s=1, retry=None)
    payload = client.payload([[1, 2, 3], [4, 5]])
    assert payload["prompt"] == [[1, 2, 3], [4, 5]] and payload["prompt_logprobs"] == 5
    assert payload["max_tokens"] == 1 and payload["add_special_tokens"] is False


def test_padding_positions_match_the_cache_reader():
    signal = parse_completion({"choices": [{"index": 0, "prompt_logprobs": [None, _entry([(3, -0.2, 1)])]}]},
                              [[0, 3]], k=1)
    padded = pad_signals(signal, 4, 1, "cpu")
    assert padded.topk_ids.shape == (1, 4, 1) and padded.topk_ids[0, 0, 0] == 3
    assert torch.isinf(padded.tail_logmass[0, 2:]).all() and padded.topk_ids[0, 2:, 0].tolist() == [0, 0]


def _source(prefetch: int) -> ServedTeacher:
    config = SimpleNamespace(server="http://127.0.0.1:1/v1", server_model="m", top_k=2,
                             served=ServedTeacherOptions(prefetch=prefetch))
    source = ServedTeacher(config, tokenizer=None, vocab_size=10)
    source._start_workers = lambda: None  # nothing is sent: only the bookkeeping is under test
    source.train_data = [{"input_ids": [i, i + 1, i + 2]} for i in range(20)]
    source.max_steps = 5
    return source


def _batch(rows):
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long)}


def test_prefetch_is_bounded_and_drops_what_was_never_used():
    source = _source(prefetch=3)
    upcoming = lambda step: [[2 * step], [2 * step + 1]]  # noqa: E731 - two micro-batches of one row per step
    current = [_batch([[0, 1, 2]]), _batch([[1, 2, 3]])]
    source.prefetch(current, upcoming, step=1)
    steps = sorted(step for step, _ in source.pending.values())
    assert steps == [1, 1, 2, 2, 3]  # this step's two + three ahead
    source.prefetch([_batch([[9, 9, 9]])], upcoming, step=2)  # e.g. a rollout replaced step 2's rows
    assert all(step >= 2 for step, _ in source.pending.values())  # step 1's unused requests are gone
    assert batch_key([[9, 9, 9]]) in source.pending
    source.prefetch([], upcoming, step=4)
    assert max(step for step, _ in source.pending.values()) == 5  # never past max_steps
    source.close()


def test_the_table_servers_prepared_answers_equal_its_plain_ones():
    """The benchmark's fixed-delay server assembles JSON from prepared pieces: same answer as the plain path."""
    import json

    from alambic.teachers.testing.logprob_server import LogprobServer, table_scorer

    server = LogprobServer(table_scorer(50), "t", None, max_logprobs=5)
    rows = [[3, 7, 7, 1, 49], [0, 2]]
    body = {"model": "t", "prompt": rows, "prompt_logprobs": 5, "logprobs": 5, "return_tokens_as_token_ids": True,
            "max_tokens": 1}
    plain = json.loads(json.dumps(server._complete(body)))
    fast = json.loads(server._complete_bytes(body).split(b"\r\n\r\n", 1)[1])
    for a, b in zip(plain["choices"], fast["choices"]):
        assert a["prompt_logprobs"] == b["prompt_logprobs"]
        assert a["logprobs"]["top_logprobs"] == b["logprobs"]["top_logprobs"]


def test_retry_after_is_honoured_through_generates_backoff():
    """A 429 with Retry-After: the next attempt waits at least that long, then the answer is used."""
    import random

    from alambic.generate.config import RetryConfig
    from alambic.generate.testing.fault_proxy import FaultProxy
    from alambic.teachers.testing.logprob_server import LogprobServer, table_scorer

    # A proxy seed whose first draw injects the 429 (rate 0.5) and whose second forwards.
    seed = next(s for s in range(1000) if (lambda r: r.random() < 0.5 <= r.random())(random.Random(s)))
    server = LogprobServer(table_scorer(30), "t", None, max_logprobs=5).start_in_thread()
    proxy = FaultProxy("127.0.0.1", server.port, {"rate_limit": 0.5}, retry_after="0.3", seed=seed).start_in_thread()
    try:
        client = PromptLogprobClient(proxy.base_url, "t", 3, timeout_s=5,
                                     retry=RetryConfig(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02))
        (signal,) = client.score([[1, 2, 3, 4]])
    finally:
        proxy.stop()
        server.stop()
    assert [event.fault for event in proxy.events] == ["rate_limit", "forwarded"]
    assert proxy.events[1].time - proxy.events[0].time >= 0.3
    assert client.stats.errors == {"rate_limited": 1} and signal.ids.shape == (4, 3)


def test_a_kept_alive_connection_closed_while_idle_is_reopened_without_an_error():
    """uvicorn (vLLM) closes idle keep-alive connections after 5 s: the next request must not count as failed."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's naming
            body = b'{"data": []}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # closes after answering, without announcing it

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PromptLogprobClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", 2, timeout_s=5, retry=None)
        for _ in range(3):
            assert client.get_json("/models") == (200, {"data": []})
    finally:
        server.shutdown()


@pytest.mark.parametrize("teacher, needle", [
    ({"server": "http://h:1/v1", "model": "x", "server_model": "m", "top_k": 2}, "cannot be combined with teacher.model"),
    ({"server": "http://h:1/v1", "top_k": 2}, "needs teacher.server_model"),
    ({"server": "http://h:1/v1", "server_model": "m"}, "needs teacher.top_k"),
    ({"server": "h:1", "server_model": "m", "top_k": 2}, "must be an http(s) URL"),
    ({"model": "x", "served": {"prefetch": 2}}, "set teacher.server too"),
])
def test_served_teacher_fields_are_checked_when_the_config_is_read(teacher, needle):
    from alambic.config import DistillConfig, validate_mapping
    from alambic.errors import ConfigError

    mapping = {"teacher": teacher, "student": {"model": "s"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError) as raised:
        validate_mapping(mapping, DistillConfig, "c.yaml")
    assert needle in str(raised.value)
