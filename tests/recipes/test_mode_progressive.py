"""Progressive distillation: every stage is trained from the previous one, exported and evaluated."""

import json

import pytest
import yaml

from helpers import invoke, write_config


def _progressive_mapping(tiny_setup, output_dir, steps=4):
    return {
        "output_dir": str(output_dir),
        "teacher": {"model": str(tiny_setup["teacher"])},
        "run": {
            "data": {"train": str(tiny_setup["train"]), "eval": str(tiny_setup["eval"]), "max_length": 64, "limit": 32},
            "loss": {"objective": "forward_kl", "alpha": 0.0},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-3, "progress": False, "cpu": True, "eval_batches": 2},
        },
        "stages": [
            {"name": "intermediate", "student": {"from_teacher": {"layers": "uniform", "num_layers": 1}}},
            {"name": "student", "architecture": {"hidden_size": 32, "intermediate_size": 64,
                                                 "num_attention_heads": 2, "num_key_value_heads": 2},
             "overrides": {"train.lr": 5e-3}},
        ],
    }


def test_progressive_run_trains_and_evaluates_every_stage(capsys, tiny_setup, tmp_path):
    out = tmp_path / "chain"
    config = write_config(tmp_path / "progressive.yaml", _progressive_mapping(tiny_setup, out))
    code, stdout, err = invoke(capsys, "progressive", config)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    stage_1, stage_2 = summary["stages"]

    # Each stage is a normal run folder; stage 2 learned from stage 1's exported student.
    for index in (1, 2):
        assert (out / f"stage-{index}" / "final" / "model.safetensors").exists()
        history = (out / f"stage-{index}" / "metrics.jsonl").read_text().splitlines()
        assert len(history) == 4
    saved = yaml.safe_load((out / "stage-2" / "config.yaml").read_text())
    assert saved["teacher"]["model"] == str(out / "stage-1" / "final")
    assert saved["train"]["lr"] == pytest.approx(5e-3)

    # Sizes shrink along the chain, as configured.
    teacher_eval = summary["teacher"]["eval"]
    assert (teacher_eval["layers"], stage_1["eval"]["layers"], stage_2["eval"]["layers"]) == (2, 1, 1)
    assert teacher_eval["parameters"] > stage_1["eval"]["parameters"] > stage_2["eval"]["parameters"]

    # Every stage is evaluated: against its own teacher, and the last one against the first teacher too.
    final_metrics = json.loads((out / "stage-2" / "final" / "final_metrics.json").read_text())
    assert stage_2["eval"]["eval_kl"] == pytest.approx(final_metrics["eval_kl"], rel=1e-5)
    assert stage_2["eval_vs_first_teacher"]["eval_kl"] != pytest.approx(stage_2["eval"]["eval_kl"], rel=1e-3)
    assert stage_1["eval"]["eval_kl"] > 0 and teacher_eval["eval_ce"] < stage_2["eval"]["eval_ce"]
    assert "intermediate" in stdout and "student" in stdout

    # Run again: finished stages are reused, not retrained.
    code, stdout, err = invoke(capsys, "progressive", config)
    assert code == 0, err
    assert [s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]] == ["reused", "reused"]


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: m.update(stages=[]), "stages"),
        (lambda m: m["run"].update(student={"model": "x"}), "run.student is set by the chain"),
        (lambda m: m["stages"][0].update(architecture={"hidden_size": 32}), "exactly one of"),
        (lambda m: m["stages"][1]["overrides"].update({"train.lr": -1}), "stage 2"),
        (lambda m: m.update(teacher={"cache": "some/cache"}), "teacher.model"),
    ],
)
def test_bad_progressive_configs(capsys, tiny_setup, tmp_path, change, needle):
    mapping = _progressive_mapping(tiny_setup, tmp_path / "chain")
    change(mapping)
    code, _, err = invoke(capsys, "progressive", write_config(tmp_path / "p.yaml", mapping))
    assert code == 2, err
    assert needle in err
    assert not (tmp_path / "chain").exists()


def test_unknown_architecture_key(capsys, tiny_setup, tmp_path):
    mapping = _progressive_mapping(tiny_setup, tmp_path / "chain", steps=1)
    mapping["stages"][1]["architecture"] = {"hiden_size": 32}
    code, _, err = invoke(capsys, "progressive", write_config(tmp_path / "p.yaml", mapping))
    assert code == 2, err
    assert "hiden_size" in err and "config.json" in err
