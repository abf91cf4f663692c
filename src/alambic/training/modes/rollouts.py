"""Rollouts: where the completions of a batch come from (`rollout.policy`).

- `off_policy` (default): the dataset's completions, nothing to do here.
- `on_policy` (GKD, Agarwal et al. 2024): on a fraction `rollout.lambda` of the
  steps, chosen by a coin seeded with (train.seed, step) so a resumed run flips
  the same coins, the student samples completions for the batch's prompts; the
  teacher scores prompt + sample through the run's normal teacher source and
  the configured objective (GKD: jsd with beta) trains on the sampled tokens.
  lambda = 0 is off-policy KD, lambda = 1 fully on-policy.
- `sequence_level` (Kim & Rush 2016): the teacher model writes the completions
  (sampled, or greedy with `rollout.greedy`, then cached per row) and the
  student learns them with the configured loss (alpha = 1: plain CE on them).
- `minillm`: see `alambic.training.modes.minillm`.

The prompt of a row is its leading positions without a label (prompt_completion
and messages data), or its leading `rollout.prompt_fraction` for plain text.
Sampling uses `model.generate` with its KV cache, under no_grad in eval mode;
`rollout.engine: vllm` (sequence_level only, optional extra) uses vLLM.

    alambic distill configs/onpolicy_gkd.yaml
    alambic distill configs/seqkd.yaml
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager

import torch

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


# ----------------------------------------------------------------------------- rollouts


class PromptRollout:
    """Replaces each row's completion with one sampled from `model` for the row's prompt."""

    def __init__(self, setup, config, model, sampler=hf_generate, fraction: float = 1.0, cache: bool = False):
        data = config.data
        self.model = model
        self.sampler = sampler
        self.options = config.rollout
        self.fraction = fraction
        self.seed = config.train.seed
        self.prompt_from_labels = data.format in ("prompt_completion", "messages") and not data.train_on_prompt
        self.pad_id = setup.tokenizer.pad_token_id
        self.eos_id = setup.tokenizer.eos_token_id
        self.vocab_size = setup.vocab_size
        # Greedy teacher outputs never change: generate each row's once (sequence-level KD's dataset).
        self.cache: dict[int, list[int]] | None = {} if cache else None
        self.sampled_steps = 0

    def __call__(self, batch: dict, step: int) -> dict:
        if self.fraction < 1.0 and not samples_at(self.seed, step, self.fraction):
            return batch
        prompts = split_prompts(batch, prompt_lengths(batch, self.prompt_from_labels, self.options.prompt_fraction))
        completions = self._completions(batch, prompts, step)
        self.sampled_steps += 1
        return rebuild_batch(batch, prompts, completions, self.pad_id)

    def _completions(self, batch: dict, prompts: list[list[int]], step: int) -> list[list[int]]:
        rows = batch["row_index"].tolist() if "row_index" in batch else None
        if self.cache is None or rows is None:
            return self._sample(prompts, rollout_seed(self.seed, step, batch))
        missing = [i for i, row in enumerate(rows) if row not in self.cache]
        if missing:
            new = self._sample([prompts[i] for i in missing], rollout_seed(self.seed, step, batch))
            self.cache.update({rows[i]: completion for i, completion in zip(missing, new)})
        return [self.cache[row] for row in rows]

    def _sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        return self.sampler(
            self.model, prompts, self.options, pad_id=self.pad_id, eos_id=self.eos_id, seed=seed,
            vocab_size=self.vocab_size,
        )


def _chain(previous, rollout):
    return lambda batch, step: rollout(previous(batch, step), step)


def configure(setup, config) -> None:
    policy = config.rollout.policy
    if policy == "off_policy":
        return
    if policy == "on_policy":
        rollout = PromptRollout(setup, config, setup.student.model, fraction=config.rollout.lambda_)
    elif policy == "sequence_level":
        sampler = hf_generate
        if config.rollout.engine == "vllm":
            sampler = VLLMSampler(config.teacher, config.rollout, config.train.seed)
        rollout = PromptRollout(setup, config, setup.teacher_model, sampler, cache=config.rollout.greedy)
    else:
        from alambic.training.modes.minillm import configure_minillm

        rollout = configure_minillm(setup, config)
    setup.rollout = _chain(setup.rollout, rollout)
