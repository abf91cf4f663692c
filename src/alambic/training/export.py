"""Export the trained student: save_pretrained (safetensors), tokenizer, model card.

Auxiliary modules (projections, early-exit heads) are not part of the export:
only the Hugging Face model inside the StudentModule is saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from alambic.config import DistillConfig
from alambic.durable import atomic_dir
from alambic.redact import redact_text
from alambic.training.finite import check_finite_weights


def model_card(config: DistillConfig, teacher_name: str | None, metrics: dict, parameters: int) -> str:
    loss = config.loss
    objective = (
        "supervised cross-entropy (no teacher)" if teacher_name is None
        else f"{loss.objective} at temperature {loss.temperature}, alpha (CE weight) {loss.alpha}"
        + (f", beta {loss.beta}" if loss.objective == "jsd" else "")
        + (f", skew alpha {loss.skew_alpha}" if loss.objective.startswith("skew") else "")
        + (f", teacher top-{loss.top_k}" if loss.top_k else "")
    )
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    train = config.train
    return f"""---
library_name: transformers
tags: [alambic, distillation]
---
# Student distilled with alambic

- Teacher: `{teacher_name or 'none'}`
- Task: {config.task}; parameters: {parameters:,}
- Data: `{config.data.train}` (format {config.data.format}, max length {config.data.max_length}, packing {config.data.packing})
- Objective: {objective}
- Training: {train.max_steps} steps, batch {train.batch_size} x accumulation {train.grad_accum} per device, lr {train.lr}, {train.scheduler} schedule, warmup {train.warmup_steps}, seed {train.seed}, mixed precision {train.mixed_precision}

## Final held-out metrics

| metric | value |
|---|---|
{rows or '| (no eval set) | |'}

The full resolved configuration is in `config.yaml` next to this folder.
"""


def export_student(
    student_module, tokenizer, config: DistillConfig, run_dir: Path, metrics: dict, teacher_name, state_dict=None
) -> Path:
    """Write run_dir/final atomically (temp folder, then rename).

    `state_dict`: the full weights when the module holds only shards (FSDP), gathered by the caller.
    """
    model = student_module.model
    check_finite_weights(model if state_dict is None else state_dict, "final export")  # never a NaN model on disk (training/finite.py)
    with atomic_dir(Path(run_dir) / "final") as temporary:
        model.save_pretrained(temporary, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(temporary)
        parameters = sum(p.numel() for p in model.parameters())
        card = model_card(config, teacher_name, metrics, parameters)
        (temporary / "README.md").write_text(redact_text(card))  # e.g. a served teacher's URL: no credentials
        (temporary / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return Path(run_dir) / "final"
