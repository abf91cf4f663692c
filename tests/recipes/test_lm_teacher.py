"""The packaged LM teacher (alambic/assets/lm_teacher) and `alambic demo --task lm` on it."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest

from alambic.demos.lm_assets import SHIPPED, load_manifest, read_modules, stdlib_split
from helpers import run_cli_subprocess
from test_demo import call_main


@pytest.fixture(scope="module")
def manifest() -> dict:
    loaded = load_manifest(SHIPPED)
    assert loaded is not None, f"no manifest in {SHIPPED}: run python -m alambic.demos.lm_teacher"
    return loaded


def test_shipped_teacher_is_small_hashed_and_never_saw_its_evaluation_modules(manifest):
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["weights_sha256"]
    modules = manifest["modules"]
    assert not set(modules["train"]) & (set(modules["validation"]) | set(modules["heldout"]))
    assert len(modules["heldout"]) >= 16 and len(modules["validation"]) >= 6
    # The split is the seeded one the script draws: rerunning it on this interpreter names the same modules.
    if manifest["python"].rsplit(".", 1)[0] == ".".join(map(str, sys.version_info[:2])):
        assert stdlib_split(manifest["seed"]) == modules


def test_shipped_teacher_has_learned_python(manifest):
    import torch

    from alambic.config import ModelConfig
    from alambic.models import load_model, load_tokenizer

    config = ModelConfig(model=str(SHIPPED))
    tokenizer = load_tokenizer(config, role="teacher")
    model = load_model(config, "causal_lm", role="teacher").eval()
    text = read_modules(manifest["modules"]["heldout"][:2])[0][:3000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    bits_per_byte = loss * (ids.shape[1] - 1) / math.log(2) / len(tokenizer.decode(ids[0, 1:]).encode())
    # An untrained model of this vocabulary is at ~log2(2048) / 3 bytes per token ~ 3.7 bits/byte.
    assert bits_per_byte < 2.5, bits_per_byte


@pytest.mark.slow
def test_quick_lm_demo_on_the_shipped_teacher_holds_out_unseen_modules(tmp_path, manifest):
    folder = tmp_path / "lm"
    result = run_cli_subprocess("demo", "--task", "lm", "--quick", f"output_dir={folder}", "teacher_source=shipped",
                     "student_layers=[2]")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    heldout = [json.loads(line)["text"] for line in (folder / "data" / "heldout.jsonl").read_text().splitlines()]
    seen = read_modules(manifest["modules"]["train"])
    assert heldout and not any(text.startswith(start) for text in seen for start in heldout)
    student = json.loads((folder / "student_init" / "config.json").read_text())
    assert (student["num_hidden_layers"], student["hidden_size"]) == (1, 16)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["models"]["teacher"]["path"] == str(SHIPPED)
    assert saved["models"]["teacher"]["metrics"]["bits_per_byte"] < saved["models"]["ce_student"]["metrics"]["bits_per_byte"]


def test_lm_demo_corpus_leaves_out_the_generated_codec_tables():
    from alambic.data.stdlib_corpus import stdlib_files

    everything, without_tables = stdlib_files(), stdlib_files(skip_generated=True)
    tables = [p for p in everything if "encodings" in p.parts]
    assert tables and not any("encodings" in p.parts for p in without_tables)
    assert len(without_tables) == len(everything) - len(tables)


def test_layers_the_teacher_lacks_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "lm"
    code, output = call_main(monkeypatch, capsys, "demo", "--task", "lm", f"output_dir={folder}", "student_layers=[0, 9]")
    assert code == 2 and "student_layers [0, 9]" in output and "0..3" in output
    assert not folder.exists()


@pytest.mark.parametrize("path, model", [("configs/demo_lm.yaml", "alambic.demos.lm_demo:LMDemoConfig"),
                                         ("configs/demo_bbc.yaml", "alambic.demos.demo:DemoConfig")])
def test_demo_configs_spell_out_the_defaults(path, model):
    # Their headers say "its defaults": a changed default must be changed there too.
    import importlib
    from pathlib import Path

    import yaml

    module, name = model.split(":")
    schema = getattr(importlib.import_module(module), name)
    written = yaml.safe_load((Path(__file__).parents[2] / path).read_text())
    assert schema(**written).model_dump() == schema().model_dump()
