"""Every bad input: a clear message naming the problem and the fix, exit code 2, nothing written."""

import json
import shutil

import pytest

from helpers import invoke, kd_config, write_config


@pytest.fixture
def good(tiny_setup, tmp_path):
    return kd_config(tiny_setup, tmp_path / "run", max_steps=2)


def _expect_error(capsys, tmp_path, mapping_or_path, *needles, extra=()):
    path = mapping_or_path if not isinstance(mapping_or_path, dict) else write_config(tmp_path / "c.yaml", mapping_or_path)
    code, _, err = invoke(capsys, "distill", path, *extra)
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "fix:" in err or "did you mean" in err
    assert not (tmp_path / "run").exists(), "a failed run left a folder behind"
    return err


def test_missing_config(capsys, tmp_path):
    _expect_error(capsys, tmp_path, tmp_path / "nope.yaml", "nope.yaml", "does not exist")


def test_unreadable_config(capsys, tmp_path):
    folder = tmp_path / "config_dir.yaml"
    folder.mkdir()
    _expect_error(capsys, tmp_path, folder, "cannot read config")


def test_unknown_key_names_it_and_suggests(capsys, tmp_path, good):
    good["train"]["learning_rate"] = 1e-3
    err = _expect_error(capsys, tmp_path, good, "unknown key 'train.learning_rate'")
    good["train"].pop("learning_rate")
    err = _expect_error(capsys, tmp_path, good, "unknown key 'loss.temprature'", "did you mean 'loss.temperature'",
                        extra=["loss.temprature=2"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-1", "greater than 0"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("loss.beta=-0.1", "loss.beta"),
        ("train.max_steps=many", "train.max_steps"),
        ("loss.objective=forward_kll", "did you mean 'forward_kl'"),
    ],
)
def test_wrong_type_or_out_of_range(capsys, tmp_path, good, override, needle):
    _expect_error(capsys, tmp_path, good, needle, "invalid config", extra=[override])


def test_model_path_that_does_not_exist(capsys, tmp_path, good):
    good["student"]["model"] = str(tmp_path / "no" / "such" / "model")
    _expect_error(capsys, tmp_path, good, "student model folder", "does not exist")


def test_hub_id_while_offline(capsys, tmp_path, good, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good["teacher"]["model"] = "someorg/some-teacher-that-is-not-cached"
    _expect_error(capsys, tmp_path, good, "offline", "local folder", "someorg/some-teacher-that-is-not-cached")


def test_malformed_jsonl_reports_file_and_line(capsys, tmp_path, good):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    good["data"]["train"] = str(bad)
    _expect_error(capsys, tmp_path, good, "bad.jsonl", "line 3")


def test_empty_dataset(capsys, tmp_path, good):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good["data"]["train"] = str(empty)
    _expect_error(capsys, tmp_path, good, "empty.jsonl", "is empty")


def test_dataset_empty_after_filtering(capsys, tmp_path, good):
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "x = 1", "completion": ""}) for _ in range(3)))
    good["data"].update({"train": str(data), "format": "prompt_completion"})
    good["data"].pop("eval")
    # An empty completion still carries the EOS label, so cut it off with a tiny max_length... instead use
    # prompts that fill max_length entirely.
    data.write_text("\n".join(json.dumps({"prompt": "word " * 200, "completion": "done"}) for _ in range(3)))
    _expect_error(capsys, tmp_path, good, "empty after tokenization and filtering")


def test_missing_column(capsys, tmp_path, good):
    data = tmp_path / "cols.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    good["data"]["train"] = str(data)
    _expect_error(capsys, tmp_path, good, "no column 'text'", "columns present: content")


def test_chat_format_without_chat_template(capsys, tmp_path, good, tiny_setup):
    student = tmp_path / "student_no_template"
    shutil.copytree(tiny_setup["student_init"], student)
    config_path = student / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    (student / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    good["student"]["model"] = str(student)
    good["data"].update({"train": str(data), "format": "messages"})
    good["data"].pop("eval")
    good["teacher"] = None
    _expect_error(capsys, tmp_path, good, "no chat template")


def test_vocab_mismatch(capsys, tmp_path, good, tiny_setup):
    from transformers import AutoTokenizer

    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.testing import tiny_llama

    other = build_tokenizer(["completely different text " * 50, "zzz yyy"], vocab_size=300)
    student = tmp_path / "other_vocab"
    tiny_llama(len(other), hidden=32, layers=1, heads=2).save_pretrained(student)
    other.save_pretrained(student)
    assert len(AutoTokenizer.from_pretrained(student)) != len(AutoTokenizer.from_pretrained(tiny_setup["teacher"]))
    good["student"]["model"] = str(student)
    _expect_error(capsys, tmp_path, good, "tokenizers differ", "cross-tokenizer")


def test_output_folder_holding_a_different_run(capsys, tmp_path, good):
    code, _, err = invoke(capsys, "distill", write_config(tmp_path / "a.yaml", good))
    assert code == 0, err
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    code, _, err = invoke(capsys, "distill", tmp_path / "a.yaml", "loss.temperature=3")
    assert code == 2 and "already holds a different run" in err and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    code, _, err = invoke(capsys, "distill", tmp_path / "a.yaml", "loss.temperature=3", "--overwrite")
    assert code == 0, err
    assert "temperature: 3" in (tmp_path / "run" / "config.yaml").read_text()
