"""The local `hf` backend (batched generation, logprobs checked against a forward pass) and `train-classifier`."""

from __future__ import annotations

import json

import pytest
import yaml
from generate_tiny_model import build_tiny_chat_model
from helpers_generate import read_jsonl, invoke_cli, summary_of, write_jsonl


@pytest.mark.slow  # imports transformers and loads a model in this process
def test_hf_backend_batches_samples_and_stores_true_logprobs(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_chat_model(tmp_path / "tiny", seed=1)
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in ["the cat sat", "a good movie", "why"]])
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"backend": "hf", "model": str(model_dir), "batch_size": 4, "device": "cpu",
                    "dtype": "float32"},
        "sampling": {"n": 2, "temperature": 0.9, "seed": 3, "max_tokens": 5, "logprobs": True, "top_logprobs": 3},
        "input": {"path": str(inputs)}, "filters": {"dedupe": False, "min_chars": 0},
        "output": {"dir": str(tmp_path / "run"), "format": "parquet"}, "progress": False}))
    assert invoke_cli("generate", config) == 0
    import pyarrow.parquet as parquet

    rows = parquet.read_table(tmp_path / "run" / "teacher.parquet").to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [(i, s) for i in range(3) for s in range(2)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row in rows:
        entries = row["completion_logprobs"]
        assert len(entries) == row["usage"]["completion_tokens"] <= 5
        prompt_ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        assert row["usage"]["prompt_tokens"] == len(prompt_ids)
        completion_ids = [entry["token_id"] for entry in entries]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
        expected = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        for step, entry in enumerate(entries):
            assert abs(entry["logprob"] - float(expected[step, entry["token_id"]])) < 1e-4
            top = [alt["logprob"] for alt in entry["top"]]
            assert len(top) == 3 and top == sorted(top, reverse=True) and entry["logprob"] <= top[0] + 1e-6
    assert invoke_cli("generate", config) == 0
    assert summary_of(tmp_path / "run")["requests"]["sent"] == 0


def classifier_data(tmp_path):
    positive = ["good fun", "great acting", "good plot", "great fun film", "good and great", "great cast"]
    negative = ["bad plot", "awful acting", "bad film", "awful and bad", "bad fun", "awful cast"]
    train = [{"text": t, "label": "positive"} for t in positive] + [{"text": t, "label": "negative"} for t in negative]
    train[0]["label"] = "negative"  # the teacher is not perfect
    test = [
        {"text": "great film", "gold": "positive", "label": "positive"},
        {"text": "good acting", "gold": "positive", "label": "negative"},  # teacher wrong
        {"text": "awful plot", "gold": "negative", "label": "negative"},
        {"text": "bad cast", "gold": "negative", "label": None},  # teacher answer was unparseable
    ]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 12 records, a few hundred steps
def test_train_classifier_reports_student_next_to_teacher(tmp_path, capsys):
    train, test = classifier_data(tmp_path)
    for model in ("logistic_regression", "mlp"):
        config = tmp_path / f"{model}.yaml"
        config.write_text(yaml.safe_dump({"train": str(train), "test": str(test), "model": model,
                                          "hidden_sizes": [16], "max_iter": 500,
                                          "output_dir": str(tmp_path / model)}))
        assert invoke_cli("train-classifier", config) == 0
        report = json.loads((tmp_path / model / "report.json").read_text())
        predictions = read_jsonl(tmp_path / model / "predictions.jsonl")
        correct = sum(p["student"] == p["gold"] for p in predictions)
        assert report["student"]["accuracy"] == correct / 4 and correct >= 3
        assert report["teacher"] == {"accuracy_where_labelled": 2 / 3, "accuracy_missing_as_wrong": 2 / 4,
                                     "coverage": 3 / 4}
        assert report["labels"] == ["negative", "positive"] and report["train_records"] == 12
    assert '"accuracy_where_labelled"' in capsys.readouterr().out


def test_train_classifier_needs_two_teacher_classes(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "a"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "gold": "a"}])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": str(train), "test": str(test), "output_dir": str(tmp_path / "o")}))
    assert invoke_cli("train-classifier", config) == 2
    assert "at least two classes" in capsys.readouterr().err


@pytest.mark.slow  # imports transformers for the tokenizer
def test_step_by_step_output_feeds_the_training_data_pipeline(scripted_server, tmp_path):
    """Contract with `alambic distill`: prompt/completion columns and the per-record `weight` column."""
    from transformers import AutoTokenizer

    from alambic.config import DataConfig
    from alambic.data.datasets import tokenize_records
    from alambic.data.formats import IGNORE

    server = scripted_server(lambda messages, body: "Rationale: it is good. Answer: positive")
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "a good movie"}, {"text": "the good plot"}])
    config = tmp_path / "sbs.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"model": "m", "base_url": server.base_url},
        "input": {"path": str(inputs), "prompt_column": "text"},
        "recipe": {"kind": "step_by_step", "labels": ["positive", "negative"], "rationale_weight": 0.25},
        "output": {"dir": str(tmp_path / "run")}, "progress": False}))
    assert invoke_cli("generate", config) == 0
    records = read_jsonl(tmp_path / "run" / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path / "tiny"))
    data_config = DataConfig(train="unused", format="prompt_completion", weight_column="weight")
    rows = tokenize_records(records, tokenizer, data_config, "train.jsonl")
    assert [row["weight"] for row in rows] == [1.0, 0.25, 1.0, 0.25]
    for row, record in zip(rows, records):
        learned = [token for token in row["labels"] if token != IGNORE]
        assert tokenizer.decode(learned, skip_special_tokens=True).split() == record["completion"].split()
