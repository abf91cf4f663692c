"""Representation transfer through the one loop: projections train with the student and are not exported."""

import pytest
import torch
from safetensors import safe_open

from alambic.config import DistillConfig
from alambic.losses.representation import attention_mse
from alambic.training.loop import run_distillation
from alambic.training.step_loss import loss_sums
from helpers import expect_exit_2
from modes_micro import build_micro, build_setup, classifier_config, first_batch, micro_config

TERMS = {"hidden": {"loss": "mse", "layer_map": "uniform"}, "attention": {}, "relation": {"kind": "token"}, "output_cosine": 1.0}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_rep"))


def _losses(setup, config, batch, fused=True):
    loss_cfg = config.loss.model_copy(update={"fused": fused})
    return loss_sums(setup.student, dict(batch), setup.teacher, loss_cfg, config.task, setup.extra_terms)


def test_projections_train_with_the_student_and_are_dropped_at_export(micro, tmp_path):
    mapping = micro_config(micro, tmp_path / "run", representation=TERMS)
    setup, config = build_setup(mapping)
    projections = setup.student.auxiliary["representation"]
    assert sorted(projections) == ["hidden_0", "hidden_1", "output"]  # student width 32 -> teacher width 64
    assert projections["hidden_0"].weight.shape == (64, 32)
    initial = {name: p.detach().clone() for name, p in projections.named_parameters()}

    sums = _losses(setup, config, first_batch(mapping, setup))
    sums["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections.parameters())

    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    trained = result.student.auxiliary["representation"]
    for name, parameter in trained.named_parameters():
        assert not torch.allclose(parameter, initial[name]), f"projection {name} did not train"
    with safe_open(str(result.output_dir / "final" / "model.safetensors"), "pt") as exported:
        keys = set(exported.keys())
    assert keys == set(result.student.model.state_dict()), "the export holds more (or less) than the student model"
    assert not any("representation" in k or "auxiliary" in k for k in keys)


def test_terms_are_the_same_on_the_fused_and_the_plain_path(micro, tmp_path):
    mapping = micro_config(micro, tmp_path / "run", representation=TERMS)
    setup, config = build_setup(mapping)
    batch = first_batch(mapping, setup)
    fused, plain = _losses(setup, config, batch, True), _losses(setup, config, batch, False)
    for name in ("rep_hidden", "rep_attention", "rep_relation", "rep_output_cosine"):
        assert fused[name] > 0
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-5)
    logit_only = loss_sums(setup.student, dict(batch), setup.teacher, config.loss, config.task, ())
    extra = sum(fused[n] for n in ("rep_hidden", "rep_attention", "rep_relation", "rep_output_cosine"))
    torch.testing.assert_close(fused["loss"], logit_only["loss"] + extra, rtol=1e-4, atol=1e-5)


def test_classifier_attention_transfer_follows_the_layer_map(micro, tmp_path):
    mapping = classifier_config(micro, tmp_path / "run", representation={"attention": {"layer_map": {1: 0}}})
    setup, config = build_setup(mapping)
    for model in (setup.student.model, setup.teacher_model):
        assert model.config._attn_implementation == "eager"  # sdpa returns no attention maps
    batch = first_batch(mapping, setup)
    setup.student.eval()  # BERT's dropout would make the two forward passes differ
    sums = _losses(setup, config, batch)
    with torch.no_grad():
        student_maps = setup.student.model(batch["input_ids"], batch["attention_mask"], output_attentions=True).attentions
        teacher_maps = setup.teacher_model(batch["input_ids"], batch["attention_mask"], output_attentions=True).attentions
    # Student layer 1 <- teacher layer 0; 2 vs 4 heads are averaged; each example's tokens share weight 1.
    per_query = attention_mse(student_maps[1], teacher_maps[0], batch["attention_mask"])
    mask = batch["attention_mask"].float()
    expected = (per_query * mask / mask.sum(1, keepdim=True)).sum()
    torch.testing.assert_close(sums["rep_attention"].detach(), expected, rtol=1e-4, atol=1e-6)


def test_a_layer_map_naming_a_missing_layer_exits_2(micro, tmp_path, capsys):
    rep = {"hidden": {"layer_map": {0: 7}}}
    expect_exit_2(capsys, tmp_path, micro_config(micro, tmp_path / "run", representation=rep),
                   "representation.hidden.layer_map", "the teacher has no layer 7", "0..1", fix=True)


def test_different_widths_with_projection_never_exits_2(micro, tmp_path, capsys):
    rep = {"hidden": {"projection": "never"}}
    expect_exit_2(capsys, tmp_path, micro_config(micro, tmp_path / "run", representation=rep),
                   "'never'", "(32) differs from the teacher's (64)", fix=True)


def test_projection_required_with_equal_widths_exits_2(micro, tmp_path, capsys):
    mapping = micro_config(micro, tmp_path / "run", representation={"hidden": {"projection": "required"}},
                           student={"model": str(micro["teacher_b"])})
    expect_exit_2(capsys, tmp_path, mapping, "'required'", "same hidden width (64)", fix=True)


def test_representation_without_a_live_teacher_exits_2(micro, tmp_path, capsys):
    mapping = micro_config(micro, tmp_path / "run", teacher=None, representation={"output_cosine": 1.0})
    expect_exit_2(capsys, tmp_path, mapping, "needs the hidden states of one live teacher model", fix=True)
