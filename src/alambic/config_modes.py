"""Config sections that choose a distillation mode (all optional; defaults = off-policy logit KD).

A mode is a choice of teacher signal source, rollout policy and loss terms —
never a separate trainer. Each section is read by `alambic.training.modes`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


class RolloutConfig(_Strict):
    """Where the completions of a batch come from."""

    policy: Literal["off_policy", "on_policy", "sequence_level", "minillm"] = "off_policy"
    lambda_: float = Field(0.0, ge=0.0, le=1.0, alias="lambda", description="fraction of batches sampled by the student (GKD)")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=1)
    engine: Literal["hf", "vllm"] = "hf"
    teacher_mix: float = Field(0.2, ge=0.0, le=1.0, description="MiniLLM: share of the teacher in the sampling mixture")
    length_normalize: bool = True


class HiddenTransferConfig(_Strict):
    weight: float = Field(1.0, ge=0.0)
    loss: Literal["mse", "cosine"] = "mse"
    layer_map: Literal["uniform", "last"] | dict[int, int] = "uniform"
    projection: Literal["auto", "never"] = Field("auto", description="learned linear projection when widths differ")


class AttentionTransferConfig(_Strict):
    weight: float = Field(1.0, ge=0.0)
    layer_map: Literal["uniform", "last"] | dict[int, int] = "uniform"


class RelationTransferConfig(_Strict):
    weight: float = Field(1.0, ge=0.0)
    kind: Literal["token", "sample"] = "token"


class RepresentationConfig(_Strict):
    """Feature-based terms added to the logit loss (TinyBERT, DistilBERT, relation KD)."""

    hidden: HiddenTransferConfig | None = None
    attention: AttentionTransferConfig | None = None
    relation: RelationTransferConfig | None = None
    output_cosine: float = Field(0.0, ge=0.0, description="weight of DistilBERT's cosine on final hidden states")


class EnsembleConfig(_Strict):
    """How several teachers (`teachers:`) are combined."""

    method: Literal["fixed", "confidence", "route"] = "fixed"
    route_column: str | None = None
    mix: Literal["distribution", "divergences"] = "distribution"


class SelfDistillConfig(_Strict):
    teacher: Literal["ema", "frozen", "checkpoint"] = "ema"
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    checkpoint: str | None = None
    early_exit_layers: list[int] = []
    early_exit_weight: float = Field(1.0, ge=0.0)


class CoDistillConfig(_Strict):
    peers: list[str] = Field(default_factory=list, description="model folders / hub ids trained together with the student")
    weight: float = Field(0.5, ge=0.0, le=1.0)


class CrossTokenizerConfig(_Strict):
    method: Literal["uld", "align"] = "uld"
    teacher_tokenizer: str | None = None
