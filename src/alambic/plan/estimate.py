"""Per-process memory of a run, from the model configs alone (no weights are read).

Every figure is a count of tensor bytes, built from the exact parameter counts
of the models (instantiated on the `meta` device: shapes, no storage):

- student parameters, gradients, AdamW state (2 fp32 moments) and, under DDP,
  its gradient buckets (a second copy of the gradients); under FSDP each is
  divided by the number of processes, plus the weights FSDP gathers at once
  (the root unit: embedding, final norm and LM head, kept for the whole step;
  two decoder layers in flight);
- activations kept for backward at the configured batch and length (per
  decoder layer: the inputs of every matmul, norm and activation function, and
  the attention probabilities), or only each layer's input with activation
  checkpointing;
- the loss: one chunk of student and teacher logits (fused) or the whole
  [tokens x vocabulary] logits (plain);
- the teacher: all its weights per process (co-located), 1/N plus the gathered
  root unit and LM head (sharded), or none but the decoded top-k batch (cache).

The peak is the static part (weights, optimizer state) plus the larger of the
forward/backward phase (activations, loss, gradients being produced) and the
optimizer step (gradients + AdamW's temporary per-parameter buffers). The
coefficients are those of a Llama-style block in eager PyTorch; they were
checked against measured peaks (benchmarks/scale.py, RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of one model, from its config."""

    parameters: int
    root_parameters: int  # outside the decoder layers: embeddings, final norm, LM head
    layer_parameters: int  # the largest decoder layer
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    bytes_per_parameter: int


def model_shape(config, dtype_bytes: int) -> ModelShape:
    """Exact parameter counts of a Hugging Face causal LM config (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alambic.training.distributed import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers] or [0]
    return ModelShape(
        parameters=total, root_parameters=total - sum(per_layer), layer_parameters=max(per_layer),
        layers=len(layers), hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=config.num_attention_heads, vocab=config.vocab_size, bytes_per_parameter=dtype_bytes,
    )


@dataclass(frozen=True)
class Workload:
    batch: int  # sequences per process per micro-batch
    length: int
    fused: bool
    chunk: int
    activation_checkpointing: bool
    top_k: int  # cache: k per position


def layer_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes one decoder layer keeps for backward (fp32, eager attention)."""
    tokens = work.batch * work.length
    per_token = 12 * shape.hidden + 5 * shape.intermediate
    attention = 2 * work.batch * shape.heads * work.length * work.length
    return FP32 * (tokens * per_token + attention)


def loss_bytes(vocab: int, work: Workload) -> int:
    rows = min(work.chunk, work.batch * work.length) if work.fused else work.batch * work.length
    return FP32 * 6 * rows * vocab  # student and teacher logits, their softmaxes, the logits' gradient


@dataclass
class Estimate:
    strategy: str
    teacher: str  # co-located | sharded | cache | none
    processes: int
    parts: dict = field(default_factory=dict)  # name -> bytes
    peak: int = 0

    def fits(self, device_bytes: int | None) -> bool | None:
        return None if device_bytes is None else self.peak <= device_bytes


def estimate(student: ModelShape, teacher: ModelShape | None, work: Workload, strategy: str, placement: str, n: int) -> Estimate:
    """Per-process bytes of one (strategy, teacher placement) on `n` processes."""
    p = student.parameters
    sharded = strategy == "fsdp"
    divide = n if sharded else 1
    parts = {
        "student parameters": FP32 * p // divide,
        "student gradients": FP32 * p // divide,
        "optimizer state (AdamW)": 2 * FP32 * p // divide,
    }
    if sharded:
        parts["FSDP gathered weights"] = FP32 * (student.root_parameters + 2 * student.layer_parameters)
    elif n > 1:
        parts["DDP gradient buckets"] = FP32 * p
    tokens = work.batch * work.length
    per_layer = layer_activation_bytes(student, work)
    if work.activation_checkpointing:
        parts["activations"] = FP32 * tokens * student.hidden * student.layers + per_layer
    else:
        parts["activations"] = per_layer * student.layers
    parts["loss chunk"] = loss_bytes(student.vocab, work)
    teacher_forward = 0
    if placement in ("co-located", "sharded") and teacher is not None:
        t = teacher.parameters * teacher.bytes_per_parameter
        parts["teacher parameters"] = t // n if placement == "sharded" else t
        if placement == "sharded":
            root = teacher.root_parameters * teacher.bytes_per_parameter
            parts["teacher gathered weights"] = root + 2 * teacher.layer_parameters * teacher.bytes_per_parameter
        kept = tokens * teacher.hidden if work.fused else tokens * teacher.vocab
        parts["teacher output"] = FP32 * kept
        teacher_forward = layer_activation_bytes(teacher, work) // 4  # one layer's transient, no graph kept
    elif placement == "cache":
        parts["cache read buffers"] = tokens * work.top_k * 12 + tokens * 4  # int64 ids + fp32 log-probs, tail
    static = sum(v for k, v in parts.items() if k in (
        "student parameters", "optimizer state (AdamW)", "teacher parameters", "FSDP gathered weights",
        "teacher gathered weights"))
    backward = parts["activations"] + parts["loss chunk"] + parts.get("teacher output", 0) + parts["student gradients"]
    backward += parts.get("DDP gradient buckets", 0) + parts.get("cache read buffers", 0) + teacher_forward
    step = parts["student gradients"] + parts.get("DDP gradient buckets", 0) + FP32 * p // divide  # AdamW temporaries
    result = Estimate(strategy, placement, n, parts)
    result.peak = static + max(backward, step)
    return result
