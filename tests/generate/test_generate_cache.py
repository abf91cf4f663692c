"""The request cache: durable appends, torn tails, foreign configs, one writer at a time."""

from __future__ import annotations

import asyncio
import json

import pytest

from alambic.errors import ConfigError, DataError
from alambic.generate.cache import RECORDS_FILE, RequestCache, fingerprint_of, request_key

IDENTITY = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", "extra_body": {}}
PARAMS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "stop": [], "seed": None, "logprobs": False,
          "top_logprobs": 0}


def ok_record(key: str, content: str = "answer") -> dict:
    return {"key": key, "status": "ok", "content": content}


def write_all(cache: RequestCache, records: list[dict]) -> None:
    async def go():
        await asyncio.gather(*(cache.append(record) for record in records))

    asyncio.run(go())


def test_key_depends_on_every_part():
    fingerprint = fingerprint_of(IDENTITY, PARAMS)
    messages = [{"role": "user", "content": "hi"}]
    base = request_key(fingerprint, messages, 0)
    assert base == request_key(fingerprint, [dict(m) for m in messages], 0)
    assert base != request_key(fingerprint, messages, 1)
    assert base != request_key(fingerprint, [{"role": "user", "content": "hi!"}], 0)
    assert base != request_key(fingerprint_of(IDENTITY, {**PARAMS, "temperature": 0.5}), messages, 0)
    assert base != request_key(fingerprint_of({**IDENTITY, "model": "other"}, PARAMS), messages, 0)


def test_concurrent_appends_survive_reopen(tmp_path):
    cache = RequestCache(tmp_path, IDENTITY, PARAMS)
    write_all(cache, [ok_record(f"k{i}", f"a{i}") for i in range(50)])
    cache.close()
    reopened = RequestCache(tmp_path, IDENTITY, PARAMS)
    assert {k: r["content"] for k, r in reopened.records.items()} == {f"k{i}": f"a{i}" for i in range(50)}
    reopened.close()


def test_torn_last_line_is_cut_and_later_appends_stay_readable(tmp_path):
    cache = RequestCache(tmp_path, IDENTITY, PARAMS)
    write_all(cache, [ok_record("k1"), ok_record("k2")])
    cache.close()
    path = tmp_path / RECORDS_FILE
    with open(path, "ab") as handle:  # what a kill in the middle of a write leaves behind
        handle.write(b'{"key": "k3", "status": "o')
    reopened = RequestCache(tmp_path, IDENTITY, PARAMS)
    assert set(reopened.records) == {"k1", "k2"}
    write_all(reopened, [ok_record("k3")])
    reopened.close()
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["k1", "k2", "k3"]


def test_an_answer_is_never_replaced_by_a_later_failure(tmp_path):
    cache = RequestCache(tmp_path, IDENTITY, PARAMS)
    write_all(cache, [{"key": "k", "status": "failed", "error": {"kind": "timeout"}}])
    assert cache.failed("k") and not cache.answered("k")
    write_all(cache, [ok_record("k")])
    write_all(cache, [{"key": "k", "status": "failed", "error": {"kind": "timeout"}}])
    cache.close()
    reopened = RequestCache(tmp_path, IDENTITY, PARAMS)
    assert reopened.answered("k")
    reopened.close()


def test_cache_of_another_config_is_refused_then_moved_aside(tmp_path):
    cache = RequestCache(tmp_path, IDENTITY, PARAMS)
    write_all(cache, [ok_record("k")])
    cache.close()
    with pytest.raises(ConfigError) as error:
        RequestCache(tmp_path, {**IDENTITY, "model": "bigger"}, {**PARAMS, "temperature": 0.7})
    assert "teacher.model" in error.value.message and "sampling.temperature" in error.value.message
    assert "--new-cache" in error.value.hint
    fresh = RequestCache(tmp_path, {**IDENTITY, "model": "bigger"}, PARAMS, replace_foreign=True)
    assert fresh.records == {}
    fresh.close()
    archived = list(tmp_path.glob("replaced-*/" + RECORDS_FILE))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["key"] == "k"


def test_records_without_manifest_are_not_trusted(tmp_path):
    (tmp_path / RECORDS_FILE).write_text(json.dumps(ok_record("k")) + "\n")
    with pytest.raises(ConfigError, match="no readable manifest"):
        RequestCache(tmp_path, IDENTITY, PARAMS)


def test_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    first = RequestCache(tmp_path, IDENTITY, PARAMS)
    with pytest.raises(ConfigError, match="another `alambic generate`"):
        RequestCache(tmp_path, IDENTITY, PARAMS)
    first.close()
    RequestCache(tmp_path, IDENTITY, PARAMS).close()


def test_corrupt_line_in_the_middle_is_reported(tmp_path):
    cache = RequestCache(tmp_path, IDENTITY, PARAMS)
    write_all(cache, [ok_record("k1")])
    cache.close()
    with open(tmp_path / RECORDS_FILE, "ab") as handle:
        handle.write(b"garbage\n" + json.dumps(ok_record("k2")).encode() + b"\n")
    with pytest.raises(DataError, match="line 2 is corrupt"):
        RequestCache(tmp_path, IDENTITY, PARAMS)
