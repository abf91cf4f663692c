"""Self-distillation: EMA / frozen / checkpoint teachers of the student itself, and early-exit heads."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alambic.config import DistillConfig
from alambic.teachers.ema import FrozenCopy, ema_update
from alambic.training.loop import run_distillation
from alambic.training.step_loss import StepOutputs, loss_sums
from helpers import expect_exit_2
from modes_micro import build_micro, build_setup, classifier_config, first_batch, micro_config


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_self"))


def _config(micro, tmp_path, alpha=0.5, **self_distill):
    mapping = micro_config(micro, tmp_path / "run", teacher=None, self_distill=self_distill)
    mapping["loss"]["alpha"] = alpha  # against a copy of itself the KD gradient starts at 0: CE moves the student
    return mapping


def test_ema_update_is_exactly_the_decay_formula():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    teacher = FrozenCopy(student)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {n: p.clone() for n, p in teacher.model.named_parameters()}
    ema_update(teacher.model, student, decay=0.9)
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(teacher.model.get_parameter(name), 0.9 * before[name] + 0.1 * parameter,
                                   rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training  # the loop's student.train() never puts the teacher in train mode


def test_the_ema_teacher_follows_the_student_in_the_loop(micro, tmp_path):
    mapping = _config(micro, tmp_path, teacher="ema", ema_decay=0.5)
    mapping["train"]["max_steps"] = 1
    initial = load_file(str(micro["student"] / "model.safetensors"))
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    teacher = result.student.auxiliary["self_distill_teacher"].model
    student = result.student.model
    for name, value in initial.items():
        trained = student.get_parameter(name)
        assert not torch.equal(trained, value), f"{name} did not train"
        torch.testing.assert_close(teacher.get_parameter(name), 0.5 * value + 0.5 * trained, rtol=0, atol=1e-6)


def test_the_frozen_teacher_stays_the_initial_student_and_is_a_checkpoint_teacher_too(micro, tmp_path):
    mapping = _config(micro, tmp_path, teacher="frozen")
    mapping["train"]["save_every"] = 2
    initial = load_file(str(micro["student"] / "model.safetensors"))
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    teacher = result.student.auxiliary["self_distill_teacher"].model
    for name, value in initial.items():
        assert torch.equal(teacher.get_parameter(name), value)
    # An earlier run's loop checkpoint (StudentModule weights, no config.json) is a valid teacher folder.
    checkpoint = result.output_dir / "checkpoints" / "step-000002"
    setup, _ = build_setup(_config(micro, tmp_path / "second", teacher="checkpoint", checkpoint=str(checkpoint)))
    for name, value in result.student.model.state_dict().items():
        torch.testing.assert_close(setup.teacher_model.state_dict()[name], value)
    assert not any(p.requires_grad for p in setup.teacher_model.parameters())


def test_early_exit_heads_train_and_are_not_exported(micro, tmp_path):
    mapping = _config(micro, tmp_path, teacher="ema", early_exit_layers=[0])
    setup, config = build_setup(mapping)
    head = setup.student.auxiliary["early_exits"]["layer_0"]
    initial = {n: p.detach().clone() for n, p in head.named_parameters()}
    sums = loss_sums(setup.student, first_batch(mapping, setup), setup.teacher, config.loss, config.task,
                     setup.extra_terms)
    assert sums["early_exit"] > 0
    sums["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    trained = result.student.auxiliary["early_exits"]["layer_0"]
    assert any(not torch.equal(p, initial[n]) for n, p in trained.named_parameters())
    with safe_open(str(result.output_dir / "final" / "model.safetensors"), "pt") as exported:
        keys = set(exported.keys())
    assert keys == set(result.student.model.state_dict())
    assert not any("early_exits" in k or "self_distill_teacher" in k for k in keys)


def test_early_exit_target_is_the_detached_final_layer(micro, tmp_path):
    mapping = classifier_config(micro, tmp_path / "run", self_distill={"teacher": "none", "early_exit_layers": [0]})
    mapping["loss"]["alpha"] = 0.0
    setup, config = build_setup(mapping)
    term = setup.extra_terms[-1]
    batch = first_batch(mapping, setup)
    setup.student.eval()
    outputs = setup.student(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    exit_sums = term(StepOutputs(setup.student, batch, outputs, None, term.options, config.task))
    exit_sums["loss"].backward()
    # Only the shallow part learns from the exit: the final classifier gets no gradient from it.
    assert setup.student.model.classifier.weight.grad is None
    assert setup.student.model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_an_exit_on_the_last_or_a_missing_layer_exits_2(micro, tmp_path, capsys):
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, early_exit_layers=[1]),
                   "early_exit_layers names layer 1", "use layers 0..0")


def test_a_self_teacher_with_a_teacher_section_exits_2(micro, tmp_path, capsys):
    mapping = _config(micro, tmp_path, teacher="frozen")
    mapping["teacher"] = {"model": str(micro["teacher"])}
    expect_exit_2(capsys, tmp_path, mapping, "the student teaches itself", "self_distill.teacher: none")


def test_a_checkpoint_teacher_needs_a_real_folder(micro, tmp_path, capsys):
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, teacher="checkpoint"), "checkpoint")
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, teacher="checkpoint", checkpoint=str(tmp_path)),
                   "neither a model folder", "fix:")
