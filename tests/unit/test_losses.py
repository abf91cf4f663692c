"""Divergences against plain references written here and hand-computed values."""

import math

import pytest
import torch

from alambic.losses import OBJECTIVES, distillation_loss, per_token_distillation_loss, token_divergence


def reference(student_logits, teacher_logits, objective, temperature=1.0, beta=0.5, skew_alpha=0.1):
    """Straight-from-the-definition divergences, one position at a time, in float64."""
    out = []
    for s_row, t_row in zip(student_logits.double().reshape(-1, student_logits.shape[-1]),
                            teacher_logits.double().reshape(-1, teacher_logits.shape[-1])):
        q = torch.softmax(s_row / temperature, -1).tolist()
        p = torch.softmax(t_row / temperature, -1).tolist()

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

        if objective == "forward_kl":
            value = kl(p, q)
        elif objective == "reverse_kl":
            value = kl(q, p)
        elif objective == "jsd":
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            value = beta * kl(p, m) + (1 - beta) * kl(q, m)
        elif objective == "skew_forward_kl":
            value = kl(p, [skew_alpha * x + (1 - skew_alpha) * y for x, y in zip(p, q)])
        elif objective == "skew_reverse_kl":
            value = kl(q, [(1 - skew_alpha) * x + skew_alpha * y for x, y in zip(p, q)])
        elif objective == "tvd":
            value = 0.5 * sum(abs(x - y) for x, y in zip(p, q))
        elif objective == "cosine":
            s, t = s_row.tolist(), t_row.tolist()
            dot = sum(a * b for a, b in zip(s, t))
            value = 1 - dot / (math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t)))
            out.append(value)
            continue
        out.append(value * temperature**2)
    return torch.tensor(out, dtype=torch.float64).reshape(student_logits.shape[:-1])


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_matches_plain_reference(objective, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 11) * 2, torch.randn(3, 4, 11) * 2
    got = token_divergence(student, teacher, objective, temperature, beta=0.3, skew_alpha=0.2)
    want = reference(student, teacher, objective, temperature, beta=0.3, skew_alpha=0.2)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_hand_computed_values_on_three_token_vocabulary():
    # p = teacher = (1/2, 1/4, 1/4); q = student = (1/4, 1/2, 1/4), given as log-probs (softmax-invariant).
    teacher = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    student = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    ln2 = math.log(2)
    # KL(p||q) = 1/2 ln 2 + 1/4 ln(1/2) = ln2/4 ; KL(q||p) = 1/4 ln(1/2) + 1/2 ln 2 = ln2/4
    assert token_divergence(student, teacher, "forward_kl").item() == pytest.approx(ln2 / 4, rel=1e-6)
    assert token_divergence(student, teacher, "reverse_kl").item() == pytest.approx(ln2 / 4, rel=1e-6)
    # TVD = 1/2 (1/4 + 1/4 + 0) = 1/4
    assert token_divergence(student, teacher, "tvd").item() == pytest.approx(0.25, rel=1e-6)
    # JSD(beta=1/2): m = (3/8, 3/8, 1/4); 1/2 KL(p||m) + 1/2 KL(q||m) = 1/2 ln(4/3) + 1/4 ln(2/3)
    jsd = 0.5 * (0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)) * 2
    assert token_divergence(student, teacher, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-6)
    # skew forward KL with a = 1/2 uses the same mixture: KL(p||m) = 1/2 ln(4/3) + 1/4 ln(2/3)
    skl = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert token_divergence(student, teacher, "skew_forward_kl", skew_alpha=0.5).item() == pytest.approx(skl, rel=1e-6)
    # cosine of raw logits (ln.5, ln.25, ln.25) vs (ln.25, ln.5, ln.25) = (2a b + b^2)/(a^2 + 2 b^2)
    a, b = math.log(0.5), math.log(0.25)
    cos = (2 * a * b + b * b) / (a * a + 2 * b * b)
    assert token_divergence(student, teacher, "cosine").item() == pytest.approx(1 - cos, rel=1e-6)


