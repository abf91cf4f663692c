"""Distillation from a sparse teacher: its top-k log-probabilities plus the tail mass.

An offline logit cache keeps, per position, the teacher's k most likely token
ids with their log-probabilities and log(1 - their total probability). Both
distributions are compared on k + 1 outcomes: the k cached tokens and one
"tail" bucket holding every other token (for the student, the total mass it
puts outside the teacher's top-k). When k equals the vocabulary size there is
no bucket and every objective equals the dense one in `divergences.py`.

What is exact and what is a bound, for k < V (p = teacher, q = student):
- Each top-k term (e.g. p_i log(p_i / q_i) for forward KL) is exact.
- Every objective here is an f-divergence (forward/reverse KL, generalized JSD,
  skew KLs, TVD), so merging the tail into one bucket can only lower it (data
  processing inequality; for KL, the log-sum inequality): the value is a lower
  bound on the full-vocabulary divergence. It is exact when the student's
  distribution *within* the tail is proportional to the teacher's.
- For forward KL the gap is bounded above too: the tail terms sum to at most
  p_tail * (log p_k - min_{j outside} log q_j), p_k being the k-th teacher probability.
- cosine needs the teacher's raw logits and is refused.
The teacher log-probabilities are stored at the cache's temperature: a top-k
distribution cannot be re-tempered exactly (the tail's shape is unknown), so
training must use that same temperature (see `check_cache_temperature`).
`logit_softcap` caps the student's logits here; the teacher's cached
log-probabilities are used as stored (cap the teacher when the cache is built).
A `mask` works as in `per_token_distillation_loss`: nothing outside it is read.

    python -c "import torch; from alambic.losses.sparse import sparse_token_divergence as d; \
z = torch.randn(2, 5); lp, ids = z.log_softmax(-1).topk(3); \
print(d(torch.randn(2, 5), ids, lp, (1 - lp.exp().sum(-1)).log()))"
"""

from __future__ import annotations

import torch

from alambic.errors import ConfigError
from alambic.losses.checks import check_loss_parameters
from alambic.losses.divergences import divergence_from_logprobs, softcap, token_cross_entropy

# A bucket whose log-mass is below this counts as empty (e^-80 ~ 1.8e-35); it
# keeps logs finite so that masked-out terms cannot turn gradients into NaN.
LOG_MASS_FLOOR = -80.0


def check_cache_temperature(cache_temperature: float, loss_temperature: float, source: str = "the logit cache") -> None:
    """A cached top-k distribution cannot be re-tempered: the two must be equal."""
    if abs(float(cache_temperature) - float(loss_temperature)) > 1e-6 * max(1.0, abs(float(cache_temperature))):
        raise ConfigError(
            f"{source} holds teacher log-probabilities at temperature {cache_temperature}, "
            f"but loss.temperature is {loss_temperature}",
            f"set loss.temperature={cache_temperature}, or rebuild the cache at temperature "
            f"{loss_temperature} (alambic cache-logits CONFIG loss.temperature={loss_temperature})",
        )


def _check_objective(objective: str, top_k: int | None = None) -> None:
    if objective == "cosine":
        raise ConfigError(
            "loss.objective 'cosine' compares raw logits, and a top-k logit cache holds only log-probabilities",
            "use a probability objective with the cache (forward_kl, reverse_kl, jsd, skew_forward_kl, "
            "skew_reverse_kl, tvd) or a live teacher (teacher.model)",
        )
    if top_k is not None:
        raise ConfigError(
            f"loss.top_k={top_k} cannot apply to a sparse teacher: it already holds only its own top-k tokens",
            "remove loss.top_k (the cache's k applies)",
        )


