"""`alambic init-student` on the tiny teacher: a saved student, its report, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import invoke, kd_config, write_config

from alambic.config import DistillConfig
from alambic.models.quantize import count_parameters
from alambic.training.loop import run_distillation


def _config(tiny_setup, output_dir, **fields):
    return {
        "teacher": {"model": str(tiny_setup["teacher"])},
        "output_dir": str(output_dir),
        "data": {"calibration": str(tiny_setup["train"]), "eval": str(tiny_setup["eval"]),
                 "calibration_samples": 16, "eval_samples": 8, "max_length": 64},
        "progress": False,
        **fields,
    }


def _run(capsys, tmp_path, mapping, *extra):
    code, out, err = invoke(capsys, "init-student", write_config(tmp_path / "init.yaml", mapping), *extra)
    return code, out, err


def test_keeping_every_layer_reports_the_teacher_itself(tiny_setup, capsys, tmp_path):
    code, out, err = _run(capsys, tmp_path, _config(tiny_setup, tmp_path / "same", method="select", layers="all"))
    assert code == 0, err
    report = json.loads((tmp_path / "same" / "init_report.json").read_text())
    assert report["student"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["student"]["ce"] == pytest.approx(report["teacher"]["ce"], rel=1e-6)
    assert report["student"]["parameters"] == report["teacher"]["parameters"]
    assert "KL" in out and "student" in out


def test_pruned_int8_student_report_matches_the_saved_models(tiny_setup, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    mapping = _config(tiny_setup, tmp_path / "pruned", method="prune", layers=[1],
                      width={"heads_keep": 2, "mlp_keep": 0.5}, quantize="int8")
    code, _, err = _run(capsys, tmp_path, mapping)
    assert code == 0, err
    folder = tmp_path / "pruned"
    report = json.loads((folder / "init_report.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert (student.config.num_hidden_layers, student.config.num_attention_heads) == (1, 2)
    assert student.config.intermediate_size == 64
    assert report["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    assert report["student"]["size_bytes"] == (folder / "model.safetensors").stat().st_size
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert report["student"]["kl"] > 0.01  # a half-width, one-layer student is not the teacher
    quantized = AutoModelForCausalLM.from_pretrained(folder / "int8")  # compressed-tensors, int8 per row
    scheme = json.loads((folder / "int8" / "config.json").read_text())["quantization_config"]
    assert scheme["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    with torch.no_grad():
        dense_logits = quantized(torch.tensor([[1, 5, 9, 3]])).logits  # transformers decompresses on the first forward
        float_logits = student(torch.tensor([[1, 5, 9, 3]])).logits
    assert report["student_int8"]["parameters"] == report["student"]["parameters"]
    assert torch.allclose(dense_logits, float_logits, atol=0.05) and not torch.equal(dense_logits, float_logits)
    assert report["student_int8"]["size_bytes"] < 0.6 * report["student"]["size_bytes"]
    assert abs(report["student_int8"]["kl"] - report["student"]["kl"]) < 0.05 * report["student"]["kl"] + 1e-3
    # The folder is a ready student for `alambic distill`.
    config = DistillConfig.model_validate(
        {**kd_config(tiny_setup, tmp_path / "run", max_steps=2, batch_size=4), "student": {"model": str(folder)}}
    )
    result = run_distillation(config, overwrite=True)
    assert result.final_metrics["eval_kl"] > 0
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    assert trained.config.num_attention_heads == 2


def test_averaging_the_two_layers_into_one(tiny_setup, capsys, tmp_path):
    code, _, err = _run(capsys, tmp_path, _config(tiny_setup, tmp_path / "avg", method="average", num_layers=1))
    assert code == 0, err
    report = json.loads((tmp_path / "avg" / "init_report.json").read_text())
    assert report["student"]["layers"] == 1 and report["student"]["averaged_layers"] == [[0, 1]]
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "avg")
    expected = (teacher.model.layers[0].mlp.down_proj.weight + teacher.model.layers[1].mlp.down_proj.weight) / 2
    assert torch.allclose(student.model.layers[0].mlp.down_proj.weight, expected)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"method": "select", "layers": [0, 5]}, "out of range"),
        ({"method": "prune"}, "needs a width section"),
        ({"method": "select", "width": {"heads_keep": 2}}, "needs method: prune"),
        ({"method": "prune", "width": {"heads_keep": 1.5}}, "fraction must be in (0, 1]"),
        ({"method": "prune", "width": {"heads_keep": 9}}, "cannot keep 9"),
        ({"method": "average", "layers": [0, 1]}, "exactly one of num_layers or every_k"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_setup, capsys, tmp_path, fields, needle):
    code, _, err = _run(capsys, tmp_path, _config(tiny_setup, tmp_path / "out", **fields))
    assert code == 2, err
    assert needle in err and ("fix:" in err)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_existing_output_needs_overwrite(tiny_setup, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = _run(capsys, tmp_path, _config(tiny_setup, tmp_path / "out", layers=[0]))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = _run(capsys, tmp_path, _config(tiny_setup, tmp_path / "out", layers=[0]), "--overwrite")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()
