"""Reward distillation: the teacher's judgement of student samples, distilled into a small reward model.

1. The policy (a student) samples `samples_per_prompt` completions per prompt.
2. The teacher judges each: its mean log-likelihood per completion token given
   the prompt (a local model as the judge; a rubric prompt to an API teacher is
   not implemented here).
3. Within a prompt, every pair whose judge scores differ by more than
   `min_margin` is a preference; a reward model (a sequence classifier with one
   output, initialised from the policy's weights) learns them with the
   Bradley–Terry loss -log sigmoid(r_chosen - r_rejected).
4. On held-out prompts: pairwise accuracy, and best-of-n sampling with the
   reward model against a random sample and the judge's own best, all scored
   by the judge.

Samples and scores are saved (samples.jsonl) and reused when the sampling
settings have not changed; the reward model is written as a normal HF folder.

Why this has its own short optimiser loop (`train_reward_model`) instead of
training/loop.py: the one loop trains a student on rows of tokens, with a
per-position loss against a teacher signal, normalised by the step's loss
tokens over all ranks. A reward model trains on *pairs* of whole sequences
(one scalar per sequence, a pairwise Bradley-Terry loss), on samples drawn and
judged in this process, not on a dataset file; it has no teacher signal and
no per-position loss. Fitting that into the loop would need a second batch
shape and a second normaliser in it. It lives apart, in alambic/reward/, so
that everything under training/ goes through the one loop.

    alambic reward-distill configs/reward.yaml
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from alambic.config import ModelConfig, Strict
from alambic.data import IGNORE, collate, read_records
from alambic.durable import atomic_dir, atomic_write_text
from alambic.errors import ConfigError, DataError, ModelError


class RewardData(Strict):
    prompts: str = Field(description="JSONL / CSV / Parquet file of prompts")
    format: Literal["text", "prompt_completion"] = "text"
    text_column: str = "text"
    prompt_column: str = "prompt"
    prompt_tokens: int = Field(16, ge=1, description="text data: the first N tokens of each record are the prompt")
    limit: int | None = Field(None, ge=1)


class RewardSampling(Strict):
    samples_per_prompt: int = Field(4, ge=2)
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    temperatures: list[float] | None = Field(
        None, description="one temperature per sample of a prompt (overrides temperature): samples of varied quality "
        "give clearer preferences",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    greedy: bool = False  # never true here: n identical samples would give no preference

    @model_validator(mode="after")
    def _one_temperature_per_sample(self) -> "RewardSampling":
        if self.temperatures is not None:
            if len(self.temperatures) != self.samples_per_prompt or min(self.temperatures) <= 0:
                raise ValueError(f"sampling.temperatures needs {self.samples_per_prompt} positive values "
                                 "(one per sample of a prompt)")
        return self
    batch_size: int = Field(32, ge=1, description="sequences per generation / judge batch")


class RewardTraining(Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="preference pairs per step")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    min_margin: float = Field(0.0, ge=0.0, description="judge-score gap below which a pair is not a preference")
    held_out_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of prompts kept for evaluation")
    seed: int = 0
    progress: bool = True


class RewardConfig(Strict):
    """One reward-distillation run."""

    output_dir: str = "runs/reward"
    policy: ModelConfig = Field(description="the student whose samples are judged")
    teacher: ModelConfig = Field(description="the judge")
    judge: Literal["loglik"] = Field("loglik", description="teacher mean log-likelihood per completion token")
    reward_model: ModelConfig | None = Field(None, description="initial weights of the reward model (default: the policy)")
    data: RewardData
    sampling: RewardSampling = RewardSampling()
    train: RewardTraining = RewardTraining()


# ----------------------------------------------------------------------------- prompts, samples, judge


def load_prompts(data: RewardData, tokenizer) -> list[list[int]]:
    records = read_records(data.prompts, data.limit)
    column = data.text_column if data.format == "text" else data.prompt_column
    prompts = []
    for index, record in enumerate(records):
        if column not in record:
            raise DataError(f"{data.prompts}: record {index} has no column {column!r}",
                            f"set data.{'text' if data.format == 'text' else 'prompt'}_column")
        ids = tokenizer(str(record[column]), add_special_tokens=False)["input_ids"]
        if data.format == "text":
            ids = ids[: data.prompt_tokens]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        if ids:
            prompts.append(ids)
    if len(prompts) < 4:
        raise DataError(f"{data.prompts} gives {len(prompts)} prompts; reward distillation needs at least 4",
                        "give more prompts (some are held out for evaluation)")
    return prompts


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def sample_completions(policy, prompts, sampling: RewardSampling, tokenizer, seed: int) -> list[list[list[int]]]:
    """`samples_per_prompt` sampled completions per prompt (KV-cached generate, seeded per chunk)."""
    from alambic.training.sampling import hf_generate

    n = sampling.samples_per_prompt
    temperatures = sampling.temperatures or [sampling.temperature] * n
    by_sample = []  # sample k of every prompt, drawn at temperature k
    for k, temperature in enumerate(temperatures):
        options = sampling.model_copy(update={"temperature": temperature})
        completions = []
        for start, chunk in _chunks(prompts, sampling.batch_size):
            completions += hf_generate(policy, chunk, options, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                       seed=(seed * 1_000_003 + k) * 1_000_003 + start, vocab_size=len(tokenizer))
        by_sample.append(completions)
    return [[by_sample[k][i] for k in range(n)] for i in range(len(prompts))]


@torch.no_grad()
def judge_scores(teacher, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int,
                 vocab_size: int) -> list[float]:
    """The teacher's mean log-probability per completion token, given the prompt."""
    device = next(teacher.parameters()).device
    scores = []
    rows = [{"input_ids": p + c, "labels": [IGNORE] * len(p) + c} for p, c in zip(prompts, completions)]
    for _, chunk in _chunks(rows, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab_size]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logprobs = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores += ((logprobs * mask).sum(-1) / mask.sum(-1).clamp_min(1)).tolist()
    return scores


