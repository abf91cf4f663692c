"""Each recipe config in configs/ run end to end against a rule-based OpenAI-compatible server.

The server answers by rule so the tests can check parsing, filtering and the
student data exactly; the real-model server tests are in test_generate_real_server.py.
"""

from __future__ import annotations

import hashlib

from helpers_generate import read_jsonl, invoke_cli, summary_of, write_jsonl

SECRET = "sk-test-0123456789abcdefSECRET"


def review_label(messages, body):
    text = messages[-1]["content"].lower()
    if "meh" in text:
        return "I would say it is neutral"  # not an allowed label: must be rejected, not guessed
    return "Positive." if ("good" in text or "great" in text) else "negative"


def test_label_recipe_parses_rejects_prices_and_drops_contamination(scripted_server, config_from, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = scripted_server(review_label, api_key=SECRET)
    reviews = ["a good film", "an awful plot", "meh whatever", "great actors and a great story today",
               "bad bad bad", "the cat sat on the mat and it was good"]
    inputs = write_jsonl(tmp_path / "reviews.jsonl", [{"text": t, "gold": "x"} for t in reviews])
    eval_set = write_jsonl(tmp_path / "test.jsonl", [{"text": "the cat sat on the mat and it was good"}])
    config = config_from(
        "generate_label.yaml", teacher={"base_url": server.base_url},
        input={"path": str(inputs), "keep_columns": ["gold"]},
        filters={"dedupe": False, "contamination": {"eval_sets": [{"path": str(eval_set), "columns": ["text"],
                                                                   "name": "reviews_test"}],
                                                    "ngram": 4, "threshold": 0.5, "drop": True}})
    assert invoke_cli("generate", config) == 0
    run = tmp_path / "run"
    train = read_jsonl(run / "train.jsonl")
    assert [(r["text"], r["label"], r["gold"]) for r in train] == [
        ("a good film", "positive", "x"), ("an awful plot", "negative", "x"),
        ("great actors and a great story today", "positive", "x"), ("bad bad bad", "negative", "x")]
    assert all(r["prompt"] == r["text"] for r in train)  # student_template is the bare text
    rejected = {r["id"]: r["reason"] for r in read_jsonl(run / "rejected.jsonl")}
    assert rejected == {2: "unparseable", 5: "contaminated"}
    summary = summary_of(run)
    assert summary["student"]["rejected_by_reason"] == {"unparseable": 1, "contaminated": 1}
    assert summary["contamination"] == {"reviews_test": 1}
    teacher = read_jsonl(run / "teacher.jsonl")
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in teacher)
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in teacher)
    assert summary["tokens"]["dataset"] == {"prompt": prompt_tokens, "completion": completion_tokens}
    expected_cost = prompt_tokens / 1e6 * 0.15 + completion_tokens / 1e6 * 0.60
    assert abs(summary["cost"]["this_run"] - expected_cost) < 1e-9 and summary["cost"]["currency"] == "USD"


def rationale_then_answer(messages, body):
    text = messages[-1]["content"]
    if "plot" in text:
        return "I refuse to follow the format."
    verdict = "positive" if "good" in text else "negative"
    return f"Rationale: the review says {text.split()[-1]}. Answer: {verdict}"


def test_step_by_step_recipe_writes_weighted_label_and_rationale_tasks(scripted_server, config_from, tmp_path):
    server = scripted_server(rationale_then_answer)
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ["a good movie", "a bad movie", "what a plot"]])
    config = config_from("stepbystep_label.yaml", teacher={"base_url": server.base_url},
                         input={"path": str(inputs)})
    assert invoke_cli("generate", config) == 0
    train = read_jsonl(tmp_path / "run" / "train.jsonl")
    assert [(r["prompt"], r["completion"], r["weight"], r["task"]) for r in train] == [
        ("[label] a good movie", "positive", 1.0, "label"),
        ("[rationale] a good movie", "the review says movie.", 0.5, "rationale"),
        ("[label] a bad movie", "negative", 1.0, "label"),
        ("[rationale] a bad movie", "the review says movie.", 0.5, "rationale"),
    ]
    assert [r["reason"] for r in read_jsonl(tmp_path / "run" / "rejected.jsonl")] == ["unparseable"]


def tutor_with_context(messages, body):
    assert messages[0]["role"] == "system" and "patient tutor" in messages[0]["content"]
    assert messages[1]["content"].startswith("Question: what is 12 times 3")  # the few-shot example
    question = messages[-1]["content"].removeprefix("Question: ")
    return f"Scratchpad: thinking about {question}\nFinal answer: the answer to {question}"


