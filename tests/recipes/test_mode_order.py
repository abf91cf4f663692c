"""Modes compose explicitly: applying the configured modes in any order gives the same run.

For several combinations of modes, the run is assembled with the modes applied
in the registry order, reversed, and shuffled; the loss (and every logged
term) of the first batch, after the rollout, must be the same bit for bit.
"""

import random

import pytest
import torch
from accelerate.utils import set_seed

from alambic.config import DistillConfig
from alambic.training.modes import MODE_MODULES
from alambic.training.setup import build_models
from alambic.training.step_loss import loss_sums
from modes_micro import build_micro, classifier_config, first_batch, micro_config


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro"))


def _orders() -> list[tuple[str, ...]]:
    shuffled = [list(MODE_MODULES) for _ in range(2)]
    for seed, order in enumerate(shuffled):
        random.Random(seed).shuffle(order)
    return [MODE_MODULES, tuple(reversed(MODE_MODULES)), *map(tuple, shuffled)]


def _combinations(micro, run):
    representation = {"hidden": {"layer_map": "uniform"}, "relation": {"kind": "token"}, "output_cosine": 0.5}
    exits = {"teacher": "none", "early_exit_layers": [0]}
    return {
        "representation+minillm": (micro_config(
            micro, run, representation={**representation, "attention": {"layer_map": "last"}},
            rollout={"policy": "minillm", "max_new_tokens": 4}, loss={"objective": "reverse_kl", "alpha": 0.0}),
            {"rep_hidden", "rep_attention", "rep_relation", "rep_output_cosine", "minillm_long_term"}),
        "self_distill+representation+on_policy": (micro_config(
            micro, run, teacher=None, self_distill={"teacher": "ema", "early_exit_layers": [0]},
            representation={"hidden": {"layer_map": "last"}},
            rollout={"policy": "on_policy", "lambda": 1.0, "max_new_tokens": 4}),
            {"early_exit", "rep_hidden"}),
        "co_distill+early_exits": (micro_config(
            micro, run, teacher=None, co_distill={"peers": [str(micro["peer"])]}, self_distill=exits),
            {"peer_loss", "early_exit"}),
        "ensemble(divergences)+early_exits": (micro_config(
            micro, run, teacher=None, self_distill=exits, ensemble={"method": "confidence", "mix": "divergences"},
            teachers=[{"model": str(micro["teacher"]), "name": "a"}, {"model": str(micro["teacher_b"]), "name": "b"}]),
            {"early_exit"}),
        "interchange+quantization+representation": (micro_config(
            micro, run, interchange={"layer_map": {0: 0}, "num_positions": 2},
            quantization={"bits": 4, "group_size": 16}, representation={"hidden": {"layer_map": "last"}}),
            {"interchange", "rep_hidden"}),
        "classifier: early_exits+representation": (classifier_config(
            micro, run, self_distill=exits, representation={"hidden": {"layer_map": "uniform"}}),
            {"early_exit", "rep_hidden"}),
    }


def _first_step(mapping: dict, order) -> dict:
    config = DistillConfig.model_validate(mapping)
    set_seed(config.train.seed)
    setup = build_models(config, torch.device("cpu"), mode_order=order)
    batch = setup.rollout(first_batch(mapping, setup), 1)
    sums = loss_sums(setup.student, batch, setup.teacher, config.loss, config.task, setup.extra_terms)
    return {name: value.detach().clone() for name, value in sums.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("combination", ["representation+minillm", "self_distill+representation+on_policy",
                                         "co_distill+early_exits", "ensemble(divergences)+early_exits",
                                         "interchange+quantization+representation",
                                         "classifier: early_exits+representation"])
def test_the_order_modes_are_applied_in_does_not_change_the_loss(micro, tmp_path, combination):
    mapping, expected_terms = _combinations(micro, tmp_path / "run")[combination]
    results = [_first_step(mapping, order) for order in _orders()]
    reference = results[0]
    assert expected_terms <= set(reference), f"a mode of {combination} did not add its term: {sorted(reference)}"
    assert torch.isfinite(reference["loss"]) and reference["loss"] != 0
    for order, result in zip(_orders()[1:], results[1:]):
        assert set(result) == set(reference), order
        for name, value in reference.items():
            assert torch.equal(result[name], value), f"{combination}: {name} differs with modes applied in {order}"


def test_a_bad_order_is_refused():
    from alambic.training.modes import configure_modes

    with pytest.raises(ValueError, match="each of"):
        configure_modes(None, None, order=("ensemble", "ensemble"))
