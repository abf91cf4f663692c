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
Sampling (training/sampling.py) uses `model.generate` with its KV cache, under
no_grad in eval mode; `rollout.engine: vllm` (sequence_level only, optional
extra) uses vLLM.

    alambic distill configs/onpolicy_gkd.yaml
    alambic distill configs/seqkd.yaml
"""

from __future__ import annotations

from alambic.training.sampling import (
    VLLMSampler, hf_generate, prompt_lengths, rebuild_batch, rollout_seed, samples_at, split_prompts,
)


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
