"""Bad input exits with code 2 and a clear message; failed requests are kept and retried on demand;
the API key never reaches a file or a log."""

from __future__ import annotations

import logging

from helpers_generate import free_port, read_jsonl, invoke_cli, summary_of, write_jsonl

from alambic.generate.testing.scripted_server import ScriptedError

SECRET = "sk-live-9f8e7d6c5b4a3210TOPSECRET"
FAST_RETRY = {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05}


def prompts_file(tmp_path, count=3, column="prompt"):
    return write_jsonl(tmp_path / "in.jsonl", [{column: f"question {i}"} for i in range(count)])


def test_unreachable_server_names_the_url_and_exits_2(config_from, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = config_from("generate_answer.yaml", teacher={"base_url": url, "retry": FAST_RETRY},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 2
    message = capsys.readouterr().err
    assert "cannot reach the teacher" in message and url in message and "3 attempts" in message


def test_missing_api_key_variable_exits_2_before_any_request(scripted_server, config_from, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.delenv("ALAMBIC_TEST_KEY", raising=False)
    server = scripted_server()
    config = config_from("generate_answer.yaml",
                         teacher={"base_url": server.base_url, "api_key_env": "ALAMBIC_TEST_KEY"},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 2
    assert "ALAMBIC_TEST_KEY" in capsys.readouterr().err and server.log == []


def test_key_pasted_instead_of_a_variable_name_is_refused_without_echo(config_from, tmp_path, capsys):
    config = config_from("generate_answer.yaml", teacher={"api_key_env": SECRET},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 2
    captured = capsys.readouterr()
    assert "NAME of an environment variable" in captured.err and SECRET not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_missing_prompt_column_names_the_column(config_from, tmp_path, capsys):
    config = config_from("generate_answer.yaml", input={"path": str(prompts_file(tmp_path, column="promt"))})
    assert invoke_cli("generate", config) == 2
    err = capsys.readouterr().err
    assert "no column 'prompt'" in err and "did you mean 'promt'" in err


def test_empty_label_set_message(config_from, tmp_path, capsys):
    config = config_from("generate_label.yaml", recipe={"kind": "label", "labels": []},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 2
    assert "the label set is empty" in capsys.readouterr().err


def test_cache_of_another_config_is_refused_unless_new_cache(scripted_server, config_from, tmp_path, capsys):
    server = scripted_server()
    inputs = str(prompts_file(tmp_path))
    first = config_from("generate_answer.yaml", teacher={"base_url": server.base_url}, input={"path": inputs})
    assert invoke_cli("generate", first) == 0 and len(server.log) == 3
    changed = config_from("generate_answer.yaml", teacher={"base_url": server.base_url}, input={"path": inputs},
                          sampling={"temperature": 0.2})
    assert invoke_cli("generate", changed) == 2
    assert "sampling.temperature" in capsys.readouterr().err and len(server.log) == 3
    assert invoke_cli("generate", changed, "--new-cache") == 0
    assert len(server.log) == 6
    assert all(row["params"]["temperature"] == 0.2 for row in read_jsonl(tmp_path / "run" / "teacher.jsonl"))


def test_failed_requests_are_recorded_skipped_then_retried_on_demand(scripted_server, config_from, tmp_path):
    broken = {"on": True}
    attempts = []

    def flaky(messages, body):
        attempts.append(messages[-1]["content"])
        if broken["on"] and messages[-1]["content"].endswith("1"):
            raise ScriptedError(400, "this prompt is rejected")
        if broken["on"] and messages[-1]["content"].endswith("2"):
            raise ScriptedError(503, "overloaded")
        return "fine"

    server = scripted_server(flaky)
    config = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "retry": FAST_RETRY},
                         input={"path": str(prompts_file(tmp_path))}, filters={"dedupe": False})
    assert invoke_cli("generate", config) == 0
    assert attempts.count("question 1") == 1 and attempts.count("question 2") == 3  # 400 is not retried
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "teacher.jsonl")}
    assert rows[1]["status"] == "failed" and rows[1]["error"]["kind"] == "http_400"
    assert rows[2]["error"] == {"kind": "server_error", "message": "HTTP 503: overloaded"}
    summary = summary_of(tmp_path / "run")
    assert summary["requests"]["failures_by_kind"] == {"http_400": 1, "server_error": 1}
    assert summary["teacher_records"]["failed"] == 2

    broken["on"] = False
    assert invoke_cli("generate", config) == 0
    assert len(attempts) == 5  # failed requests are not resent without the flag
    assert summary_of(tmp_path / "run")["requests"]["failed_earlier_not_retried"] == 2
    assert invoke_cli("generate", config, "--retry-failed") == 0
    assert sorted(attempts[5:]) == ["question 1", "question 2"]
    assert all(r["status"] == "ok" for r in read_jsonl(tmp_path / "run" / "teacher.jsonl"))


def test_api_key_never_written_or_logged(scripted_server, config_from, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("ALAMBIC_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)

    def leaky(messages, body):
        if messages[-1]["content"].endswith("0"):  # a server that echoes the key in its error
            raise ScriptedError(400, f"key {SECRET} may not ask this")
        return "fine"

    server = scripted_server(leaky, api_key=SECRET)
    config = config_from("generate_answer.yaml",
                         teacher={"base_url": server.base_url, "api_key_env": "ALAMBIC_TEST_KEY",
                                  "prices": {"input_per_million": 1, "output_per_million": 2}},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 0
    assert len(server.log) == 2  # the key was sent: the server accepted the other two
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "requests.jsonl", "manifest.json", "summary.json",
                                       "teacher.jsonl", "rejected.jsonl"}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert "***" in (tmp_path / "run" / "cache" / "requests.jsonl").read_text()  # the echo was redacted
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_wrong_key_stops_the_run_with_a_hint(scripted_server, config_from, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALAMBIC_TEST_KEY", "sk-wrong-key-000000")
    server = scripted_server(api_key=SECRET)
    config = config_from("generate_answer.yaml",
                         teacher={"base_url": server.base_url, "api_key_env": "ALAMBIC_TEST_KEY"},
                         input={"path": str(prompts_file(tmp_path))})
    assert invoke_cli("generate", config) == 2
    err = capsys.readouterr().err
    assert "refused the API key (HTTP 401)" in err and "sk-wrong-key-000000" not in err
