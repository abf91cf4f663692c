"""Backoff, Retry-After, text similarity, label parsing, recipes and filters, without any server."""

from __future__ import annotations

import json
import random
import time
from email.utils import formatdate

import pytest

from alambic.errors import DataError
from alambic.generate.config import FilterConfig, GenerateConfig, RetryConfig
from alambic.generate.filters import Example, ExampleFilter
from alambic.generate.recipes import LabelParser, Rejection, build_recipe
from alambic.generate.retry import backoff_delay, parse_retry_after
from alambic.generate.selfinstruct import split_proposals
from alambic.generate.textsim import NearDuplicateIndex, NgramIndex, rouge_l, words


def test_retry_after_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 8 <= parse_retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_backoff_grows_with_jitter_and_never_undercuts_retry_after():
    policy = RetryConfig(base_delay_s=0.1, max_delay_s=1.0, max_retry_after_s=5.0)
    rng = random.Random(0)
    first = [backoff_delay(1, None, policy, rng) for _ in range(200)]
    sixth = [backoff_delay(6, None, policy, rng) for _ in range(200)]
    assert max(first) <= 0.1 and max(sixth) <= 1.0
    assert sum(sixth) / 200 > 3 * sum(first) / 200  # exponential growth, up to the cap
    assert len({round(d, 6) for d in first}) > 150  # jittered, not in lockstep
    honoured = [backoff_delay(1, 2.0, policy, rng) for _ in range(100)]
    assert min(honoured) >= 2.0 and max(honoured) <= 2.0 + 0.1 + 1e-9
    assert min(backoff_delay(1, 3600.0, policy, rng) for _ in range(20)) >= 5.0  # capped, not ignored
    assert max(backoff_delay(1, 3600.0, policy, rng) for _ in range(20)) < 6.0


def test_rouge_l_and_near_duplicates():
    assert rouge_l(words("a b c d"), words("a c d e")) == pytest.approx(0.75)
    assert rouge_l(words("x y"), words("p q")) == 0.0
    index = NearDuplicateIndex("rouge_l")
    index.add("Write a short poem about the sea.")
    score, closest = index.closest("write a short poem about the ocean", 0.7)
    assert closest is not None and score == pytest.approx(6 / 7)  # LCS "write a short poem about the"
    assert index.closest("List three prime numbers below twenty.", 0.7)[1] is None
    ngram_index = NearDuplicateIndex("ngram", n=2)
    ngram_index.add("name three famous painters of the renaissance")
    assert ngram_index.closest("name three famous painters of france", 0.5)[1] is not None


def test_ngram_index_overlap_share():
    index = NgramIndex(3)
    index.add("the quick brown fox jumps over the lazy dog")
    share, found = index.overlap("a quick brown fox jumps high")  # 4 trigrams, 2 shared
    assert (share, found) == (0.5, 2)
    assert index.overlap("too short") == (0.0, 0)


def test_label_parser_accepts_only_the_allowed_set():
    parser = LabelParser(["positive", "negative"], None, False, "test")
    assert parser.parse("Positive.")[0] == "positive"
    assert parser.parse("  NEGATIVE\n")[0] == "negative"
    label, why = parser.parse("probably positive")
    assert label is None and "not one of" in why
    assert parser.parse("neutral")[0] is None
    with_pattern = LabelParser(["positive", "negative"], r"Label:\s*(\w+)", False, "test")
    assert with_pattern.parse("I think... Label: negative")[0] == "negative"
    assert with_pattern.parse("negative")[1] == "the label pattern did not match"


def make_config(**sections) -> GenerateConfig:
    raw = {"teacher": {"model": "m", "base_url": "http://127.0.0.1:1/v1"}, "input": {"path": "x.jsonl"}}
    raw.update(sections)
    return GenerateConfig.model_validate(raw)


def test_step_by_step_makes_two_weighted_tasks():
    config = make_config(recipe={"kind": "step_by_step", "labels": ["yes", "no"], "rationale_weight": 0.3})
    recipe = build_recipe(config)
    records = recipe.parse({"prompt": "is water wet?"}, "Rationale: water makes things wet. Answer: Yes")
    assert [(r["prompt"], r["completion"], r["weight"]) for r in records] == [
        ("[label] is water wet?", "yes", 1.0), ("[rationale] is water wet?", "water makes things wet.", 0.3)]
    assert isinstance(recipe.parse({"prompt": "q"}, "Answer: yes"), Rejection)
    assert isinstance(recipe.parse({"prompt": "q"}, "Rationale: because. Answer: maybe"), Rejection)


