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
  the attention probabilities under eager attention; SDPA keeps none), or only each layer's input with activation
  checkpointing;
- the loss: one chunk of student and teacher logits (fused) or the whole
  [tokens x vocabulary] logits (plain);
- the teacher: all its weights per process (co-located), 1/N plus the gathered
  root unit and LM head (sharded), or none but the decoded top-k batch (cache).

The peak is the static part (weights, optimizer state) plus the largest of the
teacher's forward, the student's forward/backward (activations, loss, gradients
being produced) and the optimizer step (gradients + AdamW's temporary
per-parameter buffers), plus a runtime allowance (RUNTIME_BYTES). The
coefficients are those of a Llama-style block in eager PyTorch; they were
checked against measured peaks (benchmarks/scale.py, RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP32 = 4
# Per-process memory that is not the run's tensors. CPU: Python objects of the models and the
# tokenized data, autograd bookkeeping, allocator slack: ~20 MB measured above the tensor figures
# with the stdlib test corpus (benchmarks/scale.py; it grows with the dataset). GPU: an allowance
# for the CUDA context, cuBLAS workspaces and NCCL buffers (not seen by torch.cuda.max_memory_allocated).
RUNTIME_BYTES = {"cpu": 20 * 2**20, "cuda": 2**30}
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
    activation_bytes: int = FP32  # 2 under bf16 mixed precision
    quadratic_attention: bool = False  # eager attention keeps [heads, L, L] probabilities; SDPA (flash-style) does not
    runtime_bytes: int = 0  # memory that is not tensors of the run (see RUNTIME_BYTES)


def layer_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes one decoder layer keeps for backward."""
    tokens = work.batch * work.length
    per_token = 12 * shape.hidden + 5 * shape.intermediate
    attention = 2 * work.batch * shape.heads * work.length * work.length if work.quadratic_attention else 0
    return work.activation_bytes * (tokens * per_token + attention)


def loss_bytes(vocab: int, work: Workload) -> int:
    rows = min(work.chunk, work.batch * work.length) if work.fused else work.batch * work.length
    return FP32 * 6 * rows * vocab  # student and teacher logits, their softmaxes, the logits' gradient


@dataclass
class Estimate:
    strategy: str
    teacher: str  # co-located | sharded | cache | served | none
    processes: int
    parts: dict = field(default_factory=dict)  # name -> bytes
    peak: int = 0

    def fits(self, device_bytes: int | None) -> bool | None:
        return None if device_bytes is None else self.peak <= device_bytes


def estimate(
    student: ModelShape, teacher: ModelShape | None, work: Workload, strategy: str, placement: str, n: int
) -> Estimate:
    """Per-process bytes of one (strategy, teacher placement) on `n` processes."""
    p = student.parameters
    sharded = strategy == "fsdp"
    divide = n if sharded else 1
    parts = {
        "student parameters": FP32 * p // divide,
        "student gradients": FP32 * p // divide,
        "optimizer state (AdamW)": 2 * FP32 * p // divide,
    }
    gathered_layers = 0
    if sharded:  # the root unit stays gathered for the whole step; two layers are gathered at a time
        parts["FSDP gathered weights"] = work.activation_bytes * (student.root_parameters + 2 * student.layer_parameters)
        gathered_layers = work.activation_bytes * 2 * student.layer_parameters
    elif n > 1:
        parts["DDP gradient buckets"] = FP32 * p
    tokens = work.batch * work.length
    per_layer = layer_activation_bytes(student, work)
    if work.activation_checkpointing:
        parts["activations"] = work.activation_bytes * tokens * student.hidden * student.layers + per_layer
    else:
        parts["activations"] = per_layer * student.layers
    parts["loss chunk"] = loss_bytes(student.vocab, work)
    teacher_phase = head_gather = 0
    if placement in ("co-located", "sharded") and teacher is not None:
        width = teacher.bytes_per_parameter
        parts["teacher parameters"] = teacher.parameters * width // (n if placement == "sharded" else 1)
        parts["teacher output"] = FP32 * tokens * (teacher.hidden if work.fused else teacher.vocab)
        teacher_phase = layer_activation_bytes(teacher, work) // 4  # one layer's transient, no graph kept
        if placement == "sharded":  # gathered while the teacher runs; its head again for the fused loss
            parts["teacher gathered weights"] = width * (teacher.root_parameters + 2 * teacher.layer_parameters)
            teacher_phase += parts["teacher gathered weights"]
            head_gather = width * teacher.vocab * teacher.hidden if work.fused else 0
    elif placement in ("cache", "served"):  # decoded top-k of the batch (served: the server's top_k)
        name = "cache read buffers" if placement == "cache" else "served top-k buffers"
        parts[name] = tokens * work.top_k * 12 + tokens * 4  # int64 ids + fp32 log-probs, tail
    static = parts["student parameters"] + parts["optimizer state (AdamW)"] + parts.get("teacher parameters", 0)
    static += parts.get("FSDP gathered weights", 0) - gathered_layers
    backward = parts["activations"] + parts["loss chunk"] + parts.get("teacher output", 0) + parts["student gradients"]
    backward += parts.get("DDP gradient buckets", 0) + parts.get("cache read buffers", 0) + gathered_layers + head_gather
    backward += parts.get("served top-k buffers", 0)
    step = parts["student gradients"] + parts.get("DDP gradient buckets", 0) + FP32 * p // divide  # AdamW temporaries
    if work.runtime_bytes:
        parts["runtime (not tensors)"] = work.runtime_bytes
    result = Estimate(strategy, placement, n, parts)
    result.peak = static + max(backward, step, teacher_phase + parts.get("teacher output", 0)) + work.runtime_bytes
    return result
