"""The `train.strategy` / `train.fsdp` config: how a run spreads over several processes.

    train:
      strategy: fsdp          # ddp (default): a full replica per process; fsdp: PyTorch FSDP2 shards
      fsdp:
        activation_checkpointing: true
        shard_teacher: true
        teacher_offload: false

See docs/scale.md. The strategy itself lives in `alambic.training.distributed`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Strategy = Literal["ddp", "fsdp"]


class FSDPConfig(BaseModel):
    """Options of `train.strategy: fsdp` (ignored under ddp)."""

    model_config = ConfigDict(extra="forbid")

    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in backward (less memory, ~1/3 more compute)")
    shard_teacher: bool = Field(True, description="shard a live teacher's weights over the processes (each holds ~1/N)")
    teacher_offload: bool = Field(False, description="keep the teacher's shards in CPU memory (GPU runs only; copied in per layer)")
    reshard_after_forward: bool = Field(True, description="free each student layer's gathered weights after its forward (ZeRO-3); false = ZeRO-2-like, faster, more memory")
