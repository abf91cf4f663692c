"""LossOptions: one description of the logit loss; settings a path cannot honour are refused, not dropped."""

import pytest
import torch

from alambic.config import LossConfig
from alambic.errors import ConfigError
from alambic.losses import per_token_distillation_loss
from alambic.losses.options import LossOptions
from alambic.losses.sparse import fused_sparse_distillation_loss, sparse_per_token_distillation_loss
from alambic.teachers.base import TeacherSignal, WeightedSignal
from alambic.training.step_loss import per_token_loss, shift_signal


def _sparse(batch=2, length=5, vocab=11, k=3, temperature=None):
    logits = torch.randn(batch, length, vocab)
    logprobs, ids = torch.log_softmax(logits, -1).topk(k)
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1 - 1e-6))
    return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail, temperature=temperature)


def test_from_config_carries_every_setting():
    config = LossConfig(objective="jsd", temperature=2.0, alpha=0.3, beta=0.2, skew_alpha=0.4, top_k=7,
                        logit_softcap=30.0)
    options = LossOptions.from_config(config)
    assert options.kwargs() == {"objective": "jsd", "temperature": 2.0, "alpha": 0.3, "beta": 0.2,
                                "skew_alpha": 0.4, "top_k": 7, "logit_softcap": 30.0}
    with pytest.raises(AttributeError):
        options.temperature = 1.0  # frozen: nobody edits it on the way


def test_sparse_losses_refuse_top_k_instead_of_ignoring_it():
    signal = _sparse()
    student = torch.randn(2, 5, 11)
    with pytest.raises(ConfigError, match="loss.top_k=4 cannot apply to a sparse teacher"):
        sparse_per_token_distillation_loss(student, signal.topk_ids, signal.topk_logprobs, signal.tail_logmass,
                                           top_k=4)
    with pytest.raises(ConfigError, match="loss.top_k"):
        fused_sparse_distillation_loss(torch.randn(10, 4), torch.randn(11, 4), None, None, None,
                                       topk_ids=signal.topk_ids.reshape(10, 3),
                                       topk_logprobs=signal.topk_logprobs.reshape(10, 3),
                                       tail_logmass=signal.tail_logmass.reshape(10), top_k=4)
    with pytest.raises(ConfigError, match="loss.top_k"):
        per_token_loss(student, signal, None, LossOptions(top_k=4))


def test_the_signal_temperature_is_checked_by_the_loss():
    student = torch.randn(2, 5, 11)
    per_token_loss(student, _sparse(temperature=2.0), None, LossOptions(temperature=2.0))  # same T: fine
    with pytest.raises(ConfigError, match="temperature 2.0"):
        per_token_loss(student, _sparse(temperature=2.0), None, LossOptions(temperature=1.0))


def test_a_composite_signal_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    student, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    dense = TeacherSignal(logits=torch.randn(2, 5, 11))
    sparse = _sparse()
    weight = torch.rand(2, 5)
    composite = TeacherSignal(components=(WeightedSignal(dense, weight), WeightedSignal(sparse, 1 - weight)))
    options = LossOptions(objective="reverse_kl", alpha=0.25)
    got = per_token_loss(student, composite, labels, options)
    first = per_token_distillation_loss(student, dense.logits, labels, **options.kwargs())
    second = per_token_loss(student, sparse, labels, options)
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[name], weight * first[name] + (1 - weight) * second[name])
    shifted = shift_signal(composite)
    assert shifted.components[0].signal.logits.shape == (2, 4, 11) and shifted.components[1].weight.shape == (2, 4)
