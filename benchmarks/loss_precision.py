"""Precision of the loss VALUE and GRADIENT, fp32 fused kernel and fp32 plain path vs a float64 reference.

Cases: "big" (logits of +-30000, disjoint supports: JSD(beta 0.5) = ln 2 per row),
"big2" (random +-30000), "small" (N(0, 0.05^2) logits, V = 32000: nearly equal
distributions, where log-ratios cancel), "normal" (N(0, 9), V = 32000). Relative
errors of the summed value and of the gradient norm; the reference is the plain
path's own formulas run in float64. Deterministic (CPU, seeded), a few seconds.

    python benchmarks/loss_precision.py
"""

from __future__ import annotations

from unittest import mock

import torch

from alambic.losses.divergences import token_divergence
from alambic.losses.fused_kernels import LossSpec, block_loss_and_grad

OBJECTIVES = [("jsd", 0.5), ("jsd", 0.1), ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5),
              ("forward_kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5)]


def _float64_divergence(*args, **kwargs):
    original = torch.Tensor.float
    keep = lambda self, *a, **k: self if self.dtype == torch.float64 else original(self, *a, **k)  # noqa: E731
    with mock.patch.object(torch.Tensor, "float", keep):
        return token_divergence(*args, **kwargs)


def _cases():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.full((8, 1000), -30000.0), torch.full((8, 1000), -30000.0)
    student[:, 0], teacher[:, 1] = 30000.0, 30000.0
    yield "big", student, teacher
    signs = lambda: (torch.randint(0, 2, (8, 1000), generator=generator) * 2 - 1) * 30000.0  # noqa: E731
    yield "big2", signs(), signs()
    yield "small", torch.randn(64, 32000, generator=generator) * 0.05, torch.randn(64, 32000, generator=generator) * 0.05
    yield "normal", torch.randn(64, 32000, generator=generator) * 3, torch.randn(64, 32000, generator=generator) * 3


def main() -> None:
    print("| logits | objective | beta | value: plain fp32 | value: fused fp32 | gradient: plain fp32 | gradient: fused fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, student, teacher in _cases():
        for objective, beta in OBJECTIVES:
            options = {"objective": objective, "beta": beta, "skew_alpha": 0.1}
            reference_leaf = student.double().requires_grad_()
            reference = _float64_divergence(reference_leaf, teacher.double(), **options).sum()
            reference.backward()
            plain_leaf = student.clone().requires_grad_()
            plain = token_divergence(plain_leaf, teacher, **options).sum()
            plain.backward()
            spec = LossSpec(objective=objective, temperature=1.0, beta=beta, skew_alpha=0.1, top_k=None,
                            kd_weight=1.0, ce_weight=0.0, labels_may_be_ignored=False)
            fused, _, fused_grad = block_loss_and_grad(student.clone(), teacher, None, spec)

            def value_error(value):
                return abs(float(value) - float(reference.detach())) / abs(float(reference.detach()))

            def grad_error(grad):
                norm = reference_leaf.grad.norm()
                return float((grad.double() - reference_leaf.grad).norm() / norm) if norm > 1e-12 else float("nan")

            print(f"| {name} | {objective} | {beta} | {value_error(plain.detach()):.1e} | {value_error(fused):.1e} "
                  f"| {grad_error(plain_leaf.grad):.1e} | {grad_error(fused_grad):.1e} |")


if __name__ == "__main__":
    main()
