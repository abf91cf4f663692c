"""Training on generated data with the teacher's stored logprobs as soft targets (data.logprobs_column).

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/recipes/test_record_logprobs.py -q
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import invoke, write_config

from alambic.config import DataConfig, DistillConfig
from alambic.data import collate, tokenize_records
from alambic.data.stdlib_corpus import build_tokenizer
from alambic.losses.sparse import fused_sparse_distillation_loss, sparse_per_token_distillation_loss
from alambic.losses.sparse import sparse_token_divergence
from alambic.teachers.base import SignalRequest
from alambic.teachers.record_logprobs import RecordLogprobTeacher
from alambic.testing import save_model_with_tokenizer, tiny_llama

TEXTS = ["the cat sat on the mat. the dog ate the bone.", "a bird sang in the tree while the cat slept.",
         "we went to the market and bought bread, milk and fish.", "the old man read a book by the fire."]
PROMPTS = ["tell me about the cat", "what did the dog do", "where did we go", "who read the book"]
COMPLETIONS = ["the cat sat on the mat", "the dog ate the bone", "we went to the market", "the old man read a book",
               "a bird sang in the tree", "we bought bread and fish", "the cat slept by the fire", "the man sat"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TEXTS * 20, vocab_size=300).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def single_token_ids(tokenizer) -> list[int]:
    """Ids whose text, tokenized alone, is that id again (what a server's token text must be)."""
    specials = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in specials and encode(tokenizer, tokenizer.decode([i])) == [i]]


def token_entries(tokenizer, completion: str, rng: random.Random, sampled_in_top: float = 0.5, k: int = 3,
                  top_mass: float = 0.9) -> list[dict]:
    """completion_logprobs as a server writes them: the completion's tokens, each with a random top-k."""
    candidates = single_token_ids(tokenizer)
    entries = []
    for token_id in encode(tokenizer, completion):
        others = rng.sample([c for c in candidates if c != token_id], k)
        top_ids = [token_id, *others[: k - 1]] if rng.random() < sampled_in_top else others
        weights = sorted((rng.random() + 0.2 for _ in top_ids), reverse=True)
        probs = [top_mass * w / sum(weights) for w in weights]
        sampled_logprob = math.log(probs[top_ids.index(token_id)]) if token_id in top_ids else math.log(0.05)
        top = [{"token": tokenizer.decode([t]), "logprob": math.log(p)} for t, p in zip(top_ids, probs)]
        entries.append({"token": tokenizer.decode([token_id]), "logprob": sampled_logprob, "top": top})
    return entries


def data_config(**fields) -> DataConfig:
    return DataConfig(train="unused.jsonl", format="prompt_completion", logprobs_column="completion_logprobs",
                      max_length=64, **fields)


def test_row_holds_teacher_topk_at_the_position_before_each_token(tokenizer):
    rng = random.Random(0)
    completion = COMPLETIONS[0]
    entries = token_entries(tokenizer, completion, rng)
    assert len(encode(tokenizer, " cat sat")) > 1
    entries[2]["top"].append({"token": " cat sat", "logprob": math.log(0.04)})  # two student tokens: dropped
    record = {"prompt": PROMPTS[0], "completion": completion, "completion_logprobs": entries}
    [row] = tokenize_records([record], tokenizer, data_config(), "mem")

    prompt_ids = [tokenizer.bos_token_id, *encode(tokenizer, PROMPTS[0])]
    completion_ids = encode(tokenizer, completion)
    assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    first = len(prompt_ids) - 1  # the last prompt position predicts the first completion token
    soft_positions = range(first, first + len(completion_ids))
    for position in range(len(row["input_ids"])):
        if position not in soft_positions:
            assert row["topk_ids"][position] == [] and row["topk_logprobs"][position] == []
    for j, entry in enumerate(entries):
        ids, logprobs = row["topk_ids"][first + j], row["topk_logprobs"][first + j]
        assert row["input_ids"][first + j + 1] in ids  # the sampled token is among the targets of its position
        expected = {encode(tokenizer, alt["token"])[0]: alt["logprob"] for alt in entry["top"]
                    if len(encode(tokenizer, alt["token"])) == 1}
        expected.setdefault(completion_ids[j], entry["logprob"])
        assert dict(zip(ids, logprobs)) == pytest.approx(expected)

    batch = collate([row], tokenizer.pad_token_id)
    signal = RecordLogprobTeacher()(batch, SignalRequest())
    assert signal.topk_ids.shape[:2] == batch["input_ids"].shape and signal.temperature == 1.0
    assert signal.extras["kd_mask"][0].nonzero().flatten().tolist() == list(soft_positions)
    for j in range(len(completion_ids)):
        kept = sum(math.exp(v) for v in row["topk_logprobs"][first + j])
        assert float(signal.tail_logmass[0, first + j]) == pytest.approx(math.log(1 - kept), abs=1e-5)
    # Computed from the record itself: the two-token alternative's 0.04 is tail mass, the sampled token is not.
    single = [alt for alt in entries[2]["top"] if len(encode(tokenizer, alt["token"])) == 1]
    kept = sum(math.exp(alt["logprob"]) for alt in single)
    if entries[2]["token"] not in [alt["token"] for alt in single]:
        kept += math.exp(entries[2]["logprob"])
    assert len(single) == len(entries[2]["top"]) - 1
    assert float(signal.tail_logmass[0, first + 2]) == pytest.approx(math.log(1 - kept), abs=1e-5)


