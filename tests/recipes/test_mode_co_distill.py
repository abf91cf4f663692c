"""Co-distillation: every model learns from the others' detached predictions; peers are saved apart."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alambic.config import DistillConfig
from alambic.training.loop import run_distillation
from alambic.training.modes.co_distill import others_mixture
from alambic.training.step_loss import loss_sums
from helpers import expect_exit_2
from modes_micro import build_micro, build_setup, first_batch, micro_config


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_co"))


def _config(micro, tmp_path, **co):
    mapping = micro_config(micro, tmp_path / "run", teacher=None, co_distill={"peers": [str(micro["peer"])], **co})
    mapping["loss"]["alpha"] = 0.0  # no hard labels: whatever moves the models comes from each other
    return mapping


def test_the_target_of_each_model_is_the_others_detached_prediction():
    logits = [torch.randn(2, 3, 5, requires_grad=True) for _ in range(3)]
    target = others_mixture(logits[:2], 0, temperature=2.0)
    assert not target.requires_grad
    torch.testing.assert_close(torch.softmax(target / 2.0, -1), torch.softmax(logits[1] / 2.0, -1))
    three = torch.softmax(others_mixture(logits, 1, temperature=1.0), -1)
    torch.testing.assert_close(three, (torch.softmax(logits[0], -1) + torch.softmax(logits[2], -1)).detach() / 2)


def test_every_model_gets_gradients_from_the_others_without_labels(micro, tmp_path):
    mapping = _config(micro, tmp_path)
    setup, config = build_setup(mapping)
    sums = loss_sums(setup.student, first_batch(mapping, setup), setup.teacher, config.loss, config.task,
                     setup.extra_terms)
    assert sums["kd"] > 0 and sums["peer_loss"] > 0  # alpha = 0: these are the whole loss
    sums["loss"].backward()
    student_grad = setup.student.model.lm_head.weight.grad
    peer_grad = setup.student.auxiliary["peers"][0].model.lm_head.weight.grad
    assert student_grad is not None and student_grad.abs().sum() > 0
    assert peer_grad is not None and peer_grad.abs().sum() > 0


def test_peers_train_and_are_saved_next_to_the_student(micro, tmp_path):
    result = run_distillation(DistillConfig.model_validate(_config(micro, tmp_path)), overwrite=True)
    peer_initial = load_file(str(micro["peer"] / "model.safetensors"))
    student_initial = load_file(str(micro["student"] / "model.safetensors"))
    saved_peer = load_file(str(result.output_dir / "peers" / "peer-0" / "model.safetensors"))
    trained_peer = result.student.auxiliary["peers"][0].model
    for name, value in peer_initial.items():
        torch.testing.assert_close(saved_peer[name], trained_peer.get_parameter(name).detach())
    assert any(not torch.equal(saved_peer[n], v) for n, v in peer_initial.items()), "the peer did not train"
    assert any(not torch.equal(result.student.model.get_parameter(n), v) for n, v in student_initial.items())
    assert (result.output_dir / "peers" / "peer-0" / "tokenizer.json").exists()
    with safe_open(str(result.output_dir / "final" / "model.safetensors"), "pt") as exported:
        assert set(exported.keys()) == set(result.student.model.state_dict())


def test_co_distill_with_a_teacher_or_without_peers_exits_2(micro, tmp_path, capsys):
    mapping = _config(micro, tmp_path)
    mapping["teacher"] = {"model": str(micro["teacher"])}
    expect_exit_2(capsys, tmp_path, mapping, "co_distill cannot be used with a `teacher:` section", "fix:")
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, peers=[]), "co_distill.peers")
    expect_exit_2(capsys, tmp_path, _config(micro, tmp_path, peers=[str(tmp_path / "missing/")]),
                   "co_distill.peers[0]", "does not exist")