def test_context_recipe_hides_the_engineered_context_from_the_student():
    config = make_config(
        prompt={"system": "SECRET SYSTEM", "template": "Q: {prompt} (think hard)",
                "few_shot": [{"user": "Q: 1+1?", "assistant": "Final answer: 2"}]},
        recipe={"kind": "context", "final_answer_pattern": r"(?is)final answer:\s*(.+)$"},
    )
    recipe = build_recipe(config)
    teacher = recipe.teacher_messages({"prompt": "2+2?"})
    assert teacher[0] == {"role": "system", "content": "SECRET SYSTEM"}
    assert teacher[-1]["content"] == "Q: 2+2? (think hard)" and len(teacher) == 4
    (record,) = recipe.parse({"prompt": "2+2?"}, "scratch: 2+2=4\nFinal answer: 4")
    assert record == {"prompt": "2+2?", "completion": "4"}
    assert isinstance(recipe.parse({"prompt": "2+2?"}, "4"), Rejection)


def test_template_naming_a_missing_column_is_a_data_error():
    recipe = build_recipe(make_config(prompt={"template": "{title}: {prompt}"}))
    with pytest.raises(DataError, match=r"\{title\}.*columns: prompt"):
        recipe.teacher_messages({"prompt": "x"})


def test_filters_length_refusal_duplicates_and_contamination(tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"question": "what is the capital city of france today"}) + "\n")
    config = FilterConfig(min_chars=2, max_chars=40, contamination={
        "eval_sets": [{"path": str(eval_path), "columns": ["question"], "name": "geo"}],
        "ngram": 3, "threshold": 0.5, "drop": True})
    examples = [Example(i, 0, [{"prompt": p, "completion": c}]) for i, (p, c) in enumerate([
        ("q1", "fine answer"), ("q2", "x"), ("q3", "y" * 41), ("q4", "I'm sorry, I cannot help with that."),
        ("q1", "Fine  answer!"), ("what is the capital city of france today", "Paris")])]
    kept, rejected = ExampleFilter(config).apply(examples)
    assert [e.source_id for e in kept] == [0]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        (1, "too_short"), (2, "too_long"), (3, "refusal"), (4, "duplicate"), (5, "contaminated")]


def test_contamination_report_without_dropping(tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"prompt": "one two three four"}) + "\n")
    example_filter = ExampleFilter(FilterConfig(contamination={
        "eval_sets": [{"path": str(eval_path)}], "ngram": 2, "threshold": 0.6, "drop": False}))
    examples = [Example(0, 0, [{"prompt": "one two three", "completion": "four"}]),
                Example(1, 0, [{"prompt": "five six", "completion": "seven"}])]
    kept, rejected = example_filter.apply(examples)
    report = example_filter.contamination.report()
    assert len(kept) == 2 and not rejected
    assert report["eval_sets"]["eval"]["flagged"] == 1
    assert report["eval_sets"]["eval"]["examples"][0]["id"] == 0


def test_split_proposals_reads_numbered_and_plain_lists():
    assert split_proposals("4. Write a poem.\n5) Name a river.\n- Sort a list") == [
        "Write a poem.", "Name a river.", "Sort a list"]
    assert split_proposals("Write a poem.\n\nName a river.") == ["Write a poem.", "Name a river."]


def test_progress_line_shows_rates_and_eta():
    import io

    from rich.console import Console

    from alambic.generate.progress import GenerationProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
    with GenerationProgress(True, total=10, already_done=2, description="answers", console=console) as progress:
        time.sleep(0.05)
        progress.advance(4, 120)
        progress._progress.refresh()
    text = console.file.getvalue()
    assert "6/10" in text and "req/s" in text and "tok/s" in text and "ETA" in text
    requests_per_s = float(text.split(" req/s")[-2].split()[-1])  # the last refresh
    assert 0 < requests_per_s <= 4 / 0.05
    assert progress.requests == 4 and progress.tokens == 120


def test_vllm_is_imported_only_when_chosen(monkeypatch):
    import sys

    from alambic.errors import ConfigError
    from alambic.generate.backends import make_backend
    from alambic.generate.config import TeacherBackendConfig

    make_backend(TeacherBackendConfig(model="m", base_url="http://127.0.0.1:1/v1"), None)
    assert "vllm" not in sys.modules
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"alambic\[vllm\]"):
        make_backend(TeacherBackendConfig(backend="vllm", model="m"), None)
