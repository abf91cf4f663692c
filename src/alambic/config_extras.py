"""Config sections of two loss/training modes: interchange-intervention distillation and
quantization-aware distillation (read by training/modes/interchange.py and quantization.py).

    alambic validate configs/interchange.yaml
    alambic validate configs/qat.yaml
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alambic.config_base import Strict


class InterchangeConfig(Strict):
    """Causal (interchange-intervention) distillation, Wu et al. 2022.

    For each base row a source row of the same batch is chosen; the activations of an
    aligned layer at some token positions are swapped in from the source, in the teacher
    and in the student alike, and the student's counterfactual next-token distribution is
    trained to match the teacher's (the run's objective, added to the usual KD loss).
    """

    layer_map: dict[int, int] = Field(
        ..., min_length=1,
        description="{student layer: teacher layer} (blocks numbered from 0); each step intervenes on one pair, "
        "drawn in turn",
    )
    weight: float = Field(1.0, gt=0.0, description="weight of the counterfactual term in the total loss")
    positions: Literal["random"] | list[int] = Field(
        "random", description="token positions whose activations are swapped: random ones, or a fixed list"
    )
    num_positions: int = Field(4, ge=1, description="for positions 'random': how many per row")
    pairing: Literal["shift", "shuffle"] = Field(
        "shuffle", description="source of row b: row b+1 of the batch (shift) or a random other row (shuffle)"
    )

    @field_validator("positions")
    @classmethod
    def _positions(cls, value):
        if isinstance(value, list) and (not value or any(p < 0 for p in value) or len(set(value)) != len(value)):
            raise ValueError("positions must be 'random' or a non-empty list of distinct positions >= 0")
        return value

    @field_validator("layer_map")
    @classmethod
    def _layers(cls, value):
        if any(i < 0 or j < 0 for i, j in value.items()):
            raise ValueError("layer_map layers are numbered from 0")
        return value


class QuantizationConfig(Strict):
    """Quantization-aware distillation: weight-only fake quantization while training, and an
    export in the compressed-tensors format that `from_pretrained` and vLLM load."""

    bits: Literal[4, 8] = Field(4, description="integer weight bits (symmetric)")
    group_size: int | None = Field(
        32, ge=1, description="weights per scale along the input dimension; null: one scale per output row"
    )
    ignore: list[str] = Field(["lm_head"], description="linear layers (module names) left in floating point")
    export: bool = Field(True, description="write run_dir/quantized (compressed-tensors, pack-quantized)")

    @model_validator(mode="after")
    def _group(self) -> "QuantizationConfig":
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size must be even (got {self.group_size}); or null for one scale per row")
        return self
