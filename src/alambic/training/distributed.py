"""How the one training loop spreads over processes: `train.strategy: ddp | fsdp`.

The loop (training/loop.py) never branches on the strategy; it asks a strategy
object to wrap the models, to run a micro-batch with or without gradient sync,
to clip, to save and load checkpoints, and to export `final/`.

- `DDPStrategy` (default): a full replica of student and teacher per process,
  Accelerate's `prepare` (DDP), safetensors checkpoints (training/checkpoint.py).
- `FSDPStrategy`: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) called
  directly, the same way on GPUs (NCCL) and on CPU processes (gloo). The student
  is sharded per decoder layer, then at its root (embedding, final norm, LM
  head, auxiliary modules); parameters, gradients and AdamW state are all 1/N
  per process. A live teacher is sharded the same way, for inference only
  (resharded after every forward, no gradients, no optimizer state).
  Checkpoints are Distributed Checkpoint folders (training/checkpoint_dcp.py):
  each process writes its own shard; they resume on any number of processes.

Why not Accelerate's FSDP plugin: `Accelerator(cpu=True)` ignores it (full
parameters on every process), so the CPU test would not test sharding. The
Accelerator still owns the process group, devices, reductions and trackers.

The fused LM-head loss with a sharded head: the student's root FSDP unit (which
holds the head) is built with `reshard_after_forward=False`, so after the
student's forward the head weight is the all-gathered, ordinary tensor: the
fused loss reads it once per micro-batch (no per-chunk collectives), and its
gradient is reduce-scattered with the root's other gradients in backward. The
teacher's head is gathered once per micro-batch with `DTensor.full_tensor()`
(no gradient flows to it). A per-chunk computation on the local vocabulary
shard would save the V x H gather but needs a distributed log-sum-exp per chunk
(two collectives per chunk, each one a latency on the critical path), where
the gather is one collective per micro-batch; its memory is the head itself
(2-7% of 7B-70B models, more for sub-1B students with large vocabularies).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch import nn

from alambic.config import DistillConfig


def check_launcher() -> None:
    """One way to choose the strategy: train.strategy. Accelerate's own FSDP / DeepSpeed plugins are refused."""
    import os

    from alambic.errors import ConfigError

    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"this run was launched with Accelerate's {name} plugin ({variable} is set); alambic shards with "
                "its own train.strategy setting and does not support Accelerate's plugins",
                "launch with a multi-GPU Accelerate config (configs/accelerate/) or torchrun, and set "
                "train.strategy: fsdp in the run config (docs/scale.md)",
            )


def make_strategy(config: DistillConfig, accelerator):
    if config.train.strategy == "fsdp":
        return FSDPStrategy(config, accelerator)
    return DDPStrategy(config, accelerator)


def inner_student(student) -> nn.Module:
    """The StudentModule behind a DDP / compiled wrapper (FSDP2 modifies the module in place)."""
    while hasattr(student, "module"):
        student = student.module
    return student


class DDPStrategy:
    """Today's behaviour: one full replica per process, Accelerate's DDP."""

    name = "ddp"

    def __init__(self, config: DistillConfig, accelerator):
        self.config, self.accelerator = config, accelerator

    @property
    def build_device(self):
        return self.accelerator.device

    def prepare(self, setup, make_optimizer):
        optimizer = make_optimizer(setup.student)
        return self.accelerator.prepare(setup.student, optimizer)

    def micro_step(self, student, last_micro: bool):
        return contextlib.nullcontext() if last_micro else self.accelerator.no_sync(student)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, student, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(student.parameters(), max_norm))

    def unwrap(self, student):
        return self.accelerator.unwrap_model(student)

    def save_checkpoint(self, run_dir, step, student, optimizer, scheduler, extra, keep_last) -> None:
        from alambic.training.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(run_dir, step, self.unwrap(student), optimizer, scheduler, extra, keep_last)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path, student, optimizer, scheduler) -> dict:
        from alambic.training.checkpoint_dcp import is_dcp_checkpoint, wrong_format_error
        from alambic.training.checkpoint import load_checkpoint

        if is_dcp_checkpoint(path):
            raise wrong_format_error(path, "fsdp", "ddp")
        return load_checkpoint(path, self.unwrap(student), optimizer, scheduler)

    def export(self, student, tokenizer, run_dir, metrics, teacher_name) -> None:
        from alambic.training.export import export_student

        if self.accelerator.is_main_process:
            export_student(self.unwrap(student), tokenizer, self.config, run_dir, metrics, teacher_name)

    def close(self) -> None:
        pass


