"""MiniLLM-style policy optimisation of the sequence-level reverse KL (Gu et al., ICLR 2024).

Objective: KL(q || p) over whole completions, q the student and p the teacher.
Its gradient splits into (with r_t = log p(y_t | y_<t) - log q(y_t | y_<t)):

- the single-step term, sum_t grad KL(q(. | y_<t) || p(. | y_<t)): the token-level
  reverse KL over the full vocabulary at every sampled prefix. It is the loop's
  normal loss (loss.objective: reverse_kl) on the sampled batch, weighted per
  token by the importance weights in batch["token_weight"];
- the long-term term, - sum_t w_t R_{t+1} grad log q(y_t), a policy gradient whose
  return R_{t+1} sums the future rewards (their per-sequence mean with
  `rollout.length_normalize`, the paper's length normalisation). It is an extra
  loss term computed here.

Sampling (the rollout; `sample_from_mixture` in training/sampling.py) draws
each token from the mixture (1 - a) q + a p (a = rollout.teacher_mix, the
paper's teacher-mixed sampling) with both models' KV caches. Importance weights correct for it: `importance: token` uses each
token's q / mixture ratio (the paper's low-variance approximation, biased when
a > 0); `importance: sequence` uses the product over the whole sample, which
makes the gradient unbiased (tested against the analytic one).

Simplifications against the paper: one gradient step per batch of samples, so
no PPO ratio clipping; no value baseline or reward scaling; no separate
pretraining-corpus loss (mix an off-policy run in if the student drifts).

    alambic distill configs/minillm.yaml
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alambic.data import IGNORE
from alambic.training.sampling import (
    prompt_lengths, rebuild_batch, rollout_seed, sample_from_mixture, split_prompts,
)


# ----------------------------------------------------------------------------- the estimator


def importance_weights(student_logprob: torch.Tensor, sampling_logprob: torch.Tensor, mask: torch.Tensor,
                       kind: str = "token") -> torch.Tensor:
    """Weights that turn mixture samples into student samples: per token q/mix, or the sequence product."""
    mask = mask.float()
    log_ratio = (student_logprob.detach() - sampling_logprob) * mask
    if kind == "token":
        return log_ratio.exp() * mask
    return log_ratio.sum(-1, keepdim=True).exp() * mask


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """R_{t+1}: the sum of the rewards after position t, or their mean (length normalisation)."""
    mask = mask.float()
    rewards = rewards * mask
    future = rewards.flip(-1).cumsum(-1).flip(-1) - rewards
    if length_normalize:
        remaining = mask.flip(-1).cumsum(-1).flip(-1) - mask
        future = future / remaining.clamp_min(1.0)
    return future


def leave_one_out_baseline(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the mean return of the *other* sequences of the batch.

    Subtracting it leaves the policy gradient unbiased (it does not depend on the
    sequence's own samples) and removes most of its variance: without it every
    return is negative early in training and the gradient is mostly noise.
    """
    mask = mask.float()
    sums, counts = (returns * mask).sum(-1), mask.sum(-1)
    others = (counts.sum() - counts).clamp_min(1.0)
    return ((sums.sum() - sums) / others).unsqueeze(-1)


