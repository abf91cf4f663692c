"""`alambic merge`: mergekit merges of students, refused for mismatched models before anything is written."""

import pytest
import torch

from alambic.testing import tiny_llama
from helpers import invoke, write_config
from modes_micro import build_micro

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_merge"))


def _state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_merging_a_model_with_itself_returns_it(micro, tmp_path, capsys, method):
    out = tmp_path / "merged"
    code, stdout, err = invoke(capsys, "merge", micro["student"], micro["student"], "--method", method, "--output", out)
    assert code == 0, err
    original, merged = _state(micro["student"]), _state(out)
    assert original.keys() == merged.keys()
    assert all(torch.allclose(original[k], merged[k], atol=1e-6) for k in original)
    assert (out / "tokenizer.json").is_file() and "merged 2 models" in stdout


def test_linear_is_the_weighted_mean_and_ties_keeps_the_base_where_nothing_changed(micro, tmp_path, capsys):
    a, b = _state(micro["student"]), _state(micro["peer"])  # same architecture, different seeds
    code, _, err = invoke(capsys, "merge", micro["student"], micro["peer"], "--weight", "3", "--weight", "1",
                          "--output", tmp_path / "linear")
    assert code == 0, err
    merged = _state(tmp_path / "linear")
    assert all(torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-5) for k in a)
    config = write_config(tmp_path / "merge.yaml", {"models": [str(micro["student"])], "method": "ties",
                                                    "base": str(micro["student"]), "output": str(tmp_path / "ties")})
    code, _, err = invoke(capsys, "merge", "--config", config)
    assert code == 0, err
    merged = _state(tmp_path / "ties")
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)


def test_mismatched_models_exit_2_and_write_nothing(micro, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, err = invoke(capsys, "merge", micro["student"], micro["teacher"], "--output", out)
    assert code == 2 and "different weights" in err and not out.exists()
    # Same architecture and shapes, another tokenizer (its vocabulary differs).
    from alambic.data.stdlib_corpus import build_tokenizer

    other = tmp_path / "other"
    tiny_llama(320, hidden=32, layers=2, heads=2, seed=5).save_pretrained(other)
    tokenizer = build_tokenizer(["completely different text " * 50, "other words, other merges"], 320)
    tokenizer.save_pretrained(other)
    code, _, err = invoke(capsys, "merge", micro["student"], other, "--output", out)
    assert code == 2 and "different tokenizers" in err and not out.exists()
    code, _, err = invoke(capsys, "merge", micro["student"], micro["peer"], micro["student"], "--method", "slerp",
                          "--output", out)
    assert code == 2 and "exactly two" in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
