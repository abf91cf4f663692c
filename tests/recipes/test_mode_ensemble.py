"""Multi-teacher distillation: the weights and the routing change the target as configured."""

import math

import pytest
import torch

from alambic.config import DistillConfig
from alambic.losses import per_token_distillation_loss
from alambic.losses.options import LossOptions
from alambic.teachers.base import SignalRequest
from alambic.teachers.ensemble import confidence_weights, dense_logprobs_from_topk, mixture_logits
from alambic.training.loop import run_distillation
from alambic.training.step_loss import per_token_loss, shift_signal
from helpers import expect_exit_2
from modes_micro import build_micro, build_setup, first_batch, micro_config

T = 2.0


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_ens"))


def _teachers(micro, weight_a=1.0, weight_b=1.0):
    return [{"model": str(micro["teacher"]), "name": "a", "weight": weight_a},
            {"model": str(micro["teacher_b"]), "name": "b", "weight": weight_b}]


def _config(micro, tmp_path, weights=(1.0, 1.0), **ensemble):
    mapping = micro_config(micro, tmp_path / "run", teacher=None, teachers=_teachers(micro, *weights),
                           ensemble=ensemble or None)
    mapping["loss"]["temperature"] = T
    return mapping


def _teacher_probs(setup, batch):
    """Each teacher's own distribution at T, straight from its model."""
    return [torch.softmax(member.source(batch, SignalRequest()).logits / T, -1) for member in setup.teacher.members]


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (3.0, 1.0)])
def test_fixed_weights_give_the_weighted_mixture(micro, tmp_path, weights):
    mapping = _config(micro, tmp_path, weights, method="fixed")
    setup, _ = build_setup(mapping)
    batch = first_batch(mapping, setup)
    probs_a, probs_b = _teacher_probs(setup, batch)
    target = torch.softmax(setup.teacher(batch, SignalRequest()).logits / T, -1)
    share_a = weights[0] / sum(weights)
    torch.testing.assert_close(target, share_a * probs_a + (1 - share_a) * probs_b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(probs_a, probs_b, atol=1e-3), "the two teachers must differ for this test to mean anything"


def test_routing_sends_each_row_to_the_teacher_its_column_names(micro, tmp_path):
    mapping = _config(micro, tmp_path, method="route", route_column="teacher")
    setup, _ = build_setup(mapping)
    batch = first_batch(mapping, setup)  # rows 0..3 of train.jsonl: teachers b, a, b, a
    probs_a, probs_b = _teacher_probs(setup, batch)
    target = torch.softmax(setup.teacher(batch, SignalRequest()).logits / T, -1)
    for row, name in enumerate("baba"):
        expected = (probs_a if name == "a" else probs_b)[row]
        torch.testing.assert_close(target[row], expected, rtol=1e-4, atol=1e-6)


def test_divergences_mix_is_the_weighted_sum_of_each_teachers_loss(micro, tmp_path):
    mapping = _config(micro, tmp_path, (3.0, 1.0), method="fixed", mix="divergences")
    mapping["loss"].update(objective="jsd", alpha=0.3)
    setup, config = build_setup(mapping)
    batch = first_batch(mapping, setup)
    signal = setup.teacher(batch, SignalRequest())
    student_logits = torch.randn(*batch["input_ids"].shape, setup.vocab_size)[:, :-1]
    labels = batch["labels"][:, 1:]
    options = LossOptions.from_config(config.loss)
    assert signal.components is not None and len(signal.components) == 2
    got = per_token_loss(student_logits, shift_signal(signal), labels, options)
    each = [per_token_distillation_loss(student_logits, member.source(batch, SignalRequest()).logits[:, :-1], labels,
                                        **options.kwargs()) for member in setup.teacher.members]
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[name], 0.75 * each[0][name] + 0.25 * each[1][name], rtol=1e-5, atol=1e-6)


def test_confidence_weights_favour_the_surer_teacher():
    sure = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    unsure = torch.log(torch.full((4,), 0.25))
    weights = confidence_weights(torch.stack([sure, unsure]), torch.tensor([1.0, 1.0]))
    entropy_sure = -(sure.exp() * sure).sum()
    expected_sure = math.exp(-entropy_sure) / (math.exp(-entropy_sure) + math.exp(-math.log(4)))
    torch.testing.assert_close(weights[0], torch.tensor(expected_sure))
    assert weights[0] > 0.5 and torch.isclose(weights.sum(), torch.tensor(1.0))


def test_mixture_logits_and_sparse_members_are_proper_distributions():
    logprobs = torch.log_softmax(torch.randn(2, 3, 5), -1)
    weights = torch.tensor([0.25, 0.75]).view(2, 1).expand(2, 3)
    mixture = torch.softmax(mixture_logits(logprobs, weights, T) / T, -1)
    torch.testing.assert_close(mixture, 0.25 * logprobs[0].exp() + 0.75 * logprobs[1].exp())
    dense = dense_logprobs_from_topk(torch.tensor([[3, 0]]), torch.log(torch.tensor([[0.5, 0.2]])),
                                     torch.log(torch.tensor([0.3])), vocab_size=5)
    torch.testing.assert_close(dense.exp(), torch.tensor([[0.2, 0.1, 0.1, 0.5, 0.1]]))


def test_an_ensemble_trains_through_the_loop(micro, tmp_path):
    mapping = _config(micro, tmp_path, method="confidence", mix="divergences")
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    assert "eval_kl" in result.final_metrics  # live teachers: the held-out KL is against the mixture
    assert "ensemble of a, b" in (result.output_dir / "final" / "README.md").read_text()


def test_a_route_to_an_unknown_teacher_exits_2(micro, tmp_path, capsys):
    mapping = _config(micro, tmp_path, method="route", route_column="teacher")
    mapping["teachers"][1]["name"] = "c"
    expect_exit_2(capsys, tmp_path, mapping, "routes to teacher 'b'", "fix:", "a, c")


def test_route_without_its_column_exits_2(micro, tmp_path, capsys):
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, method="route"), "needs route_column")
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, method="route", route_column="domain"),
                   "has no column 'domain'", "fix:")


def test_teacher_and_teachers_together_exit_2(micro, tmp_path, capsys):
    mapping = _config(micro, tmp_path)
    mapping["teacher"] = {"model": str(micro["teacher"])}
    expect_exit_2(capsys, tmp_path, mapping, "both `teacher:` and `teachers:`", "fix:")


def test_a_teacher_with_another_tokenizer_exits_2(micro, tmp_path, capsys):
    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.testing import tiny_llama

    other = build_tokenizer(["completely different text " * 20], 300)
    folder = tmp_path / "other_teacher"
    tiny_llama(len(other), hidden=32, layers=1, heads=2).save_pretrained(folder)
    other.save_pretrained(folder)
    mapping = _config(micro, tmp_path)
    mapping["teachers"][1]["model"] = str(folder)
    expect_exit_2(capsys, tmp_path, mapping, "tokenizers", "fix:")
