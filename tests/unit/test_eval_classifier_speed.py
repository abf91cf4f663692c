"""`alambic eval` on classifiers times every model in the same interleaved rounds as the demo (evaluate/speed.py)."""

import pytest

from alambic.evaluate.suite import ModelSpec, evaluate_classifiers
from alambic.testing_classify import tiny_bert_classifier, wordpiece_tokenizer


@pytest.fixture()
def two_identical_students(tmp_path):
    texts = ["the market rose today", "the team won the final", "a new phone was launched", "rates fell again"] * 4
    tokenizer = wordpiece_tokenizer(texts, vocab_size=120)
    teacher = tiny_bert_classifier(len(tokenizer), 2, hidden=64, layers=2)
    student = tiny_bert_classifier(len(tokenizer), 2, hidden=32, layers=1, seed=1)
    for name, model in (("teacher", teacher), ("a", student), ("b", student)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    specs = [ModelSpec("teacher", str(tmp_path / "teacher"), "teacher"), ModelSpec("a", str(tmp_path / "a"), "student"),
             ModelSpec("b", str(tmp_path / "b"), "student")]
    return specs, rows


def test_every_model_gets_an_interleaved_throughput_with_its_spread(two_identical_students):
    specs, rows = two_identical_students
    report = evaluate_classifiers(specs, rows, max_length=32, show_progress=False, speed_rounds=4)
    for name in ("teacher", "a", "b"):
        metrics = report["models"][name]["metrics"]
        assert metrics["throughput_rounds"] == 4 and metrics["throughput_spread"] >= 0
        assert metrics["throughput_per_s"] > 0 and metrics["latency_ms"] > 0
    # Peak memory is counted in tensor bytes (deterministic): identical models need exactly the same.
    assert report["models"]["a"]["metrics"]["peak_memory_mb"] == report["models"]["b"]["metrics"]["peak_memory_mb"]
    assert report["models"]["a"]["metrics"]["peak_memory_mb"] < report["models"]["teacher"]["metrics"]["peak_memory_mb"]
    assert isinstance(report["speed_warnings"], list)
    assert report["models"]["a"]["metrics"]["accuracy"] == report["models"]["b"]["metrics"]["accuracy"]


def test_no_speed_measures_nothing(two_identical_students):
    specs, rows = two_identical_students
    report = evaluate_classifiers(specs, rows, max_length=32, measure_speed=False, show_progress=False)
    assert "throughput_per_s" not in report["models"]["a"]["metrics"] and "speed_warnings" not in report
