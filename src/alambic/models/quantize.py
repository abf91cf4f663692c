"""Legacy: the private weight-only int8 format of early init-student folders, kept to read them.

init-student now writes int8 in the compressed-tensors format (models/qat.py), which
`from_pretrained` and vLLM load; `load_int8` still reads the old folders below.

Each `nn.Linear` weight is stored as int8 with one fp32 scale per output row
(symmetric: scale = max |w| / 127), and dequantized on the fly in the forward
pass. Activations stay in floating point, so this shrinks the checkpoint and
the weight memory (about 4x for fp32 linear weights) but does not speed up
matmuls on CPU. Embeddings and norms are kept in floating point; a tied
output head is left unquantized so it keeps sharing the embedding.

safetensors cannot hold dynamically quantized torch modules, so the int8 tensors
and scales are saved as plain tensors (`model.int8.safetensors`) next to the
config and a `quantization.json` listing the quantized modules; `load_int8`
rebuilds the model. Plain `from_pretrained` cannot read this folder.

    python -c "from alambic.models.quantize import load_int8; print(load_int8('runs/init_student/int8'))"
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alambic.errors import ModelError

WEIGHTS_NAME = "model.int8.safetensors"
MANIFEST_NAME = "quantization.json"
SCHEME = "weight-only int8, symmetric, one fp32 scale per output row"


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 rows times fp32 row scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        module = module.to(linear.weight.device)
        module.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.dequantized_weight(inputs.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _quantizable(model: nn.Module) -> list[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (tied and module is output)
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(a quantized copy of `model`, names of the quantized linear layers)."""
    quantized = copy.deepcopy(model).eval()
    names = _quantizable(quantized)
    if not names:
        raise ModelError(f"a {type(model).__name__} has no linear layer to quantize")
    for name in names:
        _replace(quantized, name, Int8Linear.from_linear(quantized.get_submodule(name)))
    return quantized, names


def count_parameters(model: nn.Module) -> int:
    """Weights of the model, int8-stored ones included (they are buffers, not parameters)."""
    stored = sum(buffer.numel() for name, buffer in model.named_buffers() if name.endswith("weight_int8"))
    return sum(parameter.numel() for parameter in model.parameters()) + stored


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of `model` holds (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def save_int8(model: nn.Module, names: list[str], folder: str | Path, tokenizer=None) -> Path:
    """config.json + model.int8.safetensors + quantization.json (+ tokenizer) in `folder`."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "alambic_quantization": SCHEME})
    (folder / MANIFEST_NAME).write_text(json.dumps({"scheme": SCHEME, "modules": names}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_int8(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_int8` (weights read with safetensors only)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists():
        raise ModelError(f"{folder} is not an int8 student folder ({MANIFEST_NAME} is missing)")
    manifest = json.loads(manifest_path.read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    for name in manifest["modules"]:
        linear = model.get_submodule(name)
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))
    load_model(model, str(folder / WEIGHTS_NAME), strict=True)
    return model.eval()