def test_context_distillation_keeps_only_bare_prompt_and_final_answer(scripted_server, config_from, tmp_path):
    server = scripted_server(tutor_with_context)
    inputs = write_jsonl(tmp_path / "q.jsonl", [{"question": "why is the sky blue"}, {"question": "what is 2+2"}])
    config = config_from("context_distill.yaml", teacher={"base_url": server.base_url}, input={"path": str(inputs)})
    assert invoke_cli("generate", config) == 0
    train = read_jsonl(tmp_path / "run" / "train.jsonl")
    assert [r["messages"] for r in train] == [
        [{"role": "user", "content": "why is the sky blue"},
         {"role": "assistant", "content": "the answer to why is the sky blue"}],
        [{"role": "user", "content": "what is 2+2"}, {"role": "assistant", "content": "the answer to what is 2+2"}],
    ]
    text = (tmp_path / "run" / "train.jsonl").read_text()
    assert "patient tutor" not in text and "Scratchpad" not in text and "Question:" not in text


TASKS = ["Write a haiku about autumn leaves falling.", "Name three rivers in Africa and their lengths.",
         "Summarise the plot of a fairy tale in two sentences.", "Explain how a bicycle gear works.",
         "Suggest a name for a bakery that sells only bread.", "Describe the smell of rain on hot stone."]


def propose_or_answer(messages, body):
    text = messages[-1]["content"]
    if "new, diverse tasks" not in text:
        return f"Here is my answer to: {text}"
    start = int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(TASKS)
    picked = [TASKS[(start + i) % len(TASKS)] for i in range(3)] + ["ok", TASKS[0]]
    return "\n".join(f"{i}. {task}" for i, task in enumerate(picked, start=5))


def test_self_instruct_filters_near_duplicates_answers_the_rest_and_replays(scripted_server, config_from, tmp_path):
    server = scripted_server(propose_or_answer)
    config = config_from("selfinstruct_seed.yaml", teacher={"base_url": server.base_url},
                         recipe={"rounds": 2, "proposals_per_round": 3})
    assert invoke_cli("generate", config) == 0
    run = tmp_path / "run"
    proposals = read_jsonl(run / "proposals.jsonl")
    accepted = [p["instruction"] for p in proposals if p["accepted"]]
    reasons = {p["instruction"]: p["reason"] for p in proposals if not p["accepted"]}
    assert reasons["Write a haiku about autumn leaves falling."] == "near_duplicate"  # ROUGE-L 0.92 with a seed
    assert reasons["ok"] == "too_short"
    assert len(accepted) == len(set(accepted)) and set(accepted) <= set(TASKS[1:])
    train = read_jsonl(run / "train.jsonl")
    assert [r["prompt"] for r in train] == accepted
    assert all(r["completion"] == f"Here is my answer to: {r['prompt']}" for r in train)
    answered = len(server.log)
    assert answered == 6 + len(accepted)  # 2 rounds x 3 proposals, then one answer per new instruction
    assert invoke_cli("generate", config) == 0  # a rerun replays every round from the cache
    assert len(server.log) == answered
    assert read_jsonl(run / "train.jsonl") == train


def test_samples_seeds_logprobs_and_resume(scripted_server, config_from, tmp_path):
    server = scripted_server()
    inputs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    config = config_from("generate_answer.yaml", teacher={"base_url": server.base_url}, input={"path": str(inputs)},
                         sampling={"n": 3, "seed": 5, "top_logprobs": 2}, filters={"dedupe": False})
    assert invoke_cli("generate", config) == 0
    assert sorted(seed for _, _, seed in server.log) == sorted([5, 6, 7] * 4)
    teacher = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    assert [(r["id"], r["sample_index"]) for r in teacher] == [(i, s) for i in range(4) for s in range(3)]
    assert all(r["teacher"]["model"] == "Qwen/Qwen2.5-1.5B-Instruct" and r["params"]["top_logprobs"] == 2
               and r["finish_reason"] == "stop" and r["time"] for r in teacher)
    train = read_jsonl(tmp_path / "run" / "train.jsonl")
    first = train[0]["completion_logprobs"]
    assert [entry["token"] for entry in first] == train[0]["completion"].split()
    assert all(len(entry["top"]) == 2 for entry in first)
    assert invoke_cli("generate", config) == 0
    assert len(server.log) == 12  # nothing sent again
    assert summary_of(tmp_path / "run")["requests"]["from_cache"] == 12


def test_requests_in_flight_never_exceed_the_bound(scripted_server, config_from, tmp_path):
    server = scripted_server(delay_s=0.05)
    inputs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(15)])
    config = config_from("generate_answer.yaml", teacher={"base_url": server.base_url, "max_in_flight": 3},
                         input={"path": str(inputs)})
    assert invoke_cli("generate", config) == 0
    assert len(server.log) == 15 and server.peak_active == 3
