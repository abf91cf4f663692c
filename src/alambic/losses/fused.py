"""Chunked LM-head distillation loss that never materialises [N, V] logits.

In LLM distillation the logits (tokens x vocabulary, for the student and the
teacher, plus their gradient) dominate memory. `fused_distillation_loss` takes
the student's final hidden states and LM-head weights instead, and walks the
counted tokens chunk by chunk: project the chunk to logits, compute the loss
and its closed-form logit gradient (alambic.losses.fused_kernels), and fold that
gradient straight into the gradients of the hidden states, head weight and
bias. The backward pass only rescales those stored gradients. The result is
the plain path's `per_token_distillation_loss` on full logits, masked and
summed (or averaged), for every objective.

Precision. fp32 and float64 inputs run every GEMM in that dtype (exact path).
When a head's hidden states and weight are both bf16 (or both fp16), its GEMMs
run in that dtype on tensor cores with fp32 accumulation, as the plain bf16
path and Liger do: logits come out of the GEMM in bf16 and are cast into an fp32
buffer for the softmax / divergence math, and the fp32 logit gradient is cast
back to bf16 for the two gradient GEMMs. No fp32 copy of a head weight is made;
the weight gradient is accumulated in the weight's dtype (one bf16 rounding per
chunk, as Liger's default) because an fp32 accumulator of a 128k x 4096 head
costs 2.1 GB. `fp32_matmul=True` keeps the older behaviour (weights upcast
once, fp32 GEMMs, fp32 accumulators): slower, a little more exact.
tests/unit/test_fused_low_precision.py states the tolerances. The returned
gradients have the dtype of their inputs.

    .venv/bin/python -c "import torch; from alambic.losses.fused import fused_distillation_loss as f; \
h = torch.randn(8, 4, requires_grad=True); w = torch.randn(16, 4, requires_grad=True); \
out = f(h, w, None, None, None, teacher_logits=torch.randn(8, 16), objective='jsd'); out['loss'].backward(); print(out)"
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from alambic.losses.fused_checks import check_labels, check_options, check_shapes
from alambic.losses.divergences import softcap
from alambic.losses.fused_kernels import (
    IGNORE_INDEX,
    LossSpec,
    block_loss_and_grad,
    compiled_block_loss_and_grad,
)
from alambic.losses.fused_threads import eager_chunk_loss_and_grad
from alambic.losses.logit_transform import IDENTITY, LogitTransform


# compile=True runs blocks of about this many logits: few, large fused kernels,
# while inductor's temporaries stay small next to the chunk's logits buffer.
COMPILED_BLOCK_ELEMENTS = 1 << 19


@dataclass
class _Plan:
    """Everything the autograd function needs besides the student's tensors."""

    spec: LossSpec
    rows: torch.Tensor | None  # indices of the counted rows; None when every row counts
    row_count: int
    total_rows: int
    labels: torch.Tensor | None  # labels of the counted rows
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    chunk_size: int = 1024
    compiled: bool = False
    scale: float = 1.0  # 1 for "sum", 1 / count for "mean"
    student_transform: LogitTransform = IDENTITY  # the model's own transform, then loss.logit_softcap
    teacher_transform: LogitTransform = IDENTITY  # for teacher head logits (dense ones are as given)
    logit_softcap: float | None = None  # applied to dense teacher logits
    fp32_matmul: bool = False  # bf16/fp16 heads: upcast and run the GEMMs in fp32 (the pre-2026-12 path)

    @property
    def grad_scale_folded(self) -> bool:
        """Eager math takes `scale` in its loss weights; compiled math keeps one spec (no recompiles per count)."""
        return not self.compiled


