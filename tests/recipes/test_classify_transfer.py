"""Classification transfer sets end to end: a class-logit cache round trip and training on labelled + unlabelled pools."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import invoke, write_config
from tests.recipes.modes_micro import build_micro, classifier_config


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classify")
    paths = build_micro(folder)
    records = [json.loads(line) for line in paths["cls_train"].read_text().splitlines()]
    pool = folder / "transfer.jsonl"
    pool.write_text("".join(json.dumps({"text": r["text"][::-1]}) + "\n" for r in records))
    paths["transfer"] = pool
    return paths


def _config(micro, out, **data):
    mapping = classifier_config(micro, out)
    mapping["data"].update({"unlabelled": str(micro["transfer"]), "labelled_repeat": 2, **data})
    mapping["loss"] = {"objective": "forward_kl", "temperature": 2.0, "alpha": 0.5}
    mapping["train"]["max_steps"] = 3
    return mapping


def test_class_logit_cache_round_trip_trains_exactly_like_the_live_teacher(micro, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    live = write_config(tmp_path / "live.yaml", _config(micro, tmp_path / "live"))
    code, out, err = invoke(capsys, "cache-logits", live, "--out", tmp_path / "cache", "--no-progress")
    assert code == 0, err
    assert "cached the class logits of 36 rows (3 classes)" in out  # 12 labelled rows x 2 + 12 unlabelled
    stored = load_file(str(tmp_path / "cache" / "class_logits.safetensors"))["logits"]
    teacher = AutoModelForSequenceClassification.from_pretrained(micro["bert_teacher"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro["bert_teacher"])
    text = json.loads(micro["transfer"].read_text().splitlines()[4])["text"]
    with torch.no_grad():
        expected = teacher(**tokenizer(text, truncation=True, max_length=48, return_tensors="pt")).logits[0]
    assert torch.allclose(stored[24 + 4], expected, atol=1e-5)  # unlabelled rows follow the repeated labelled pool

    cached_cfg = _config(micro, tmp_path / "cached")
    cached_cfg["teacher"] = {"cache": str(tmp_path / "cache")}
    cached = write_config(tmp_path / "cached.yaml", cached_cfg)
    for config in (live, cached):
        code, _, err = invoke(capsys, "distill", config)
        assert code == 0, err
    history = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("live", "cached")]
    for a, b in zip(*history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-5)


def test_a_cache_of_other_records_is_refused(micro, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _config(micro, tmp_path / "run"))
    assert invoke(capsys, "cache-logits", config, "--out", tmp_path / "cache", "--no-progress")[0] == 0
    other = _config(micro, tmp_path / "other", labelled_repeat=1)
    other["teacher"] = {"cache": str(tmp_path / "cache")}
    code, _, err = invoke(capsys, "distill", write_config(tmp_path / "o.yaml", other))
    assert code == 2 and "covers 36 training rows" in err
    assert not (tmp_path / "other").exists()


def test_hard_targets_and_no_teacher_runs_from_the_same_config(micro, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _config(micro, tmp_path / "hard"))
    code, _, err = invoke(capsys, "distill", config, "loss.teacher_targets=hard")
    assert code == 0, err
    code, out, err = invoke(capsys, "distill", config, "teacher=null", f"train.output_dir={tmp_path / 'gold'}")
    assert code == 2 and "rows without gold labels learn only from a teacher" in err  # nothing would teach them
    code, out, err = invoke(capsys, "distill", config, "teacher=null", "data.unlabelled=null",
                            f"train.output_dir={tmp_path / 'gold'}")
    assert code == 0, err


def test_causal_lm_transfer_pool_trains_on_the_teacher_term_only(micro, tmp_path, capsys):
    """An LM run with data.unlabelled: its rows carry KD and no CE; the first step's sums say so."""
    from tests.recipes.modes_micro import build_setup, first_batch, micro_config

    from alambic.training.step_loss import loss_sums

    mapping = micro_config(micro, tmp_path / "lm", loss={"objective": "forward_kl", "temperature": 1.0, "alpha": 0.5})
    mapping["data"]["unlabelled"] = str(micro["eval"])
    setup, config = build_setup(mapping)
    batch = first_batch({**mapping, "train": {**mapping["train"], "batch_size": 20}}, setup)
    assert "has_label" in batch and (~batch["has_label"]).any() and batch["has_label"].any()
    sums = loss_sums(setup.student, batch, setup.teacher, config.loss, config.task)
    only_gold = {k: v[batch["has_label"]] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    gold_sums = loss_sums(setup.student, dict(only_gold), setup.teacher, config.loss, config.task)
    assert float(sums["ce"].detach()) == pytest.approx(float(gold_sums["ce"].detach()), rel=1e-4)  # unlabelled rows add no CE
    assert float(sums["kd"].detach()) > float(gold_sums["kd"].detach())  # ... but they add KD
    code, _, err = invoke(capsys, "distill", write_config(tmp_path / "lm.yaml", mapping))
    assert code == 0, err