def test_record_whose_token_is_not_one_student_token_falls_back_and_is_counted(tokenizer, capsys):
    rng = random.Random(1)
    good = {"prompt": PROMPTS[1], "completion": COMPLETIONS[1],
            "completion_logprobs": token_entries(tokenizer, COMPLETIONS[1], rng)}
    merged = token_entries(tokenizer, COMPLETIONS[2], rng)
    joined = merged[0]["token"] + merged[1]["token"]  # still spells the completion, but is two student tokens
    assert len(encode(tokenizer, joined)) == 2
    merged[0:2] = [{**merged[0], "token": joined}]
    misspelled = token_entries(tokenizer, COMPLETIONS[3], rng)
    records = [good, {"prompt": PROMPTS[2], "completion": COMPLETIONS[2], "completion_logprobs": merged},
               {"prompt": PROMPTS[3], "completion": COMPLETIONS[4], "completion_logprobs": misspelled},
               {"prompt": PROMPTS[0], "completion": COMPLETIONS[5]}]
    rows = tokenize_records(records, tokenizer, data_config(), "gen.jsonl")

    assert any(rows[0]["topk_ids"]) and all("topk_ids" not in row for row in rows[1:])
    for row, record in zip(rows[1:], records[1:]):  # hard targets: the text's own tokenization
        prompt_ids = [tokenizer.bos_token_id, *encode(tokenizer, record["prompt"])]
        assert row["input_ids"] == prompt_ids + encode(tokenizer, record["completion"]) + [tokenizer.eos_token_id]
    err = " ".join(capsys.readouterr().err.split())
    assert "gen.jsonl: 2 of 4 records fell back to hard targets" in err and "record 1" in err
    assert "1 of 4 records have no 'completion_logprobs'" in err
    batch = collate(rows, tokenizer.pad_token_id)
    kd_mask = RecordLogprobTeacher()(batch, SignalRequest()).extras["kd_mask"]
    assert kd_mask[0].any() and not kd_mask[1:].any()


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "tvd"])
def test_padding_entries_add_nothing_and_masked_positions_learn_the_label_alone(objective):
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 11), torch.randn(6, 11).log_softmax(-1)
    logprobs, ids = teacher.topk(3)
    tail = torch.log1p(-logprobs.exp().sum(-1))
    padded_ids = torch.cat([ids, torch.full((6, 2), -1)], -1)
    padded_logprobs = torch.cat([logprobs, torch.zeros(6, 2)], -1)
    plain = sparse_token_divergence(logits, ids, logprobs, tail, objective)
    assert torch.allclose(sparse_token_divergence(logits, padded_ids, padded_logprobs, tail, objective), plain)

    labels, kd_mask = torch.randint(0, 11, (6,)), torch.tensor([True, False, True, True, False, True])
    out = sparse_per_token_distillation_loss(logits, padded_ids, padded_logprobs, tail, labels, objective=objective,
                                             alpha=0.3, kd_mask=kd_mask)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(out["loss"][~kd_mask], ce[~kd_mask]) and (out["kd"][~kd_mask] == 0).all()
    assert torch.allclose(out["loss"][kd_mask], 0.3 * ce[kd_mask] + 0.7 * plain[kd_mask])

    hidden, head = torch.randn(6, 4, requires_grad=True), torch.randn(11, 4)
    options = {"objective": objective, "alpha": 0.0}
    fused = fused_sparse_distillation_loss(hidden, head, None, labels, None, topk_ids=padded_ids,
                                           topk_logprobs=padded_logprobs, tail_logmass=tail, kd_mask=kd_mask,
                                           chunk_size=4, **options)
    (fused_grad,) = torch.autograd.grad(fused["loss"], hidden)
    reference = sparse_per_token_distillation_loss(hidden @ head.T, padded_ids, padded_logprobs, tail, labels,
                                                   kd_mask=kd_mask, **options)["loss"].sum()
    (reference_grad,) = torch.autograd.grad(reference, hidden)
    assert torch.allclose(fused["loss"], reference) and torch.allclose(fused_grad, reference_grad, atol=1e-6)


