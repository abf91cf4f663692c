"""Cross-tokenizer distillation through the one loop: a student with its own, different tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import expect_exit_2, kd_config

from alambic.config import DistillConfig
from alambic.data.stdlib_corpus import build_tokenizer
from alambic.testing import tiny_llama
from alambic.training.loop import run_distillation


@pytest.fixture(scope="module")
def other_student(tiny_setup, tmp_path_factory):
    """A 1-layer student whose byte-level BPE has a different vocabulary size than the teacher's."""
    texts = [json.loads(line)["text"] for line in open(tiny_setup["train"], encoding="utf-8")]
    tokenizer = build_tokenizer(texts, 300)
    folder = tmp_path_factory.mktemp("xt_student")
    tiny_llama(len(tokenizer), hidden=32, layers=1, heads=2, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(tiny_setup, other_student, output_dir, method, **loss):
    mapping = kd_config(tiny_setup, output_dir, max_steps=12, batch_size=4, lr=1e-2, scheduler="constant")
    mapping["student"] = {"model": str(other_student)}
    mapping["data"]["max_length"] = 64
    mapping["data"]["limit"] = 24
    mapping["loss"].update({"alpha": 0.0, **loss})
    mapping["cross_tokenizer"] = {"method": method}
    return mapping


@pytest.mark.parametrize("method", ["uld", "align"])
def test_cross_tokenizer_divergence_decreases(tiny_setup, other_student, tmp_path, method):
    config = DistillConfig.model_validate(_config(tiny_setup, other_student, tmp_path / method, method))
    result = run_distillation(config, overwrite=True)
    divergence = [record["kd"] for record in result.history]
    assert all(value > 0 for value in divergence)
    # alpha = 0: only the cross-tokenizer term trains the student, so this is that term's doing.
    assert sum(divergence[-3:]) / 3 < 0.8 * sum(divergence[:3]) / 3, divergence
    if method == "align":
        # Mapped onto the student's tokens, the teacher teaches the text itself: held-out CE falls
        # well below the uniform guess over 300 tokens although no CE was trained (alpha = 0).
        assert result.final_metrics["eval_ce"] < math.log(300) - 0.4
    exported = result.output_dir / "final"
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == 300  # the student's own vocabulary


def test_alpha_mixes_ce_and_divergence(tiny_setup, other_student):
    """The term's total is alpha * CE + (1 - alpha) * divergence once the main path's CE is added."""
    from alambic.data import build_datasets, collate
    from alambic.training.step_loss import loss_sums
    from alambic.training.setup import build_models

    mapping = _config(tiny_setup, other_student, "unused", "uld", alpha=0.3)
    config = DistillConfig.model_validate(mapping)
    setup = build_models(config, torch.device("cpu"))
    assert setup.teacher is None and len(setup.extra_terms) == 1
    train, _ = build_datasets(config.data, setup.tokenizer)
    batch = collate([train[i] for i in range(3)], setup.tokenizer.pad_token_id)
    sums = loss_sums(setup.student, batch, setup.teacher, config.loss, config.task, setup.extra_terms)
    assert sums["kd"] > 0 and sums["ce"] > 0
    total, ce, kd = (float(sums[name].detach()) for name in ("loss", "ce", "kd"))
    assert total == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-4)


def test_same_tokenizer_is_a_clear_error(tiny_setup, capsys, tmp_path):
    mapping = kd_config(tiny_setup, tmp_path / "run", max_steps=2)
    mapping["cross_tokenizer"] = {"method": "uld"}
    expect_exit_2(capsys, tmp_path, mapping, "same tokenizer", fix=True)


def test_missing_teacher_tokenizer_is_a_clear_error(tiny_setup, other_student, capsys, tmp_path):
    mapping = _config(tiny_setup, other_student, tmp_path / "run", "align")
    mapping["cross_tokenizer"]["teacher_tokenizer"] = str(tmp_path / "no_such_tokenizer")
    expect_exit_2(capsys, tmp_path, mapping, "cross_tokenizer.teacher_tokenizer", "does not exist", fix=True)


def test_cache_teacher_is_rejected(tiny_setup, other_student, tmp_path):
    """Checked on the config (the compatibility table), before any cache folder is opened."""
    from alambic.compat import check_compatible
    from alambic.errors import ConfigError

    mapping = _config(tiny_setup, other_student, tmp_path / "run", "uld")
    mapping["teacher"] = {"cache": str(tmp_path)}
    with pytest.raises(ConfigError, match="teacher.model"):
        check_compatible(DistillConfig.model_validate(mapping))


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"loss": {"top_k": 8}}, "loss.top_k"),
        ({"rollout": {"policy": "on_policy", "lambda": 0.5}}, "rollout.policy"),
        ({"loss": {"alpha": 1.0}}, "loss.alpha"),
    ],
)
def test_modes_that_cannot_cross_tokenizers_are_clear_errors(tiny_setup, other_student, capsys, tmp_path, override, needle):
    mapping = _config(tiny_setup, other_student, tmp_path / "run", "uld")
    for section, values in override.items():
        mapping[section] = {**mapping.get(section, {}), **values}
    expect_exit_2(capsys, tmp_path, mapping, needle, fix=True)
