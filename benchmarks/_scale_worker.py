"""One run of benchmarks/scale.py (plain python, or one process of torchrun): measure, write rank<r>.json.

Measured: the peak memory of the training steps above what the process held
before the models were built (CPU: VmHWM reset through /proc/self/clear_refs
after a warm-up that imports and runs everything once; GPU:
torch.cuda.max_memory_allocated), the bytes of the student's parameters,
gradients and AdamW state this process really holds (local shards under FSDP),
the teacher's local parameter bytes, and tokens/s from the run's metrics.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _status_kib, release_free_memory  # noqa: E402


def _local_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def _warm_up(config) -> None:
    """Import and run every code path once on a throwaway model, so the baseline includes them."""
    import torch

    from alambic.testing import tiny_llama

    model = tiny_llama(64, hidden=16, layers=1, heads=2)
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    torch.optim.AdamW(model.parameters()).step()
    del model


def main(config_path: str, out_dir: str) -> None:
    import torch

    from alambic.config import load_config
    from alambic.training import distributed
    from alambic.training.loop import run_distillation

    config = load_config(config_path)
    cuda = not config.train.cpu and torch.cuda.is_available()
    _warm_up(config)
    measured: dict = {}
    classes = (distributed.DDPStrategy, distributed.FSDPStrategy)
    originals = {cls: (cls.prepare, cls.clip_grad_norm, cls.export) for cls in classes}

    def prepare(self, setup, make_optimizer):
        student, optimizer = originals[type(self)][0](self, setup, make_optimizer)
        measured["optimizer"], measured["student"] = optimizer, distributed.inner_student(student)
        teacher = getattr(setup.teacher, "model", None)
        measured["teacher_param_bytes"] = _local_bytes(teacher.parameters()) if teacher is not None else 0
        return student, optimizer

    def clip(self, student, max_norm):
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        measured["grad_bytes"] = max(measured.get("grad_bytes", 0), _local_bytes(grads))
        return originals[type(self)][1](self, student, max_norm)

    def export(self, student, *args):
        measured["peak"] = _peak(cuda) - measured["baseline"]  # the training steps, not the export
        states = [t for state in measured["optimizer"].state.values() for t in state.values()
                  if torch.is_tensor(t) and t.dim() > 0]
        measured["optimizer_bytes"] = _local_bytes(states)
        measured["param_bytes"] = _local_bytes(measured["student"].parameters())
        return originals[type(self)][2](self, student, *args)

    for cls in classes:
        cls.prepare, cls.clip_grad_norm, cls.export = prepare, clip, export

    measured["baseline"] = _reset_peak(cuda)
    run_distillation(config, overwrite=True)
    history = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "peak_bytes": measured["peak"], "param_bytes": measured["param_bytes"], "grad_bytes": measured["grad_bytes"],
        "optimizer_bytes": measured["optimizer_bytes"], "teacher_param_bytes": measured["teacher_param_bytes"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in history[1:]),
        "threads": torch.get_num_threads(),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _reset_peak(cuda: bool) -> int:
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak(cuda: bool) -> int:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
