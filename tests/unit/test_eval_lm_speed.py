"""`alambic eval` on causal LMs times generation in the same interleaved rounds as the classifiers (evaluate/suite.py)."""

import pytest


@pytest.fixture()
def two_identical_lm_students(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.evaluate.suite import ModelSpec
    from alambic.models.student import select_layers

    texts = ["def add(a, b):\n    return a + b\n" * 3, "class Point:\n    x: int = 0\n" * 3]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    student = select_layers(teacher, [1])
    for name, model in (("teacher", teacher), ("a", student), ("b", student)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    specs = [ModelSpec("teacher", str(tmp_path / "teacher"), "teacher"), ModelSpec("a", str(tmp_path / "a")),
             ModelSpec("b", str(tmp_path / "b"))]
    return specs, texts


def test_every_lm_gets_interleaved_generation_speed_with_its_spread(two_identical_lm_students):
    from alambic.evaluate.suite import evaluate_causal_lms

    specs, texts = two_identical_lm_students
    report = evaluate_causal_lms(specs, texts, max_length=32, new_tokens=4, show_progress=False, speed_rounds=3)
    for name in ("teacher", "a", "b"):
        metrics = report["models"][name]["metrics"]
        assert metrics["speed_rounds"] == 3
        for batch in (1, 8):
            assert metrics[f"tokens_per_s_batch{batch}"] > 0 and metrics[f"ttft_ms_batch{batch}"] > 0
            assert metrics[f"tokens_per_s_spread_batch{batch}"] >= 0
    a, b = report["models"]["a"], report["models"]["b"]
    # Peak memory is counted in tensor bytes (deterministic): identical models need exactly the same.
    assert a["metrics"]["peak_memory_mb"] == b["metrics"]["peak_memory_mb"]
    assert a["metrics"]["bits_per_byte"] == b["metrics"]["bits_per_byte"]
    assert isinstance(report["speed_warnings"], list)
    # Spreads and round counts describe the measurement, not the model: no retention for them.
    assert "speed_rounds" not in a["retention"] and "tokens_per_s_spread_batch8" not in a["retention"]
    assert "tokens_per_s_batch8" in a["retention"]


def test_lm_speed_figures_are_medians_of_the_interleaved_samples(monkeypatch):
    from alambic.evaluate import suite

    new_tokens = 16
    samples = {1: [0.010, 0.010, 0.012, 0.010, 0.010], new_tokens: [0.1, 0.1, 0.1, 0.1, 0.1]}
    noisy = [0.05, 0.1, 0.1, 0.2, 0.3]  # model "b" at batch 8: interquartile range 0.1 over median 0.1 -> 100%

    def fake_interleaved_seconds(runners, rounds):
        assert rounds == 5 and all(length in (1, new_tokens) for _, _, length in runners)
        return {key: (noisy if key == ("b", 8, new_tokens) else samples[key[2]]) for key in runners}

    monkeypatch.setattr(suite, "interleaved_seconds", fake_interleaved_seconds)
    monkeypatch.setattr(suite, "generation_runner", lambda *args: (lambda: None))
    measured, warnings = suite.lm_speeds({"a": (None, None), "b": (None, None)}, ["x"], new_tokens, rounds=5)
    assert measured["a"]["tokens_per_s_batch1"] == pytest.approx(1 * new_tokens / 0.1)
    assert measured["a"]["tokens_per_s_batch8"] == pytest.approx(8 * new_tokens / 0.1)
    assert measured["a"]["ttft_ms_batch8"] == pytest.approx(10.0)
    assert measured["a"]["tokens_per_s_spread_batch8"] == pytest.approx(0.0)
    assert measured["b"]["tokens_per_s_spread_batch8"] == pytest.approx(1.0)
    assert len(warnings) == 1 and warnings[0].startswith("b: batch-8 generation spread 100% over 5 rounds")
