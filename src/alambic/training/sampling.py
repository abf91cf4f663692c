"""Sampling completions for a batch's prompts: the helpers every rollout shares.

Used by the rollouts (training/modes/rollouts.py: on-policy and sequence-level
KD), MiniLLM's mixture sampling (training/modes/minillm.py) and reward
distillation (alambic/reward). The prompt of a row is its leading positions
without a label (prompt_completion and messages data), or its leading
`prompt_fraction` for plain text. Sampling is seeded by (run seed, step, rows),
so a resumed run draws the same samples, and never shifts the global RNG.

    python -c "from alambic.training.sampling import cut_at_eos; print(cut_at_eos([5, 2, 9], 2))"
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alambic.data import IGNORE, collate
from alambic.errors import ConfigError


# ----------------------------------------------------------------------------- prompts and batches


def prompt_lengths(batch: dict, prompt_from_labels: bool, prompt_fraction: float) -> list[int]:
    """Tokens of each row that form its prompt (at least one, so there is a context to sample from)."""
    lengths = []
    for labels, size in zip(batch["labels"].tolist(), batch["attention_mask"].sum(-1).tolist()):
        if prompt_from_labels:
            leading = next((i for i, label in enumerate(labels[:size]) if label != IGNORE), size)
        else:
            leading = int(size * prompt_fraction)
        lengths.append(max(1, min(leading, size)))
    return lengths


def split_prompts(batch: dict, lengths: list[int]) -> list[list[int]]:
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-only generation continues every row from the same last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The completion up to and including its first EOS (what follows is padding)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def rebuild_batch(batch: dict, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """prompt + completion rows: labels are the completion tokens; prompt and padding carry none."""
    rows = [{"input_ids": p + c, "labels": [IGNORE] * len(p) + c} for p, c in zip(prompts, completions)]
    if "weight" in batch:
        for row, weight in zip(rows, batch["weight"].tolist()):
            row["weight"] = weight
    indices = batch["row_index"].tolist() if "row_index" in batch else None
    device = batch["input_ids"].device
    return {k: v.to(device) for k, v in collate(rows, pad_id, indices).items()}


def rollout_seed(seed: int, step: int, batch: dict) -> int:
    """A sampling seed fixed by (run seed, step, rows): resuming re-draws the same samples."""
    rows = batch["row_index"].tolist() if "row_index" in batch else []
    digest = hashlib.sha256(f"{seed}:{step}:{rows}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def samples_at(seed: int, step: int, fraction: float) -> bool:
    """GKD's coin: does step `step` use student samples? The same answer on every rank and resume."""
    return random.Random(f"alambic-rollout:{seed}:{step}").random() < fraction


# ----------------------------------------------------------------------------- sampling