class FSDPStrategy(DDPStrategy):
    """PyTorch FSDP2 over every process of the run (see the module docstring)."""

    name = "fsdp"

    def __init__(self, config: DistillConfig, accelerator):
        super().__init__(config, accelerator)
        self._own_group = _ensure_process_group(accelerator.device)
        from torch.distributed.device_mesh import init_device_mesh

        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.mesh = init_device_mesh(accelerator.device.type, (self.world_size,))

    @property
    def build_device(self):
        # Only the main process reads the weights (into CPU memory); the others build the models on
        # the meta device (shapes only) and receive their shards from it. Models move to the device
        # layer by layer as they are sharded, so no model has to fit on one device whole.
        return torch.device("cpu") if self.rank == 0 else torch.device("meta")

    def prepare(self, setup, make_optimizer):
        fsdp = self.config.train.fsdp
        student = setup.student
        if fsdp.activation_checkpointing:
            _enable_activation_checkpointing(student.model)
        full = student.state_dict() if self.rank == 0 else {}
        self._shard(student, decoder_layers(student.model), fsdp.reshard_after_forward, root_reshard=False, trainable=True)
        self._fill_from_main(student, full)
        if fsdp.shard_teacher and setup.teacher_model is not None and hasattr(setup.teacher, "model"):
            setup.teacher.model = ShardedTeacher(setup.teacher_model, self)
        elif setup.teacher_model is not None:
            if self.world_size > 1:
                _broadcast_whole(setup.teacher_model, self.accelerator.device, self.rank)
            setup.teacher_model.to(self.accelerator.device)
        return student, make_optimizer(student)

    def _fill_from_main(self, module: nn.Module, full: dict) -> None:
        """Give every process its shards of the main process's weights (the others built on meta)."""
        if self.world_size == 1:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.rank != 0:
            module.to_empty(device=self.accelerator.device)
        set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in module.buffers():  # non-persistent buffers (e.g. rotary tables) are not in state dicts
            torch.distributed.broadcast(buffer.data, src=0)

    def _shard(self, root: nn.Module, layers, reshard: bool, root_reshard: bool, trainable: bool, offload=False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": self.mesh}
        if trainable and self.config.train.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if offload:
            from torch.distributed.fsdp import CPUOffloadPolicy

            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard, **kwargs)
        fully_shard(root, reshard_after_forward=root_reshard, **kwargs)  # also moves buffers to the device

    def micro_step(self, student, last_micro: bool):
        # Gradients are reduce-scattered after every micro-batch, so they stay sharded
        # (1/N memory) during accumulation; the sum over micro-batches is unchanged.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, student, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unwrap(self, student):
        return student

    def save_checkpoint(self, run_dir, step, student, optimizer, scheduler, extra, keep_last) -> None:
        from alambic.training.checkpoint_dcp import save_dcp_checkpoint

        save_dcp_checkpoint(run_dir, step, student, optimizer, scheduler, extra, keep_last, self.rank)

    def load_checkpoint(self, path, student, optimizer, scheduler) -> dict:
        from alambic.training.checkpoint_dcp import is_dcp_checkpoint, load_dcp_checkpoint, wrong_format_error

        if not is_dcp_checkpoint(path):
            self.close()  # a 1-process group of our own must not outlive the refused run
            raise wrong_format_error(path, "ddp", "fsdp")
        return load_dcp_checkpoint(path, student, optimizer, scheduler, self.rank)

    def export(self, student, tokenizer, run_dir, metrics, teacher_name) -> None:
        """Gather the full student on the main process (CPU) and write ONE Hugging Face folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from alambic.training.export import export_student

        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            model_state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            export_student(student, tokenizer, self.config, run_dir, metrics, teacher_name, state_dict=model_state)
        torch.distributed.barrier()

    def close(self) -> None:
        if self._own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class ShardedTeacher(nn.Module):
    """A frozen teacher sharded with FSDP2, with the interface `LiveTeacher` uses.

    Every call goes through this root module, so FSDP's hooks (gather a layer's
    weights, run it, free them) always run in the right order; `base_model` and
    `get_output_embeddings` mirror a Hugging Face model's.
    """

    def __init__(self, model: nn.Module, strategy: FSDPStrategy):
        super().__init__()
        self.inner = model
        self.config = model.config
        fsdp = strategy.config.train.fsdp
        offload = fsdp.teacher_offload and strategy.accelerator.device.type == "cuda"
        full = self.state_dict() if strategy.rank == 0 else {}
        strategy._shard(self, decoder_layers(model), True, root_reshard=True, trainable=False, offload=offload)
        strategy._fill_from_main(self, full)

    def forward(self, base: bool, kwargs: dict):
        return self.inner.base_model(**kwargs) if base else self.inner(**kwargs)

    def __call__(self, **kwargs):  # noqa: D401 - the HF-style call LiveTeacher makes
        return super().__call__(False, kwargs)

    def base_model(self, **kwargs):
        return super().__call__(True, kwargs)

    def get_output_embeddings(self):
        head = self.inner.get_output_embeddings()
        weight = head.weight
        bias = getattr(head, "bias", None)
        gather = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        return SimpleNamespace(weight=gather(weight), bias=None if bias is None else gather(bias))


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (transformers' own hook, non-reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _broadcast_whole(model: nn.Module, device, rank: int) -> None:
    """A replicated (not sharded) teacher: the main process's weights copied to every process."""
    if rank != 0:
        model.to_empty(device=device)
    else:
        model.to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (each becomes one FSDP unit)."""
    blocks = getattr(model, "_no_split_modules", None) or []
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if layers:
        return layers
    for module in model.modules():  # fallback: the longest ModuleList
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def _ensure_process_group(device: torch.device) -> bool:
    """A one-process group when the run was not launched by torchrun / accelerate (resume on 1 process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process really holds (its local shards under FSDP)."""
    total = 0
    for parameter in module.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total