def test_jsd_endpoints_equal_the_two_kls():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    forward = token_divergence(student, teacher, "forward_kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    torch.testing.assert_close(token_divergence(student, teacher, "jsd", beta=0.0), forward)
    torch.testing.assert_close(token_divergence(student, teacher, "jsd", beta=1.0), reverse)
    # and the interior is a genuinely different quantity
    assert not torch.allclose(token_divergence(student, teacher, "jsd", beta=0.5), forward)
    # skew KLs tend to the plain KLs of their direction as alpha -> 0 (alpha = 0 itself is refused)
    torch.testing.assert_close(token_divergence(student, teacher, "skew_forward_kl", skew_alpha=1e-7), forward)
    torch.testing.assert_close(token_divergence(student, teacher, "skew_reverse_kl", skew_alpha=1e-7), reverse)


def test_temperature_squared_scaling_keeps_gradient_scale():
    torch.manual_seed(2)
    teacher = torch.randn(4, 7)
    base = torch.randn(4, 7)
    value_t1 = token_divergence(base, teacher, "forward_kl", temperature=1.0)
    value_t3 = token_divergence(base, teacher, "forward_kl", temperature=3.0)
    unscaled_t3 = reference(base, teacher, "forward_kl", temperature=3.0) / 9.0
    torch.testing.assert_close(value_t3.double(), unscaled_t3 * 9.0, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(value_t1, value_t3)
    # With T^2, the gradient w.r.t. logits at high T approaches (q - p)/T * T^2 / T = ... of order 1/T * T^2 / T.
    student = base.clone().requires_grad_(True)
    token_divergence(student, teacher, "forward_kl", temperature=3.0).sum().backward()
    grad_t3 = student.grad.clone()
    p = torch.softmax(teacher / 3, -1)
    q = torch.softmax(base / 3, -1)
    torch.testing.assert_close(grad_t3, (q - p) * 3.0, rtol=1e-5, atol=1e-6)


def test_masked_positions_change_neither_loss_nor_gradients():
    torch.manual_seed(3)
    student = torch.randn(2, 5, 13, requires_grad=True)
    teacher = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    first = distillation_loss(student, teacher, labels, mask, objective="jsd", alpha=0.3)["loss"]
    first.backward()
    grad_first = student.grad.clone()
    student.grad = None
    # Garbage at masked positions (huge logits, other labels) must not matter.
    corrupted = student.detach().clone()
    corrupted[~mask] = 1e4
    corrupted.requires_grad_(True)
    corrupted_teacher = teacher.clone()
    corrupted_teacher[~mask] = -1e4
    labels2 = labels.clone()
    labels2[~mask] = 0
    second = distillation_loss(corrupted, corrupted_teacher, labels2, mask, objective="jsd", alpha=0.3)["loss"]
    second.backward()
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(grad_first[mask], corrupted.grad[mask])
    assert torch.all(corrupted.grad[~mask] == 0)


def test_labels_ignore_index_acts_as_mask_and_alpha_mixes():
    torch.manual_seed(4)
    student, teacher = torch.randn(6, 8), torch.randn(6, 8)
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    out = distillation_loss(student, teacher, labels, alpha=0.25, objective="forward_kl", temperature=2.0)
    keep = labels != -100
    kd = token_divergence(student, teacher, "forward_kl", 2.0)[keep].mean()
    ce = torch.nn.functional.cross_entropy(student[keep], labels[keep])
    torch.testing.assert_close(out["kd"], kd)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], 0.25 * ce + 0.75 * kd)
    no_teacher = per_token_distillation_loss(student, None, labels)
    torch.testing.assert_close(no_teacher["loss"][keep].mean(), ce)


def test_top_k_restricts_both_distributions_to_teacher_support():
    teacher = torch.tensor([[5.0, 4.0, -1.0, -2.0, 0.0]])
    student = torch.tensor([[1.0, 2.0, 9.0, 9.0, 3.0]])
    got = token_divergence(student, teacher, "forward_kl", top_k=2)
    # support = ids {0, 1}; renormalised p over (5, 4), q over (1, 2)
    p = torch.softmax(torch.tensor([5.0, 4.0]), -1)
    q = torch.softmax(torch.tensor([1.0, 2.0]), -1)
    want = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(got[0], want)
    # student mass on tokens outside the teacher's top-k is ignored entirely
    student2 = student.clone()
    student2[0, 2:] = -50.0
    torch.testing.assert_close(token_divergence(student2, teacher, "forward_kl", top_k=2), got)
    # k >= V equals no restriction
    torch.testing.assert_close(
        token_divergence(student, teacher, "reverse_kl", top_k=99), token_divergence(student, teacher, "reverse_kl")
    )


def test_bf16_inputs_are_computed_in_fp32():
    torch.manual_seed(5)
    student, teacher = torch.randn(4, 50), torch.randn(4, 50)
    got = token_divergence(student.bfloat16(), teacher.bfloat16(), "forward_kl")
    assert got.dtype == torch.float32
    want = token_divergence(student.bfloat16().float(), teacher.bfloat16().float(), "forward_kl")
    torch.testing.assert_close(got, want)