def sparse_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities on the k cached tokens (+ the tail bucket when k < V)."""
    check_loss_parameters("sparse_logprobs", temperature=temperature, logit_softcap=logit_softcap)
    vocab_size, k = student_logits.shape[-1], topk_ids.shape[-1]
    if k > vocab_size:
        raise ValueError(f"the teacher signal has {k} ids per position but the student only {vocab_size} logits")
    scaled = softcap(student_logits.float(), logit_softcap) / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    # A negative id pads a position that holds fewer than k tokens (teacher logprobs stored per record).
    # It reads a real id of the same position, so the student's tail bucket keeps its mass, and both sides
    # get the floor mass there, so it adds exactly 0 to any divergence.
    present = topk_ids >= 0
    topk_ids = torch.where(present, topk_ids, topk_ids.amax(dim=-1, keepdim=True).clamp_min(0))
    student_top = torch.where(present, scaled.gather(-1, topk_ids) - log_normaliser, LOG_MASS_FLOOR)
    teacher_top = torch.where(present, topk_logprobs.float(), LOG_MASS_FLOOR)
    if k == vocab_size:
        return student_top, teacher_top
    # Summing over the complement directly (not 1 - sum of the top-k) stays accurate when the tail is tiny.
    outside = scaled.scatter(-1, topk_ids, float("-inf"))
    student_tail = (torch.logsumexp(outside, dim=-1, keepdim=True) - log_normaliser).clamp_min(LOG_MASS_FLOOR)
    teacher_tail = tail_logmass.float().unsqueeze(-1).clamp_min(LOG_MASS_FLOOR)
    return torch.cat([student_top, student_tail], dim=-1), torch.cat([teacher_top, teacher_tail], dim=-1)


def sparse_token_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Per-position divergence (shape = student_logits.shape[:-1]), scaled by T**2.

    student_logits [..., V]; topk_ids / topk_logprobs [..., k] (any order);
    tail_logmass [...]: log of the teacher mass outside the k ids (-inf if none).
    """
    _check_objective(objective)
    student_lp, teacher_lp = sparse_logprobs(
        student_logits, topk_ids, topk_logprobs, tail_logmass, temperature, logit_softcap
    )
    return divergence_from_logprobs(student_lp, teacher_lp, objective, beta, skew_alpha) * temperature**2


def sparse_per_token_distillation_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    ignore_index: int = -100,
    kd_mask: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position {"loss", "kd", "ce"}: loss = alpha * CE + (1 - alpha) * T**2 * D_sparse.

    The sparse twin of `per_token_distillation_loss`; the caller masks and reduces.
    `kd_mask` (bool, shape of the positions) marks where the teacher gave a
    distribution; elsewhere kd is 0 and the loss is the CE on the label alone,
    whatever alpha (the label is the only target there). `top_k` is refused:
    the sparse teacher's k is fixed by its source.
    """
    _check_objective(objective, top_k)
    check_loss_parameters(
        "sparse_per_token_distillation_loss", objective=objective, temperature=temperature, alpha=alpha,
        beta=beta, skew_alpha=skew_alpha, logit_softcap=logit_softcap,
    )
    if mask is not None and not bool(mask.all()):
        keep = mask.to(torch.bool)
        # Positions outside the mask are never read: finite stand-ins, then zeroed outputs.
        out = sparse_per_token_distillation_loss(
            torch.where(keep[..., None], student_logits, 0.0), torch.where(keep[..., None], topk_ids, 0),
            torch.where(keep[..., None], topk_logprobs, 0.0), torch.where(keep, tail_logmass, 0.0), labels,
            objective=objective, temperature=temperature, alpha=alpha, beta=beta, skew_alpha=skew_alpha,
            ignore_index=ignore_index, kd_mask=kd_mask, logit_softcap=logit_softcap,
        )
        return {name: torch.where(keep, values, 0.0) for name, values in out.items()}
    zeros = student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.float32)
    kd = zeros
    ce = zeros
    if alpha < 1.0:
        kd = sparse_token_divergence(
            student_logits, topk_ids, topk_logprobs, tail_logmass, objective, temperature, beta, skew_alpha,
            logit_softcap,
        )
    if labels is not None and (alpha > 0.0 or kd_mask is not None):
        ce = token_cross_entropy(softcap(student_logits, logit_softcap), labels, ignore_index)
    loss = alpha * ce + (1.0 - alpha) * kd
    if kd_mask is not None:
        kd_mask = kd_mask.bool()
        kd = torch.where(kd_mask, kd, zeros)
        loss = torch.where(kd_mask, loss, ce)
    return {"loss": loss, "kd": kd, "ce": ce}


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # Logits in fp32 even for bf16 activations: the softmax gradients need the small differences.
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class _FusedSparseLoss(torch.autograd.Function):
    """Sums of (loss, kd, ce) over the counted tokens, computed chunk by chunk.

    The gradient of the loss w.r.t. hidden states and the head is accumulated
    during the forward pass, so at most chunk_size x V logits exist at a time
    and backward only rescales the stored gradients by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, topk_ids, topk_logprobs, tail_logmass, kd_mask, options):
        compute = _compute_dtype(hidden)
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        head = weight.detach().to(compute)
        head_bias = None if bias is None else bias.detach().to(compute)
        grad_hidden = torch.zeros(hidden.shape, dtype=compute, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if needs_bias else None
        totals = torch.zeros(3, dtype=compute, device=hidden.device)
        options = dict(options)
        chunk_size, scale = options.pop("chunk_size"), options.pop("scale")
        transform = options.pop("student_transform")
        # Autocast would run the head projection in bf16; the gradients below need fp32 logits.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_size):
                chunk_rows = rows[start : start + chunk_size]
                chunk_hidden = hidden.detach().index_select(0, chunk_rows).to(compute)
                logits = chunk_hidden @ head.T if head_bias is None else torch.addmm(head_bias, chunk_hidden, head.T)
                with torch.enable_grad():
                    leaf = logits.requires_grad_(True)
                    per_token = sparse_per_token_distillation_loss(
                        leaf if transform is None else transform.apply(leaf), topk_ids.index_select(0, chunk_rows), topk_logprobs.index_select(0, chunk_rows),
                        tail_logmass.index_select(0, chunk_rows), labels.index_select(0, chunk_rows),
                        kd_mask=None if kd_mask is None else kd_mask.index_select(0, chunk_rows), **options,
                    )
                    chunk_loss = per_token["loss"].sum()
                    (grad_logits,) = torch.autograd.grad(chunk_loss, leaf)
                totals += torch.stack([chunk_loss.detach(), per_token["kd"].detach().sum(), per_token["ce"].detach().sum()]).to(compute)
                grad_logits = grad_logits.to(compute)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, chunk_rows, grad_logits @ head)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, chunk_hidden)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scale = scale
        loss, kd, ce = (totals * scale).unbind()
        ctx.mark_non_differentiable(kd, ce)  # reported figures; only the loss is differentiated
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        results = []
        for grad, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.input_dtypes):
            results.append((grad * (grad_loss * ctx.scale).to(grad.dtype)).to(dtype) if present else None)
        return (*results, None, None, None, None, None, None, None)


