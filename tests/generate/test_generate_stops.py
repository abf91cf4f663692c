"""Runs that cannot give the user what the config asks for stop with exit 2 instead of exiting 0:
a malformed base URL, a backend that drops the requested logprobs, a run in which every request
failed, a CUDA device on a machine without one; and a run that got no answer does not pin the cache."""

from __future__ import annotations

import pytest
from helpers_generate import read_jsonl, invoke_cli, write_jsonl

from alambic.generate.testing.scripted_server import ScriptedError

FAST_RETRY = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02}


def prompts(tmp_path, count=3):
    return str(write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(count)]))


@pytest.mark.parametrize("url", ["not-a-url", "127.0.0.1:8000/v1", "ftp://host/v1", "http:///v1", "http://h:99999/v1"])
def test_malformed_base_url_is_a_config_error_and_writes_nothing(url, config_from, tmp_path, capsys):
    config = config_from("generate_answer.yaml", teacher={"base_url": url}, input={"path": prompts(tmp_path)})
    assert invoke_cli("generate", config) == 2
    assert "is not an http(s) URL with a host" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()
    assert invoke_cli("validate", config) == 2


def test_backend_without_logprobs_stops_on_the_first_answer(scripted_server, config_from, tmp_path, capsys):
    server = scripted_server(serve_logprobs=False)  # like `transformers serve`: `logprobs` is ignored
    config = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "max_in_flight": 1},
                         input={"path": prompts(tmp_path, 6)})
    assert invoke_cli("generate", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "without the log-probabilities" in err and server.base_url in err
    assert "vLLM" in err and "teacher.backend: hf" in err and "sampling.logprobs=false" in err
    assert len(server.log) == 1  # stopped on the first answer
    stored = tmp_path / "run" / "cache" / "requests.jsonl"
    assert not stored.exists() or not read_jsonl(stored)  # and stored nothing from it

    # The suggested way out works on the same folder: the stopped run pinned nothing.
    assert invoke_cli("generate", config, "sampling.logprobs=false", "sampling.top_logprobs=0") == 0
    rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    assert len(rows) == 6 and all(row["status"] == "ok" for row in rows)


def test_every_request_failing_never_exits_0(scripted_server, config_from, tmp_path, capsys):
    def other_model(messages, body):  # a server pinned to another model answers 400 to everything
        raise ScriptedError(400, f"model {body['model']!r} is not served here")

    server = scripted_server(other_model)
    config = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "retry": FAST_RETRY},
                         input={"path": prompts(tmp_path)})
    assert invoke_cli("generate", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "every request failed (3 of 3; most often http_400: 3)" in err and "teacher.model" in err
    assert [row["status"] for row in read_jsonl(tmp_path / "run" / "teacher.jsonl")] == ["failed"] * 3
    # A plain rerun sends nothing and still does not pretend to succeed.
    assert invoke_cli("generate", config) == 2
    assert "--retry-failed" in capsys.readouterr().err


def test_a_run_without_answers_does_not_pin_the_cache(scripted_server, config_from, tmp_path, capsys):
    def other_model(messages, body):
        if body["model"] != "right-model":
            raise ScriptedError(400, "unknown model")
        return "fine"

    server = scripted_server(other_model)
    inputs = prompts(tmp_path)
    wrong = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "model": "wrong-model"},
                        input={"path": inputs})
    assert invoke_cli("generate", wrong) == 2
    right = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "model": "right-model"},
                        input={"path": inputs})
    assert invoke_cli("generate", right) == 0, capsys.readouterr().err  # no --new-cache needed
    assert all(row["status"] == "ok" for row in read_jsonl(tmp_path / "run" / "teacher.jsonl"))
    assert list((tmp_path / "run" / "cache").glob("replaced-*/requests.jsonl"))  # the failures kept aside

    # A cache that does hold answers still pins its teacher.
    other = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "model": "wrong-model"},
                        input={"path": inputs})
    assert invoke_cli("generate", other) == 2
    assert "changed: teacher.model" in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_config_error(config_from, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = config_from("generate_hf_local.yaml", teacher={"device": "cuda", "model": str(tmp_path)},
                         input={"path": prompts(tmp_path)})
    assert invoke_cli("generate", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "teacher.device=cuda but this machine has no CUDA device" in err and "teacher.device=cpu" in err
    assert not (tmp_path / "run").exists()


def test_missing_local_teacher_folder_is_named(config_from, tmp_path, capsys):
    config = config_from("generate_hf_local.yaml", teacher={"device": "cpu", "model": str(tmp_path / "nope")},
                         input={"path": prompts(tmp_path)})
    assert invoke_cli("generate", config) == 2
    assert "teacher model folder" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_hub_model_while_offline_gets_the_offline_hint(config_from, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = config_from("generate_hf_local.yaml", teacher={"device": "cpu", "model": "alambic-test/no-such-model"},
                         input={"path": prompts(tmp_path)})
    assert invoke_cli("generate", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the hub is offline" in err and "hf download alambic-test/no-such-model" in err
    assert not (tmp_path / "run").exists()