def long_term_surrogate(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, weights: torch.Tensor,
                        mask: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """Per-token - w_t (R_{t+1} - b) log q(y_t): its gradient is the long-term part of grad KL(q || p)."""
    rewards = teacher_logprob - student_logprob.detach()
    returns = future_returns(rewards, mask, length_normalize)
    advantage = (weights * (returns - leave_one_out_baseline(returns, mask))).detach()
    return -advantage * student_logprob * mask.float()


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


class LongTermTerm:
    """Extra loss term (sums over the sampled tokens) for batches the MiniLLM rollout produced."""

    name = "minillm_long_term"

    def __init__(self, length_normalize: bool = True):
        self.length_normalize = length_normalize

    def __call__(self, step) -> dict:
        batch = step.batch
        if "rollout_teacher_logprob" not in batch:
            zero = batch["input_ids"].new_zeros((), dtype=torch.float32)
            return {"loss": zero}
        # The main path's forward ran on this very batch (the importance weights keep it off the fused
        # path, so its logits exist): log q(y_t) comes from it, not from a second student forward.
        logits = step.logits()[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = long_term_surrogate(
            _token_logprobs(logits, labels), batch["rollout_teacher_logprob"][:, 1:], batch["token_weight"][:, 1:],
            labels != IGNORE, self.length_normalize,
        )
        total = per_token.sum()
        return {"loss": total, "minillm_long_term": total.detach()}


# ----------------------------------------------------------------------------- the rollout


def _per_position(values: list[list[float]], prompts: list[list[int]], shape, device) -> torch.Tensor:
    """Per-token values placed at their tokens' positions in the rebuilt batch (0 elsewhere)."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, (row, prompt) in enumerate(zip(values, prompts)):
        out[i, len(prompt) : len(prompt) + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


class MiniLLMRollout:
    """Every batch: completions sampled from the student/teacher mixture, with what the loss needs."""

    def __init__(self, setup, config):
        data = config.data
        self.student_model = setup.student.model
        self.teacher_model = setup.teacher_model
        self.options = config.rollout
        self.seed = config.train.seed
        self.prompt_from_labels = data.format in ("prompt_completion", "messages") and not data.train_on_prompt
        self.pad_id = setup.tokenizer.pad_token_id
        self.eos_id = setup.tokenizer.eos_token_id
        self.vocab_size = setup.vocab_size

    def __call__(self, batch: dict, step: int) -> dict:
        prompts = split_prompts(batch, prompt_lengths(batch, self.prompt_from_labels, self.options.prompt_fraction))
        samples = sample_from_mixture(
            self.student_model, self.teacher_model, prompts, max_new_tokens=self.options.max_new_tokens,
            teacher_mix=self.options.teacher_mix, pad_id=self.pad_id, eos_id=self.eos_id,
            seed=rollout_seed(self.seed, step, batch), vocab_size=self.vocab_size,
        )
        new = rebuild_batch(batch, prompts, samples.tokens, self.pad_id)
        shape, device = new["input_ids"].shape, new["input_ids"].device
        student_lp = _per_position(samples.student_logprob, prompts, shape, device)
        sampling_lp = _per_position(samples.sampling_logprob, prompts, shape, device)
        new["rollout_teacher_logprob"] = _per_position(samples.teacher_logprob, prompts, shape, device)
        new["token_weight"] = importance_weights(student_lp, sampling_lp, new["labels"] != IGNORE, self.options.importance)
        return new


def configure_minillm(setup, config) -> MiniLLMRollout:
    setup.extra_terms.append(LongTermTerm(config.rollout.length_normalize))
    return MiniLLMRollout(setup, config)


# ----------------------------------------------------------------------------- measuring


def estimate_sequence_reverse_kl(student_model, teacher_model, prompts: list[list[int]], *, max_new_tokens: int,
                                 pad_id: int, eos_id: int | None, seed: int, vocab_size: int | None = None) -> dict:
    """Monte-Carlo KL(q || p) of student samples, and the teacher's log-likelihood of them (exposure bias)."""
    samples = sample_from_mixture(
        student_model, teacher_model, prompts, max_new_tokens=max_new_tokens, teacher_mix=0.0,
        pad_id=pad_id, eos_id=eos_id, seed=seed, vocab_size=vocab_size,
    )
    per_sequence = [sum(q) - sum(p) for q, p in zip(samples.student_logprob, samples.teacher_logprob)]
    tokens = sum(len(row) for row in samples.tokens)
    return {
        "reverse_kl_per_sequence": sum(per_sequence) / len(per_sequence),
        "reverse_kl_per_token": sum(per_sequence) / max(tokens, 1),
        "teacher_logprob_per_token": sum(sum(p) for p in samples.teacher_logprob) / max(tokens, 1),
        "tokens": tokens,
    }
