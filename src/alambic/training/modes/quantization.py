"""Quantization-aware distillation (`quantization:`): the student learns under fake-quantized weights.

The student's linear layers (all but `ignore` and a head tied to the embedding) become
`FakeQuantLinear` (models/qat.py) before training, so every loss the loop computes —
KD, CE, any extra term, and evaluation — sees the int4 / int8 weights, while the
optimiser updates floating-point master weights through a straight-through gradient.
`final/` keeps those master weights (resumable, re-quantizable); `quantized/` is the
deployable model in the compressed-tensors format that `from_pretrained` and vLLM load.

    alambic distill configs/qat.yaml
"""

from __future__ import annotations

from pathlib import Path


def configure(setup, config) -> None:
    qcfg = getattr(config, "quantization", None)
    if qcfg is None:
        return
    from alambic.models.qat import export_compressed, prepare_fake_quant

    model = setup.student.model
    prepare_fake_quant(model, qcfg.bits, qcfg.group_size, list(qcfg.ignore))
    if not qcfg.export:
        return

    def export(student_module, run_dir: Path) -> None:
        export_compressed(student_module.model, Path(run_dir) / "quantized", qcfg.bits, qcfg.group_size,
                          tuple(qcfg.ignore), setup.tokenizer)

    setup.after_train.append(export)
