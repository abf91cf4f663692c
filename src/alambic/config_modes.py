"""Config sections that choose a distillation mode (all optional; defaults = off-policy logit KD).

A mode is a choice of teacher signal source, rollout policy and loss terms —
never a separate trainer. Each section is read by `alambic.training.modes`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alambic.config_base import Strict


class RolloutConfig(Strict):
    """Where the completions of a batch come from."""

    policy: Literal["off_policy", "on_policy", "sequence_level", "minillm"] = "off_policy"
    lambda_: float = Field(0.0, ge=0.0, le=1.0, alias="lambda", description="fraction of batches sampled by the student (GKD)")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=1)
    greedy: bool = Field(False, description="decode greedily instead of sampling (sequence-level KD)")
    prompt_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="text data: leading share of each row used as the prompt")
    engine: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory: float = Field(0.3, gt=0.0, le=1.0, description="share of GPU memory vLLM may take")
    teacher_mix: float = Field(0.2, ge=0.0, lt=1.0, description="MiniLLM: share of the teacher in the sampling mixture")
    importance: Literal["token", "sequence"] = Field(
        "token", description="MiniLLM importance weights: per-token ratio (the paper's) or the unbiased sequence product"
    )
    length_normalize: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "RolloutConfig":
        if self.lambda_ > 0 and self.policy != "on_policy":
            raise ValueError(f"rollout.lambda applies to policy 'on_policy' only (policy is {self.policy!r})")
        if self.policy == "minillm" and (self.temperature != 1.0 or self.top_p != 1.0 or self.greedy):
            # The importance weights need the exact distribution the samples were drawn from.
            raise ValueError("policy 'minillm' samples at temperature 1 with top_p 1 and no greedy decoding")
        return self


class HiddenTransferConfig(Strict):
    weight: float = Field(1.0, ge=0.0)
    loss: Literal["mse", "cosine"] = "mse"
    layer_map: Literal["uniform", "last"] | dict[int, int] = "uniform"
    projection: Literal["auto", "never", "required"] = Field(
        "auto",
        description="auto: a learned linear projection when widths differ; never: widths must match; "
        "required: widths must differ (guards against pairing the wrong models)",
    )


class AttentionTransferConfig(Strict):
    weight: float = Field(1.0, ge=0.0)
    layer_map: Literal["uniform", "last"] | dict[int, int] = "uniform"


class RelationTransferConfig(Strict):
    weight: float = Field(1.0, ge=0.0)
    kind: Literal["token", "sample"] = "token"
    layer_map: Literal["uniform", "last"] | dict[int, int] = "last"


class RepresentationConfig(Strict):
    """Feature-based terms added to the logit loss (TinyBERT, DistilBERT, relation KD)."""

    hidden: HiddenTransferConfig | None = None
    attention: AttentionTransferConfig | None = None
    relation: RelationTransferConfig | None = None
    output_cosine: float = Field(0.0, ge=0.0, description="weight of DistilBERT's cosine on final hidden states")


class EnsembleConfig(Strict):
    """How several teachers (`teachers:`) are combined."""

    method: Literal["fixed", "confidence", "route"] = Field(
        "fixed", description="fixed weights; confidence: weight x exp(-entropy) per position; route: a data column names the teacher"
    )
    route_column: str | None = Field(None, description="for method route: the column holding each record's teacher name")
    mix: Literal["distribution", "divergences"] = Field(
        "distribution", description="one mixed teacher distribution, or the weighted sum of each teacher's divergence"
    )

    @model_validator(mode="after")
    def _route_needs_column(self) -> "EnsembleConfig":
        if self.method == "route" and not self.route_column:
            raise ValueError("method 'route' needs route_column (the data column that names each row's teacher)")
        if self.method != "route" and self.route_column:
            raise ValueError(f"route_column is only used by method 'route' (method is {self.method!r})")
        return self


class SelfDistillConfig(Strict):
    teacher: Literal["ema", "frozen", "checkpoint", "none"] = Field(
        "ema", description="the student's own teacher; none: keep the run's teacher (or none) and only train early exits"
    )
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    checkpoint: str | None = Field(None, description="for teacher checkpoint: a model folder or a run's checkpoints/step-N")
    early_exit_layers: list[int] = Field(default_factory=list, description="blocks (from 0) whose outputs get an exit head")
    early_exit_weight: float = Field(1.0, ge=0.0, description="weight of each exit head's loss")

    @model_validator(mode="after")
    def _consistent(self) -> "SelfDistillConfig":
        if (self.teacher == "checkpoint") != (self.checkpoint is not None):
            raise ValueError("checkpoint (a folder) is needed with teacher 'checkpoint' and only then")
        if len(set(self.early_exit_layers)) != len(self.early_exit_layers) or any(i < 0 for i in self.early_exit_layers):
            raise ValueError(f"early_exit_layers must be distinct layer numbers >= 0 (got {self.early_exit_layers})")
        if self.teacher == "none" and not self.early_exit_layers:
            raise ValueError("teacher 'none' with no early_exit_layers leaves nothing to self-distil")
        return self


class CoDistillConfig(Strict):
    peers: list[str] = Field(min_length=1, description="model folders / hub ids trained together with the student")
    weight: float = Field(1.0, gt=0.0, description="scale of the peers' losses in the total (1: peers learn like the student)")


class CrossTokenizerConfig(Strict):
    """Teacher and student tokenizers differ (training/modes/cross_tokenizer.py)."""

    method: Literal["uld", "align"] = Field(
        "uld", description="uld: sorted-probability Wasserstein-1; align: teacher mapped onto student tokens, then KL"
    )
    teacher_tokenizer: str | None = Field(None, description="folder of the teacher's tokenizer (default: teacher.model)")
