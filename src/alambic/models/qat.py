"""Weight-only integer quantization: fake quantization for training, compressed-tensors export.

Quantization-aware distillation trains the student through `FakeQuantLinear`: each
linear layer's weight is quantized and dequantized in the forward pass (symmetric
int4 / int8, one scale per `group_size` input weights, or per output row), and the
gradient passes straight through the rounding (straight-through estimator) to the
floating-point master weights. The scales are recomputed from the current weights
at every forward, with the rule compressed-tensors uses (`calculate_qparams`), so
the exported model computes exactly what the student trained with.

Export writes the standard compressed-tensors "pack-quantized" folder (int4/int8
values packed into int32, fp scales, `quantization_config` in config.json) that
`transformers` loads with `from_pretrained` (the `compressed-tensors` package
must be installed) and vLLM serves. The older private `model.int8.safetensors`
folders of init-student are still read by `models/quantize.py:load_int8`.

    python -c "from alambic.models.qat import export_compressed"  # needs: pip install alambic[quant]
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alambic.durable import atomic_dir
from alambic.errors import ConfigError, ModelError

INSTALL_HINT = "pip install 'alambic[quant]' (compressed-tensors)"


def quant_args(bits: int, group_size: int | None):
    """compressed-tensors QuantizationArgs of a symmetric weight-only int scheme."""
    try:
        from compressed_tensors.quantization import QuantizationArgs
    except ImportError:
        raise ConfigError("quantization needs the compressed-tensors package", INSTALL_HINT) from None
    strategy = "group" if group_size is not None else "channel"
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)


def weight_qparams(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of a [out, in] weight: [out, in / group] for groups, [out, 1] per row."""
    from compressed_tensors.quantization.utils import calculate_qparams

    values = weight.detach()
    if args.group_size is not None:
        values = values.reshape(values.shape[0], -1, args.group_size)
        return calculate_qparams(values.amin(-1), values.amax(-1), args)
    return calculate_qparams(values.amin(-1, keepdim=True), values.amax(-1, keepdim=True), args)


def fake_quantize_weight(weight: torch.Tensor, args) -> torch.Tensor:
    """Quantize-dequantize in the forward; identity gradient to `weight` (straight-through)."""
    from compressed_tensors.quantization import fake_quantize

    scale, zero = weight_qparams(weight, args)
    quantized = fake_quantize(weight.detach(), scale, zero, args)
    return weight + (quantized - weight).detach()


class FakeQuantLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) whose weight is fake-quantized.

    Layers are converted in place by swapping their class, so optimiser state, weight
    tying and checkpoints are unchanged; `remove_fake_quant` swaps them back.
    """

    quant_args = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, fake_quantize_weight(self.weight, self.quant_args), self.bias)


def quantizable_linears(model: nn.Module, group_size: int | None, ignore: list[str]) -> list[str]:
    """Names of the linear layers to quantize (not ignored, not a head tied to the embedding)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in ignore and name not in ignore
        and not (tied and module is output)
    ]
    if not names:
        raise ModelError(f"a {type(model).__name__} has no linear layer to quantize (ignore: {ignore})")
    if group_size is not None:
        misfits = sorted({f"{n} ({model.get_submodule(n).in_features} inputs)" for n in names
                          if model.get_submodule(n).in_features % group_size})
        if misfits:
            raise ConfigError(
                f"quantization.group_size {group_size} does not divide the input width of "
                f"{len(misfits)} layers, e.g. {', '.join(misfits[:3])}",
                "choose a group_size that divides every layer's input width, or group_size: null (one scale per row)",
            )
    return names


def prepare_fake_quant(model: nn.Module, bits: int, group_size: int | None, ignore: list[str]) -> list[str]:
    """Turn the model's quantizable linear layers into FakeQuantLinear, in place."""
    args = quant_args(bits, group_size)
    names = quantizable_linears(model, group_size, ignore)
    for name in names:
        module = model.get_submodule(name)
        module.__class__ = FakeQuantLinear
        module.quant_args = args
    return names


def remove_fake_quant(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            module.__class__ = nn.Linear
            del module.quant_args


@torch.no_grad()
def quantized_copy(model: nn.Module, bits: int, group_size: int | None, ignore=("lm_head",)) -> nn.Module:
    """A dense copy whose linear weights hold their quantized values (post-training quantization)."""
    copied = copy.deepcopy(model)
    remove_fake_quant(copied)
    args = quant_args(bits, group_size)
    for name in quantizable_linears(copied, group_size, list(ignore)):
        weight = copied.get_submodule(name).weight
        weight.copy_(fake_quantize_weight(weight, args))
    return copied


def _quiet():
    """compressed-tensors draws tqdm bars (on stderr) while it applies and compresses: not in our output."""
    return contextlib.redirect_stderr(io.StringIO())


@torch.no_grad()
def export_compressed(model: nn.Module, folder: str | Path, bits: int, group_size: int | None,
                      ignore=("lm_head",), tokenizer=None) -> Path:
    """Write `folder` (atomically) in compressed-tensors pack-quantized format; returns it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.quantization import QuantizationScheme, apply_quantization_config

    model = copy.deepcopy(model).cpu().eval()
    remove_fake_quant(model)
    args = quant_args(bits, group_size)
    names = quantizable_linears(model, group_size, list(ignore))
    left_out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    config = CTConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=left_out)
    with _quiet():
        apply_quantization_config(model, config)
        for name in names:
            module = model.get_submodule(name)
            scale, zero = weight_qparams(module.weight, args)
            module.weight_scale.copy_(scale)
            module.weight_zero_point.copy_(zero)
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
        compressor.compress_model(model)

        with atomic_dir(folder) as temporary:
            model.save_pretrained(temporary)
            compressor.update_config(str(temporary))
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
    return Path(folder)


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix == ".safetensors")


__all__ = [
    "FakeQuantLinear", "export_compressed", "fake_quantize_weight", "folder_bytes", "prepare_fake_quant",
    "quantized_copy", "remove_fake_quant",
]
