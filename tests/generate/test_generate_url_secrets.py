"""Credentials inside teacher.base_url (http://user:KEY@host/v1) never reach a file or the terminal."""

from __future__ import annotations

from pathlib import Path

from helpers_generate import free_port, invoke_cli, write_jsonl

SECRET = "pw-0a1b2c3d4e5f-TOPSECRET"
FAST_RETRY = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02}


def _with_credentials(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://alice:{SECRET}@{rest}"


def _files_holding_secret(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_url_credentials_are_not_stored_or_shown(scripted_server, config_from, tmp_path, capsys):
    server = scripted_server()
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(3)])
    config = config_from("generate_answer.yaml", teacher={"base_url": _with_credentials(server.base_url)},
                         input={"path": str(inputs)})
    assert invoke_cli("generate", config) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "cache" / "manifest.json").exists()
    assert "alice:" not in (tmp_path / "run" / "config.yaml").read_text()
    assert _files_holding_secret(tmp_path / "run") == []


def test_url_credentials_are_not_in_errors(config_from, tmp_path, capsys):
    url = _with_credentials(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q"}])
    config = config_from("generate_answer.yaml", teacher={"base_url": url, "retry": FAST_RETRY},
                         input={"path": str(inputs)})
    assert invoke_cli("generate", config) == 2
    captured = capsys.readouterr()
    assert "cannot reach the teacher" in captured.err and "***@127.0.0.1" in captured.err
    assert SECRET not in captured.out + captured.err
    assert _files_holding_secret(tmp_path) == [str(tmp_path / "config.yaml")]  # only the user's own config
    assert not (tmp_path / "run").exists()  # nothing was answered: the run leaves no folder


def test_validate_and_distill_print_configs_without_url_credentials(tmp_path):
    from alambic.config import dump_config
    from alambic.generate.config import GenerateConfig
    from alambic.redact import redact_text

    assert redact_text(f"see https://bob:{SECRET}@example.com/v1 and http://h/x") == \
        "see https://***@example.com/v1 and http://h/x"
    config = GenerateConfig.model_validate({
        "teacher": {"backend": "openai", "model": "m", "base_url": f"https://bob:{SECRET}@example.com/v1"},
        "input": {"path": "x.jsonl"}, "output": {"dir": str(tmp_path)},
    })
    assert SECRET not in dump_config(config) and "https://***@example.com/v1" in dump_config(config)