def _select(tensor: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of the counted rows of `tensor` (a view when every row counts)."""
    if rows is None:
        return tensor[start:stop]
    return tensor.index_select(0, rows[start:stop])


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # float64 inputs (used by the exactness tests) stay float64; everything else is fp32.
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _gemm_dtype(hidden: torch.Tensor | None, weight: torch.Tensor | None, compute: torch.dtype, exact: bool):
    """The GEMM dtype of one head: its inputs' own bf16/fp16 when both share it, else `compute`."""
    if exact or compute != torch.float32 or hidden is None or weight is None:
        return compute
    return hidden.dtype if hidden.dtype == weight.dtype and hidden.dtype in LOW_PRECISION else compute


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.matmul(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


class _Head:
    """One LM head projecting into a reused `compute` buffer.

    Exact path (gemm == compute): the weight is cast once to the compute dtype.
    Low-precision path (gemm bf16/fp16): the weight is used as it is (no copy), the
    GEMM writes a gemm-dtype buffer that is cast into the compute buffer, and the
    (small) bias is added there in the compute dtype.
    """

    def __init__(self, weight, bias, compute: torch.dtype, chunk_rows: int, gemm: torch.dtype | None = None):
        self.gemm = compute if gemm is None else gemm
        self.low = self.gemm != compute
        self.weight = weight.detach().to(self.gemm)
        self.bias = None if bias is None else bias.detach().to(compute)
        self.buffer = torch.empty(chunk_rows, weight.shape[0], dtype=compute, device=weight.device)
        self.low_buffer = torch.empty_like(self.buffer, dtype=self.gemm) if self.low else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if not self.low:
            return _project(hidden, self.weight, self.bias, self.buffer[:rows])
        low = torch.matmul(hidden.to(self.gemm), self.weight.t(), out=self.low_buffer[:rows])
        logits = self.buffer[:rows].copy_(low)
        return logits if self.bias is None else logits.add_(self.bias)


class _GradientSums:
    """Gradients of the student's hidden states, head weight and bias, chunk by chunk.

    Hidden and weight gradients live in the head's GEMM dtype (bf16 for bf16 inputs:
    each hidden row is written once; the weight gradient takes one rounding per
    chunk), the bias gradient in the compute dtype (it is only [vocab]).
    """

    def __init__(self, plan: _Plan, head: _Head, needs_grad: tuple[bool, bool, bool]):
        vocab, width = head.weight.shape
        options = {"dtype": head.weight.dtype, "device": head.weight.device}
        self.plan, self.head = plan, head
        self.hidden = self.weight = self.bias = None
        if needs_grad[0]:
            # Uncounted rows keep a zero gradient; counted rows are written once each.
            allocate = torch.empty if plan.rows is None else torch.zeros
            self.hidden = allocate(plan.total_rows, width, **options)
        if needs_grad[1]:
            # The first chunk writes the weight gradient instead of adding to zeros.
            self.weight = (torch.empty if plan.row_count > 0 else torch.zeros)(vocab, width, **options)
        if needs_grad[2]:
            self.bias = torch.zeros(vocab, dtype=head.buffer.dtype, device=head.buffer.device)

    def add_chunk(self, start: int, stop: int, grad_logits: torch.Tensor, chunk_hidden: torch.Tensor) -> None:
        rows = self.plan.rows
        if self.bias is not None:
            self.bias += grad_logits.sum(0)
        if self.head.low:
            # The fp32 logit gradient, rounded once to bf16 for the two tensor-core GEMMs.
            grad_logits = self.head.low_buffer[: stop - start].copy_(grad_logits)
            chunk_hidden = chunk_hidden.to(self.head.gemm)
        if self.hidden is not None and rows is None:
            torch.matmul(grad_logits, self.head.weight, out=self.hidden[start:stop])
        elif self.hidden is not None:
            self.hidden.index_copy_(0, rows[start:stop], grad_logits @ self.head.weight)
        if self.weight is not None and start == 0:
            torch.matmul(grad_logits.t(), chunk_hidden, out=self.weight)
        elif self.weight is not None:
            self.weight.addmm_(grad_logits.t(), chunk_hidden)


def _compiled_chunk_loss_and_grad(logits, teacher_logits, labels, spec: LossSpec):
    """(KD sum, CE sum, gradient) of a chunk through torch.compile; the gradient overwrites `logits`.

    Only full blocks go through the compiled function, so it always sees one shape:
    a ragged remainder would make torch.compile switch to a dynamic-shape kernel
    that then serves every block and ran ~7x slower here. The remainder runs eagerly.
    """
    compiled = compiled_block_loss_and_grad()
    rows = logits.shape[0]
    block_rows = max(1, COMPILED_BLOCK_ELEMENTS // logits.shape[1]) if logits.device.type == "cpu" else rows
    kd_sum = logits.new_zeros(())
    ce_sum = logits.new_zeros(())
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = logits[start:stop]
        block_teacher = None if teacher_logits is None else teacher_logits[start:stop]
        block_labels = None if labels is None else labels[start:stop]
        if stop - start == block_rows:
            kd, ce, grad = compiled(block, block_teacher, block_labels, spec)
            block.copy_(grad)
        else:
            kd, ce, _ = block_loss_and_grad(block, block_teacher, block_labels, spec, out=block)
        kd_sum += kd
        ce_sum += ce
    return kd_sum, ce_sum, logits


def _chunk_teacher(plan: _Plan, teacher: _Head | None, start: int, stop: int, compute) -> torch.Tensor | None:
    """Teacher logits of counted rows start:stop, transformed as its model (and the loss) does."""
    if teacher is not None:
        logits = teacher.logits(_select(plan.teacher_hidden.detach(), plan.rows, start, stop).to(teacher.gemm))
        if not plan.teacher_transform.is_identity:
            plan.teacher_transform.apply_(logits, want_derivative=False)
        return logits
    if plan.teacher_logits is not None:
        return softcap(_select(plan.teacher_logits.detach(), plan.rows, start, stop), plan.logit_softcap)
    return None


def _run_chunks(hidden, weight, bias, plan: _Plan, needs_grad: tuple[bool, bool, bool]):
    """KD and CE sums and the unscaled gradient sums over all counted rows."""
    compute = _compute_dtype(hidden, weight, plan.teacher_hidden, plan.teacher_weight)
    chunk = max(1, min(plan.chunk_size, plan.row_count))
    student = _Head(weight, bias, compute, chunk, _gemm_dtype(hidden, weight, compute, plan.fp32_matmul))
    teacher = None
    if plan.teacher_weight is not None:
        gemm = _gemm_dtype(plan.teacher_hidden, plan.teacher_weight, compute, plan.fp32_matmul)
        teacher = _Head(plan.teacher_weight, plan.teacher_bias, compute, chunk, gemm)
    grads = _GradientSums(plan, student, needs_grad)
    chunk_math = _compiled_chunk_loss_and_grad if plan.compiled else eager_chunk_loss_and_grad
    grad_spec = plan.spec
    if plan.grad_scale_folded:
        # The reduction's 1 / count rides on the per-row weights the math applies anyway, so
        # backward need not rescale the [vocab, width] weight gradient (a full pass over it).
        grad_spec = replace(plan.spec, kd_weight=plan.spec.kd_weight * plan.scale,
                            ce_weight=plan.spec.ce_weight * plan.scale)
    kd_total = torch.zeros((), dtype=compute, device=hidden.device)
    ce_total = torch.zeros((), dtype=compute, device=hidden.device)
    student_transform = None if plan.student_transform.is_identity else plan.student_transform
    for start in range(0, plan.row_count, chunk):
        stop = min(start + chunk, plan.row_count)
        chunk_hidden = _select(hidden.detach(), plan.rows, start, stop).to(student.gemm)
        labels = None if plan.labels is None else plan.labels[start:stop]
        logits = student.logits(chunk_hidden)
        derivative = None if student_transform is None else student_transform.apply_(logits, want_derivative=True)
        kd, ce, grad_logits = chunk_math(logits, _chunk_teacher(plan, teacher, start, stop, compute), labels, grad_spec)
        if derivative is not None:
            grad_logits.mul_(derivative)  # chain rule through the logit transformation
        kd_total += kd
        ce_total += ce
        grads.add_chunk(start, stop, grad_logits, chunk_hidden)
    return kd_total, ce_total, (grads.hidden, grads.weight, grads.bias)


class _FusedHeadDistillation(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        needs_grad = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        kd_sum, ce_sum, grads = _run_chunks(hidden, weight, bias, plan, needs_grad)
        spec = plan.spec
        loss = (spec.kd_weight * kd_sum + spec.ce_weight * ce_sum) * plan.scale
        kd = kd_sum * plan.scale
        ce = ce_sum * plan.scale
        ctx.fused_grads = grads
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scale = 1.0 if plan.grad_scale_folded else plan.scale
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = ctx.fused_grads
        if grads is None:
            raise RuntimeError(
                "fused_distillation_loss: its stored gradients were already used by a first "
                "backward; recompute the loss instead of retain_graph=True"
            )
        ctx.fused_grads = None  # scaled in place below, so a second backward would be wrong
        results = []
        # Usually 1 (a loss backpropagated as it is): then there is nothing left to scale.
        unit = ctx.scale == 1.0 and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0
        for grad, dtype in zip(grads, ctx.input_dtypes):
            if grad is None:
                results.append(None)
                continue
            if not unit:
                # The factor stays fp32 for bf16 gradients: a bf16 1 / count would bias every gradient.
                grad.mul_((grad_loss * ctx.scale).to(torch.promote_types(grad.dtype, torch.float32)))
            results.append(grad.to(dtype))
        return results[0], results[1], results[2], None


def _counted_rows(labels, mask) -> torch.Tensor | None:
    if mask is None and labels is not None:
        mask = labels != IGNORE_INDEX
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _make_plan(hidden, vocab: int, labels, mask, teacher: dict, alpha: float, options: dict) -> _Plan:
    """Counted rows, loss weights and teacher source, as per_token_distillation_loss defines them."""
    has_teacher = teacher["weight"] is not None or teacher["logits"] is not None
    rows = _counted_rows(labels, mask)
    use_ce = labels is not None and (alpha > 0.0 or not has_teacher)
    counted_labels = None
    if use_ce:
        counted_labels = labels if rows is None else labels.index_select(0, rows)
        check_labels(counted_labels, vocab)
    spec = LossSpec(
        **options,
        kd_weight=(1.0 - alpha) if has_teacher and alpha < 1.0 else 0.0,
        ce_weight=(alpha if has_teacher else 1.0) if use_ce else 0.0,
        labels_may_be_ignored=use_ce and mask is not None and bool((counted_labels == IGNORE_INDEX).any()),
        teacher_may_be_infinite=teacher["logits"] is not None,
    )
    return _Plan(
        spec=spec,
        rows=rows,
        row_count=hidden.shape[0] if rows is None else rows.numel(),
        total_rows=hidden.shape[0],
        labels=counted_labels,
        teacher_hidden=teacher["hidden"],
        teacher_weight=teacher["weight"],
        teacher_bias=teacher["bias"],
        teacher_logits=teacher["logits"],
    )


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    chunk_size: int = 1024,
    compile: bool = False,
    reduction: str = "sum",
    logit_softcap: float | None = None,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
    fp32_matmul: bool = False,
) -> dict[str, torch.Tensor]:
    """{"loss", "kd", "ce"} of `per_token_distillation_loss`, reduced over counted rows.

    Rows count where `mask` is true; without a mask, where labels != -100; without
    either, all rows. "sum" adds the counted rows, "mean" divides by their number
    (at least 1). The teacher is given either as hidden states and head
    (teacher_hidden, teacher_head_weight, teacher_head_bias) or as dense logits;
    without a teacher the loss is the cross-entropy. Gradients flow through "loss"
    to the student's hidden states, head weight and bias; "kd" and "ce" are detached
    metrics and the teacher gets no gradient. `compile=True` runs the per-chunk math
    through torch.compile. A backward with retain_graph=True can run only once.

    `student_transform` / `teacher_transform` (alambic.losses.logit_transform) are
    what each model's forward() does after its head (Gemma soft-capping, Granite
    and Cohere scaling); `logit_softcap` caps both sides inside the loss, after
    them (dense `teacher_logits` are taken as the teacher's final logits).

    bf16/fp16 heads run their GEMMs in their own dtype (see the module docstring);
    `fp32_matmul=True` upcasts them to fp32 GEMMs instead.
    """
    check_options(objective, temperature, reduction, chunk_size, top_k, alpha, beta, skew_alpha, logit_softcap)
    check_shapes(
        student_hidden, student_head_weight, student_head_bias, labels, mask,
        teacher_hidden, teacher_head_weight, teacher_head_bias, teacher_logits,
    )
    teacher = {
        "hidden": teacher_hidden, "weight": teacher_head_weight, "bias": teacher_head_bias, "logits": teacher_logits,
    }
    options = {
        "objective": objective, "temperature": float(temperature), "beta": float(beta),
        "skew_alpha": float(skew_alpha), "top_k": top_k,
    }
    plan = _make_plan(student_hidden, student_head_weight.shape[0], labels, mask, teacher, alpha, options)
    plan.chunk_size, plan.compiled = chunk_size, compile
    plan.student_transform = (student_transform or IDENTITY).with_cap(logit_softcap)
    plan.teacher_transform = (teacher_transform or IDENTITY).with_cap(logit_softcap)
    plan.logit_softcap = logit_softcap
    plan.fp32_matmul = bool(fp32_matmul)
    if reduction == "mean":
        plan.scale = 1.0 / max(plan.row_count, 1)
    loss, kd, ce = _FusedHeadDistillation.apply(student_hidden, student_head_weight, student_head_bias, plan)
    return {"loss": loss, "kd": kd, "ce": ce}