@contextmanager
def eval_mode(*models):
    """Sample in eval mode (no dropout), then give each model back its previous mode."""
    previous = [m.training for m in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, was_training in zip(models, previous):
            model.train(was_training)


def _vocab_limit(model, vocab_size: int | None):
    """Padded embedding rows beyond the tokenizer are not tokens: never sample them."""
    from transformers import LogitsProcessor, LogitsProcessorList

    if vocab_size is None or model.config.vocab_size <= vocab_size:
        return None

    class _TokenizerVocabOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, vocab_size:] = float("-inf")
            return scores

    return LogitsProcessorList([_TokenizerVocabOnly()])


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], options, *, pad_id: int, eos_id: int | None, seed: int,
                vocab_size: int | None = None) -> list[list[int]]:
    """Completions (token lists, cut after EOS) sampled with `model.generate` and its KV cache."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    decoding = {"do_sample": False} if options.greedy else {
        "do_sample": True, "temperature": options.temperature, "top_p": options.top_p, "top_k": 0,
    }
    # A private RNG stream: sampling must not shift the global one the rest of training uses.
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=options.max_new_tokens,
            pad_token_id=pad_id, eos_token_id=eos_id, logits_processor=_vocab_limit(model, vocab_size), **decoding,
        )
    return [cut_at_eos(row, eos_id) for row in output[:, input_ids.shape[1] :].tolist()]


class VLLMSampler:
    """Teacher completions through vLLM (optional extra): the teacher is fixed, so it loads once."""

    def __init__(self, teacher_cfg, options, seed: int):
        vllm = import_vllm()
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=teacher_cfg.model, revision=teacher_cfg.revision, seed=seed,
            dtype="auto" if teacher_cfg.dtype == "auto" else teacher_cfg.dtype,
            trust_remote_code=teacher_cfg.trust_remote_code, gpu_memory_utilization=options.vllm_gpu_memory,
        )

    def __call__(self, model, prompts, options, *, pad_id, eos_id, seed, vocab_size=None) -> list[list[int]]:
        params = self.vllm.SamplingParams(
            temperature=0.0 if options.greedy else options.temperature, top_p=options.top_p,
            max_tokens=options.max_new_tokens, seed=seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [cut_at_eos(list(o.outputs[0].token_ids), eos_id) for o in outputs]


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            "rollout.engine is 'vllm' but the vllm package is not installed",
            "pip install vllm (needs a CUDA GPU), or set rollout.engine: hf",
        ) from None
    return vllm


# ----------------------------------------------------------------------------- MiniLLM's mixture sampling


def mixture_log_probs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_mix: float) -> torch.Tensor:
    """log((1 - a) q + a p), stably."""
    if teacher_mix <= 0.0:
        return student_logprobs
    stacked = torch.stack([student_logprobs + math.log(1.0 - teacher_mix), teacher_logprobs + math.log(teacher_mix)])
    return torch.logsumexp(stacked, dim=0)


@dataclass
class MixtureSamples:
    """Sampled completions and, per sampled token, log q (student), log p (teacher) and log mixture."""

    tokens: list[list[int]]
    student_logprob: list[list[float]]
    teacher_logprob: list[list[float]]
    sampling_logprob: list[list[float]]


def _cache_argument(model) -> str:
    """transformers 5.x calls the KV cache `cache`; 4.x called it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_logprobs(model, cache, step_ids, attention_mask, positions, vocab_size):
    name = _cache_argument(model)
    out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                **{name: cache})
    logits = out.logits[:, -1].float()
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    return F.log_softmax(logits, dim=-1), getattr(out, name)


@torch.no_grad()
def sample_from_mixture(student_model, teacher_model, prompts: list[list[int]], *, max_new_tokens: int,
                        teacher_mix: float, pad_id: int, eos_id: int | None, seed: int,
                        vocab_size: int | None = None) -> MixtureSamples:
    """Token-by-token sampling from (1 - a) q + a p, both models advancing their own KV cache."""
    device = next(student_model.parameters()).device
    step_ids, attention_mask = left_pad(prompts, pad_id, device)
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    generator = torch.Generator(device=device).manual_seed(seed)
    caches: list = [None, None]
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
    columns: dict[str, list[torch.Tensor]] = {"token": [], "student": [], "teacher": [], "sampling": [], "alive": []}
    with eval_mode(student_model, teacher_model):
        for _ in range(max_new_tokens):
            student_lp, caches[0] = _next_logprobs(student_model, caches[0], step_ids, attention_mask, positions, vocab_size)
            teacher_lp, caches[1] = _next_logprobs(teacher_model, caches[1], step_ids, attention_mask, positions, vocab_size)
            sampling_lp = mixture_log_probs(student_lp, teacher_lp, teacher_mix)
            token = torch.multinomial(sampling_lp.exp(), 1, generator=generator)
            for name, values in (("student", student_lp), ("teacher", teacher_lp), ("sampling", sampling_lp)):
                columns[name].append(values.gather(-1, token).squeeze(-1))
            token = token.squeeze(-1)
            columns["token"].append(token)
            columns["alive"].append(alive.clone())
            if eos_id is not None:
                alive = alive & (token != eos_id)
            if not alive.any():
                break
            step_ids = torch.where(alive, token, torch.full_like(token, pad_id)).unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=-1)
            positions = positions[:, -1:] + 1
    return _collect(columns)


def _collect(columns: dict[str, list[torch.Tensor]]) -> MixtureSamples:
    stacked = {name: torch.stack(values, dim=1).tolist() for name, values in columns.items()}
    kept = [[j for j, alive in enumerate(row) if alive] for row in stacked["alive"]]

    def pick(name):
        return [[stacked[name][i][j] for j in keep] for i, keep in enumerate(kept)]

    return MixtureSamples(pick("token"), pick("student"), pick("teacher"), pick("sampling"))
