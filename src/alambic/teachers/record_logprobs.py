"""A teacher that is already in the data: the per-token logprobs `alambic generate` stored in each record.

With `data.logprobs_column` set and no `teacher` section, the loop learns from
the teacher's top-k distribution at every completion token (built by
`alambic.data.soft_targets` when the data is tokenized), through the same sparse
top-k loss as an offline logit cache: k kept tokens plus one tail bucket.
Positions without a stored distribution (prompt, end of sequence, records that
fell back to hard targets) learn the label alone; `extras["kd_mask"]` marks
the others. API logprobs are those of the raw distribution (temperature 1).

    alambic generate configs/generate_answer.yaml
    alambic distill configs/distill_generated_soft.yaml
"""

from __future__ import annotations

import torch

from alambic.errors import ConfigError, DataError
from alambic.teachers.base import SignalRequest, TeacherSignal

API_TEMPERATURE = 1.0


class RecordLogprobTeacher:
    """A `TeacherSource` reading the sparse teacher distribution from the batch itself."""

    temperature = API_TEMPERATURE

    def __init__(self, column: str = "completion_logprobs"):
        self.column = column
        self.name = f"teacher logprobs stored in the data ({column})"

    def bind(self, train_data, config=None) -> None:
        """A run whose records yield no soft target at all is almost surely misconfigured."""
        if not any(any(row.get("topk_ids", ())) for row in (train_data[i] for i in range(len(train_data)))):
            raise DataError(
                f"no training record has usable teacher logprobs in column {self.column!r} "
                "(see the warnings above for why)",
                "generate with sampling.logprobs: true (and top_logprobs), check data.logprobs_column, "
                "or remove it to train on the text alone",
            )

    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal:
        if request.hidden_states or request.attentions:
            raise ConfigError("stored teacher logprobs hold no hidden states or attentions",
                              "use a live teacher (teacher.model) for representation-transfer losses")
        input_ids = batch["input_ids"]
        if "topk_ids" in batch:
            topk_ids, topk_logprobs = batch["topk_ids"], batch["topk_logprobs"]
        else:  # no record of this batch kept its soft targets
            topk_ids = torch.full((*input_ids.shape, 1), -1, dtype=torch.long, device=input_ids.device)
            topk_logprobs = torch.zeros(topk_ids.shape, dtype=torch.float32, device=input_ids.device)
        present = topk_ids >= 0
        kept_mass = torch.where(present, topk_logprobs.float().exp(), 0.0).sum(-1).clamp(max=1.0)
        return TeacherSignal(
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            tail_logmass=torch.log1p(-kept_mass),  # -inf when the kept tokens hold all the mass
            temperature=self.temperature,
            extras={"kd_mask": present.any(-1)},
        )
