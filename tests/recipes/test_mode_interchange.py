"""Interchange-intervention distillation: the pyvene term equals a swap built by hand with forward hooks."""

import pytest
import torch
import torch.nn.functional as F

from alambic.config import DistillConfig
from alambic.errors import ConfigError
from alambic.training.loop import run_distillation
from alambic.training.step_loss import StepOutputs, loss_sums
from helpers import expect_exit_2, invoke, write_config
from modes_micro import build_micro, build_setup, first_batch, micro_config

SECTION = {"layer_map": {0: 0}, "weight": 1.0, "num_positions": 3, "pairing": "shuffle"}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_interchange"))


def _term(setup):
    terms = [t for t in setup.extra_terms if type(t).__name__ == "InterchangeTerm"]
    assert len(terms) == 1
    return terms[0]


def _block_outputs(model, layer, inputs):
    """Output of block `layer` (hooked, so it is the block's own output, not a normed final state)."""
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(**inputs, use_cache=False)
    handle.remove()
    return captured["h"]


def _swapped_logits(model, layer, inputs, sources, positions):
    """Logits of `model` with block `layer`'s outputs at `positions` taken from rows `sources`, by hand."""
    source_states = _block_outputs(model, layer, inputs)[sources]
    rows = torch.arange(positions.shape[0])[:, None]

    def swap(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[rows, positions] = source_states[rows, positions]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(swap)
    logits = model(**inputs, use_cache=False).logits
    handle.remove()
    return logits


def _hand_built(setup, batch, term):
    student_layer, teacher_layer, sources, positions = term.plan(batch, term._generator(batch))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_logits = _swapped_logits(setup.student.model, student_layer, inputs, sources, positions)
    with torch.no_grad():
        teacher_logits = _swapped_logits(setup.teacher_model, teacher_layer, inputs, sources, positions)
    labels = batch["labels"][:, 1:]
    first = positions.min(1).values
    mask = (labels != -100) & (torch.arange(labels.shape[1])[None] >= first[:, None])
    teacher_logp = F.log_softmax(teacher_logits[:, :-1].float(), -1)
    student_logp = F.log_softmax(student_logits[:, :-1].float(), -1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (kl * mask).sum(), int(mask.sum())


def test_interchange_term_equals_a_hand_built_hook_swap(micro, tmp_path):
    mapping = micro_config(micro, tmp_path / "run", interchange=SECTION)
    setup, config = build_setup(mapping)
    batch = first_batch(mapping, setup)
    term = _term(setup)
    sums = loss_sums(setup.student, dict(batch), setup.teacher, config.loss, config.task, setup.extra_terms)
    expected, counted = _hand_built(setup, batch, term)
    assert counted > 0
    assert torch.allclose(sums["interchange"], expected, rtol=1e-4, atol=1e-5)
    assert sums["interchange"] > 0

    # The gradient of the term reaches the student the same way as through the hand-built swap.
    setup.student.zero_grad()
    term_only = term(_step(setup, config, batch))["loss"]
    term_only.backward()
    got = setup.student.model.model.layers[0].mlp.up_proj.weight.grad.clone()
    setup.student.zero_grad()
    _hand_built(setup, batch, term)[0].backward()
    want = setup.student.model.model.layers[0].mlp.up_proj.weight.grad
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)


def _step(setup, config, batch):
    from alambic.losses.options import LossOptions
    from alambic.teachers.base import SignalRequest

    outputs = setup.student(batch["input_ids"], batch["attention_mask"], hidden_only=True, output_hidden_states=True)
    signal = setup.teacher(batch, SignalRequest(hidden_for_fused_head=True, hidden_states=True))
    return StepOutputs(setup.student, dict(batch), outputs, signal, LossOptions.from_config(config.loss), config.task)


def test_the_hook_swap_agrees_with_pyvene(micro, tmp_path):
    """pyvene (the causal-distillation authors' library) as an independent reference, when installed."""
    pv = pytest.importorskip("pyvene")
    from alambic.models.interventions import LayerSwap, gather_positions

    mapping = micro_config(micro, tmp_path / "run", interchange=SECTION)
    setup, _ = build_setup(mapping)
    batch, term = first_batch(mapping, setup), _term(setup)
    _, _, sources, positions = term.plan(batch, term._generator(batch))
    body = setup.teacher_model.base_model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        source = gather_positions(body(**inputs, output_hidden_states=True).hidden_states[1][sources], positions)
        ours = LayerSwap(body, 0)(inputs, positions, source)
        config = pv.IntervenableConfig(representations=[{"layer": 0, "component": "block_output", "unit": "pos"}],
                                       intervention_types=pv.VanillaIntervention)
        _, theirs = pv.IntervenableModel(config, model=body)(
            {**inputs, "use_cache": False}, unit_locations={"base": [positions.tolist()]}, source_representations=source)
    assert torch.allclose(ours, theirs.last_hidden_state, atol=1e-5)


def test_identical_teacher_and_student_give_zero(micro, tmp_path):
    mapping = micro_config(micro, tmp_path / "run", interchange={**SECTION, "layer_map": {0: 0}})
    mapping["student"] = {"model": str(micro["teacher"])}
    setup, config = build_setup(mapping)
    sums = loss_sums(setup.student, first_batch(mapping, setup), setup.teacher, config.loss, config.task,
                     setup.extra_terms)
    assert abs(float(sums["interchange"])) < 1e-4
    assert abs(float(sums["kd"])) < 1e-4


def test_last_block_and_missing_teacher_are_refused_before_training(micro, tmp_path, capsys):
    with pytest.raises(ConfigError, match="last one cannot be intervened"):
        build_setup(micro_config(micro, tmp_path / "a", interchange={**SECTION, "layer_map": {1: 0}}))
    expect_exit_2(capsys, tmp_path, micro_config(micro, tmp_path / "run", teacher=None, interchange=SECTION),
                  "interchange cannot be used with no teacher.model", fix=True)


def test_a_run_with_the_interchange_term_trains_and_exports(micro, tmp_path, capsys):
    mapping = micro_config(micro, tmp_path / "run", interchange={**SECTION, "positions": [1, 5]})
    mapping["data"]["packing"] = True
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    assert (result.output_dir / "final" / "model.safetensors").is_file()
    assert result.history[-1]["loss"] > 0
    code, _, err = invoke(capsys, "validate", write_config(tmp_path / "c.yaml", mapping))
    assert code == 0, err