def preference_pairs(scores: list[list[float]], prompt_ids: list[int], min_margin: float) -> list[tuple]:
    """(prompt, chosen sample, rejected sample) for every pair the judge separates by more than min_margin."""
    pairs = []
    for p in prompt_ids:
        n = len(scores[p])
        for i in range(n):
            for j in range(i + 1, n):
                if abs(scores[p][i] - scores[p][j]) > min_margin:
                    pairs.append((p, i, j) if scores[p][i] > scores[p][j] else (p, j, i))
    return pairs


# ----------------------------------------------------------------------------- the reward model


def load_reward_model(spec: ModelConfig, pad_id: int):
    """A one-output sequence classifier on the given weights (a fresh score head).

    HF pools the last non-pad token, so the model must know the pad id.
    """
    from transformers import AutoModelForSequenceClassification

    from alambic.models.loading import resolve_model_source

    source = resolve_model_source(spec.model, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot build a reward model from {source!r}: {err}",
                         "point reward_model (or policy) at a causal LM folder") from None
    model.config.pad_token_id = pad_id
    return model


def reward_scores(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """One scalar reward per token sequence (gradients flow when the model trains)."""
    device = next(model.parameters()).device
    outputs = []
    for _, chunk in _chunks(sequences, batch_size):
        batch = collate([{"input_ids": s, "labels": s} for s in chunk], pad_id)
        outputs.append(model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits[:, 0])
    return torch.cat(outputs)


def train_reward_model(model, pairs, sequences, train_cfg: RewardTraining, pad_id: int) -> list[float]:
    """Bradley–Terry on (chosen, rejected) pairs; returns the loss of each step."""
    from alambic.training.progress import TrainingProgress

    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    order = random.Random(train_cfg.seed)
    progress = TrainingProgress(train_cfg.steps, 0, enabled=train_cfg.progress, description="reward model")
    losses = []
    model.train()
    for step in range(1, train_cfg.steps + 1):
        chosen_pairs = [pairs[order.randrange(len(pairs))] for _ in range(train_cfg.batch_size)]
        chosen = [sequences[(p, i)] for p, i, _ in chosen_pairs]
        rejected = [sequences[(p, j)] for p, _, j in chosen_pairs]
        rewards = reward_scores(model, chosen + rejected, pad_id)
        loss = -F.logsigmoid(rewards[: len(chosen)] - rewards[len(chosen) :]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.update(step, {"loss": losses[-1]})
    progress.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate_reward_model(model, pairs, sequences, scores, prompt_ids, pad_id: int) -> dict:
    """Pairwise accuracy on `pairs`; best-of-n on `prompt_ids`, every pick scored by the judge."""
    keys = sorted(sequences)
    rewards = dict(zip(keys, reward_scores(model, [sequences[k] for k in keys], pad_id).tolist()))
    correct = sum(rewards[(p, i)] > rewards[(p, j)] for p, i, j in pairs)
    picked, random_pick, best = [], [], []
    for p in prompt_ids:
        n = len(scores[p])
        picked.append(scores[p][max(range(n), key=lambda i: rewards[(p, i)])])
        random_pick.append(sum(scores[p]) / n)  # the expected judge score of a uniformly random sample
        best.append(max(scores[p]))
    return {
        "pairwise_accuracy": correct / max(len(pairs), 1),
        "pairs": len(pairs),
        "best_of_n_judge_score": sum(picked) / len(picked),
        "random_sample_judge_score": sum(random_pick) / len(random_pick),
        "oracle_best_judge_score": sum(best) / len(best),
    }


# ----------------------------------------------------------------------------- the run


def _fingerprint(config: RewardConfig) -> str:
    relevant = config.model_dump(mode="json", include={"policy", "teacher", "judge", "data", "sampling"})
    relevant["seed"] = config.train.seed
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def judged_samples(config: RewardConfig, tokenizer, device) -> list[dict]:
    """Sampled and judged completions, reused from samples.jsonl when the same settings made them."""
    from alambic.models import freeze, load_model

    path = Path(config.output_dir) / "samples.jsonl"
    fingerprint = _fingerprint(config)
    if path.exists():
        saved = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if saved and all(r.get("fingerprint") == fingerprint for r in saved):
            return saved
    prompts = load_prompts(config.data, tokenizer)
    policy = load_model(config.policy, "causal_lm", role="policy").to(device)
    completions = sample_completions(policy, prompts, config.sampling, tokenizer, config.train.seed)
    del policy
    teacher = freeze(load_model(config.teacher, "causal_lm", role="teacher")).to(device)
    flat_prompts = [p for p, group in zip(prompts, completions) for _ in group]
    flat = [c for group in completions for c in group]
    scores = judge_scores(teacher, flat_prompts, flat, tokenizer.pad_token_id, config.sampling.batch_size, len(tokenizer))
    n = config.sampling.samples_per_prompt
    records = [
        {"prompt": k // n, "sample": k % n, "prompt_ids": flat_prompts[k], "completion_ids": flat[k],
         "completion": tokenizer.decode(flat[k], skip_special_tokens=True), "judge_score": scores[k],
         "fingerprint": fingerprint}
        for k in range(len(flat))
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def run_reward_distillation(config: RewardConfig) -> dict:
    from alambic.models import check_tokenizers_compatible, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config.policy, role="policy")
    check_tokenizers_compatible(load_tokenizer(config.teacher, role="teacher"), tokenizer)
    if tokenizer.pad_token_id is None:
        raise ConfigError("the policy's tokenizer has no pad token", "set pad_token in its tokenizer_config.json")
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    records = judged_samples(config, tokenizer, device)
    n_prompts = 1 + max(r["prompt"] for r in records)
    scores = [[0.0] * config.sampling.samples_per_prompt for _ in range(n_prompts)]
    sequences = {}
    for r in records:
        scores[r["prompt"]][r["sample"]] = r["judge_score"]
        sequences[(r["prompt"], r["sample"])] = r["prompt_ids"] + r["completion_ids"]
    order = list(range(n_prompts))
    random.Random(config.train.seed).shuffle(order)
    n_held_out = max(1, round(n_prompts * config.train.held_out_fraction))
    held_out, train_prompts = sorted(order[:n_held_out]), sorted(order[n_held_out:])
    train_pairs = preference_pairs(scores, train_prompts, config.train.min_margin)
    if not train_pairs:
        raise DataError("no preference pair: the judge scores every sample of a prompt the same (within min_margin)",
                        "lower train.min_margin, raise sampling.temperature or samples_per_prompt")
    torch.manual_seed(config.train.seed)
    model = load_reward_model(config.reward_model or config.policy, tokenizer.pad_token_id).to(device)
    held_out_pairs = preference_pairs(scores, held_out, config.train.min_margin)
    before = evaluate_reward_model(model, held_out_pairs, sequences, scores, held_out, tokenizer.pad_token_id)
    losses = train_reward_model(model, train_pairs, sequences, config.train, tokenizer.pad_token_id)
    metrics = {
        "train": evaluate_reward_model(model, train_pairs, sequences, scores, train_prompts, tokenizer.pad_token_id),
        "held_out": evaluate_reward_model(model, held_out_pairs, sequences, scores, held_out, tokenizer.pad_token_id),
        "held_out_before_training": before,
        "first_loss": losses[0], "last_loss": losses[-1],
        "prompts": {"train": len(train_prompts), "held_out": len(held_out)},
    }
    _save(model, tokenizer, Path(config.output_dir), metrics)
    return metrics


def _save(model, tokenizer, folder: Path, metrics: dict) -> None:
    with atomic_dir(folder / "reward_model") as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