def fused_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    chunk_size: int = 1024,
    reduction: str = "sum",
    ignore_index: int = -100,
    kd_mask: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    student_transform=None,
) -> dict[str, torch.Tensor]:
    """{"loss", "kd", "ce"} from student hidden states [N, H] and a sparse teacher, never building N x V logits.

    The sparse twin of `alambic.losses.fused.fused_distillation_loss`, with the
    same conventions: rows count where `mask` is true; without a mask, where
    labels != ignore_index; without either, all rows. "sum" adds the counted
    rows, "mean" divides by their number. topk_ids / topk_logprobs [N, k] and
    tail_logmass [N] describe the teacher; kd_mask [N] as in
    `sparse_per_token_distillation_loss`. Only "loss" carries a gradient.
    """
    _check_objective(objective, top_k)
    check_loss_parameters(
        "fused_sparse_distillation_loss", objective=objective, temperature=temperature, alpha=alpha,
        beta=beta, skew_alpha=skew_alpha, logit_softcap=logit_softcap,
    )
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"fused_sparse_distillation_loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size < 1:
        raise ConfigError(f"fused_sparse_distillation_loss: chunk_size must be >= 1, got {chunk_size}")
    total = student_hidden.shape[0]
    device = student_hidden.device
    if mask is None and labels is not None:
        mask = labels != ignore_index
    rows = torch.arange(total, device=device) if mask is None else mask.reshape(total).nonzero().squeeze(1)
    if labels is None:
        labels = torch.full((total,), ignore_index, dtype=torch.long, device=device)
    options = {
        "objective": objective, "temperature": temperature, "alpha": alpha, "beta": beta, "skew_alpha": skew_alpha,
        "ignore_index": ignore_index, "chunk_size": chunk_size, "logit_softcap": logit_softcap,
        "student_transform": student_transform,
        "scale": 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0,
    }
    loss, kd, ce = _FusedSparseLoss.apply(
        student_hidden, student_head_weight, student_head_bias, rows, labels.reshape(total),
        topk_ids, topk_logprobs, tail_logmass, None if kd_mask is None else kd_mask.reshape(total), options,
    )
    return {"loss": loss, "kd": kd, "ce": ce}