def write_soft_dataset(path, tokenizer, seed: int = 0) -> list[dict]:
    """Records whose teacher never ranks the sampled token first: only the soft targets point at top-1."""
    rng = random.Random(seed)
    records = [{"prompt": PROMPTS[i % len(PROMPTS)], "completion": completion,
                "completion_logprobs": token_entries(tokenizer, completion, rng, sampled_in_top=0.0, top_mass=0.9)}
               for i, completion in enumerate(COMPLETIONS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def soft_target_agreement(model_dir, rows, pad_id) -> tuple[float, float]:
    """(mean sparse KD, share of positions where the student ranks the teacher's top-1 above the label)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = collate(rows, pad_id)
    signal = RecordLogprobTeacher()(batch, SignalRequest())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd_mask = signal.extras["kd_mask"][:, :-1]
    kd = sparse_token_divergence(logits[:, :-1], signal.topk_ids[:, :-1], signal.topk_logprobs[:, :-1],
                                 signal.tail_logmass[:, :-1])[kd_mask]
    best = signal.topk_logprobs.masked_fill(signal.topk_ids < 0, -1e9).argmax(-1, keepdim=True)
    top1 = signal.topk_ids.gather(-1, best)[:, :-1].clamp_min(0)  # -1 only where kd_mask is off
    logprobs = logits[:, :-1].log_softmax(-1)
    label_logprobs = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    prefers_top1 = logprobs.gather(-1, top1).squeeze(-1) > label_logprobs
    return float(kd.mean()), float(prefers_top1[kd_mask].float().mean())


def soft_config(tmp_path, tokenizer_dir, tokenizer, **loss) -> dict:
    student = save_model_with_tokenizer(tiny_llama(len(tokenizer), hidden=32, layers=2, heads=2, seed=3),
                                        tokenizer_dir, tmp_path / "student_init")
    train = tmp_path / "train.jsonl"
    write_soft_dataset(train, tokenizer)
    return {
        "student": {"model": str(student)},
        "data": {"train": str(train), "format": "prompt_completion", "logprobs_column": "completion_logprobs",
                 "max_length": 64},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.0, **loss},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 60, "batch_size": 8, "lr": 1e-2,
                  "warmup_steps": 0, "progress": False, "cpu": True},
    }


def test_training_on_stored_logprobs_moves_the_student_to_the_teacher_top1(tmp_path, tokenizer_dir, tokenizer):
    from alambic.training.loop import run_distillation

    mapping = soft_config(tmp_path, tokenizer_dir, tokenizer)
    config = DistillConfig.model_validate(mapping)
    rows = tokenize_records([json.loads(line) for line in open(mapping["data"]["train"])], tokenizer, config.data, "t")
    kd_before, top1_before = soft_target_agreement(mapping["student"]["model"], rows, tokenizer.pad_token_id)

    result = run_distillation(config)
    kd_after, top1_after = soft_target_agreement(result.output_dir / "final", rows, tokenizer.pad_token_id)
    assert kd_after < 0.5 * kd_before, (kd_before, kd_after)
    # The labels (sampled tokens) are never the teacher's top-1 here: only the soft targets teach this.
    assert top1_before < 0.7 and top1_after > 0.9, (top1_before, top1_after)
    history = result.history
    assert history[-1]["kd"] < 0.5 * history[0]["kd"]
    card = (result.output_dir / "final" / "README.md").read_text()
    assert "completion_logprobs" in card


def test_temperature_other_than_one_is_a_clear_error(tmp_path, tokenizer_dir, tokenizer, capsys):
    config = write_config(tmp_path / "soft.yaml", soft_config(tmp_path, tokenizer_dir, tokenizer, temperature=2.0))
    code, _, err = invoke(capsys, "distill", config)
    assert code == 2
    assert "loss.temperature is 2.0" in err and "cannot be re-tempered" in err and "set loss.temperature=1" in err
    assert not (tmp_path / "run").exists()


def test_generated_hf_records_train_with_their_token_ids(tmp_path, tokenizer_dir, tokenizer, capsys):
    """alambic generate (local hf backend, real logprobs) -> alambic distill on its train.jsonl, no fallback."""
    teacher = save_model_with_tokenizer(tiny_llama(len(tokenizer), hidden=32, layers=2, heads=2, seed=7),
                                        tokenizer_dir, tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    generate = write_config(tmp_path / "generate.yaml", {
        "teacher": {"backend": "hf", "model": str(teacher), "batch_size": 4, "device": "cpu", "dtype": "float32"},
        "sampling": {"n": 2, "temperature": 1.0, "seed": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 4},
        "input": {"path": str(prompts)}, "filters": {"dedupe": False, "min_chars": 0},
        "output": {"dir": str(tmp_path / "generated"), "format": "jsonl"}, "progress": False})
    code, _, err = invoke(capsys, "generate", generate)
    assert code == 0, err
    train = tmp_path / "generated" / "train.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    assert records and all(r["completion_logprobs"] for r in records)

    mapping = soft_config(tmp_path, tokenizer_dir, tokenizer)
    mapping["data"]["train"] = str(train)
    mapping["train"]["max_steps"] = 3
    code, _, err = invoke(capsys, "distill", write_config(tmp_path / "soft.yaml", mapping))
    assert code == 0, err
    assert "fell back" not in err and "have no" not in err
    rows = tokenize_records(records, tokenizer, DistillConfig.model_validate(mapping).data, "generated")
    for row, record in zip(rows, records):
        first = next(position for position, label in enumerate(row["labels"]) if label != -100) - 1
        token_ids = [entry["token_id"] for entry in record["completion_logprobs"]]
        assert row["input_ids"][first + 1 : first + 1 + len(token_ids)] == token_ids
        for j, entry in enumerate(record["completion_logprobs"]):
            assert row["topk_ids"][first + j][:4] == [alt["token_id"] for alt in entry["top"]]
