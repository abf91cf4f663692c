"""Quantization-aware distillation: fake-quantized training, compressed-tensors export that from_pretrained loads."""

import json

import pytest
import torch

from alambic.config import DistillConfig
from alambic.errors import ConfigError
from alambic.testing import tiny_llama
from alambic.training.loop import run_distillation
from modes_micro import build_micro, build_setup, first_batch, micro_config

pytest.importorskip("compressed_tensors")

from alambic.models.qat import (  # noqa: E402
    FakeQuantLinear,
    export_compressed,
    fake_quantize_weight,
    prepare_fake_quant,
    quant_args,
    quantized_copy,
)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("micro_qat"))


def test_fake_quantization_lies_on_the_int4_grid_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    weight = torch.randn(8, 64, requires_grad=True)
    quantized = fake_quantize_weight(weight, quant_args(4, 16))
    groups = quantized.detach().reshape(8, 4, 16)
    assert all(len(torch.unique(group)) <= 16 for group in groups.reshape(32, 16))
    assert not torch.equal(quantized.detach(), weight.detach())
    assert (quantized.detach() - weight.detach()).abs().max() < weight.detach().abs().max() / 7
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight-through


def test_prepared_model_keeps_its_parameters_and_state_dict_keys():
    model = tiny_llama(60, hidden=32, layers=2, heads=2)
    keys, parameters = list(model.state_dict()), list(model.parameters())
    ids = torch.randint(0, 60, (2, 9))
    before = model(ids).logits
    names = prepare_fake_quant(model, 4, 16, ["lm_head"])
    assert "lm_head" not in names and len(names) == 14  # 7 linears per block, 2 blocks
    assert isinstance(model.get_submodule(names[0]), FakeQuantLinear)
    assert list(model.state_dict()) == keys and list(model.parameters()) == parameters
    assert not torch.allclose(model(ids).logits, before)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (8, None)])
def test_export_loads_with_from_pretrained_and_matches_the_fake_quantized_model(tmp_path, bits, group_size):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(60, hidden=32, layers=2, heads=2).eval()
    prepare_fake_quant(model, bits, group_size, ["lm_head"])
    folder = export_compressed(model, tmp_path / "quantized", bits, group_size)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    dense = quantized_copy(model, bits, group_size)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, expected, atol=1e-5)  # post-training quantization: same grid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_group_size_that_does_not_divide_a_layer_is_refused(micro, tmp_path):
    mapping = micro_config(micro, tmp_path / "run", quantization={"bits": 4, "group_size": 48})
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        build_setup(mapping)


def test_a_quantization_aware_run_trains_under_fake_quant_and_exports_both_folders(micro, tmp_path):
    from transformers import AutoModelForCausalLM

    mapping = micro_config(micro, tmp_path / "run", quantization={"bits": 4, "group_size": 16})
    setup, _ = build_setup(mapping)
    assert any(isinstance(m, FakeQuantLinear) for m in setup.student.model.modules())
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    quantized = AutoModelForCausalLM.from_pretrained(result.output_dir / "quantized").eval()
    batch = first_batch(mapping, setup)
    with torch.no_grad():
        trained = result.student.model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loaded = quantized(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(loaded, trained, atol=1e-4)
    master = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    assert "quantization_config" not in master.config.to_dict()  # final/ keeps the floating-point master weights
    sizes = {name: sum(p.stat().st_size for p in (result.output_dir / name).glob("*.safetensors"))
             for name in ("final", "quantized")}
    assert sizes["quantized"] < 0.7 * sizes["final"]
