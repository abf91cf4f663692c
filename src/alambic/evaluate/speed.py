"""Cost of a model: parameters, size on disk, peak inference memory, latency, throughput, generation speed.

Timings are the fastest of several repeats after a warm-up: other processes
on a shared machine only ever add time, so the minimum is the figure closest
to what the model costs on a machine of its own (and the most reproducible). Peak memory on CPU is the peak of live
tensor bytes (weights + activations) during one forward, tracked exactly by a
dispatch mode; on CUDA it is the allocator's own peak.

    python -c "from alambic.evaluate.speed import count_parameters; import torch; print(count_parameters(torch.nn.Linear(4, 2)))"
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once even when tied (the embedding and LM head share one matrix)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def disk_size_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a saved model (config and tokenizer files are not the model's size)."""
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class _LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode, freed when their last tensor dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._holders: dict[int, int] = {}  # storage pointer -> live tensors on it

    def _release(self, pointer: int, nbytes: int) -> None:
        self._holders[pointer] -= 1
        if self._holders[pointer] == 0:
            del self._holders[pointer]
            self.live_bytes -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        if pointer == 0:
            return
        if pointer not in self._holders:
            self._holders[pointer] = 0
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._holders[pointer] += 1
        weakref.finalize(tensor, self._release, pointer, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for output in outputs:
            if isinstance(output, torch.Tensor) and not output.is_meta:
                self._track(output)
        return result


def peak_inference_memory_bytes(model: torch.nn.Module, run_forward: Callable[[], object]) -> int:
    """Weights plus the peak of activation memory while `run_forward()` runs."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            run_forward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before + weights_bytes(model)
    tracker = _LiveTensorBytes()
    with torch.inference_mode(), tracker:
        output = run_forward()
        del output
    return weights_bytes(model) + tracker.peak_bytes


def generation_runner(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int, new_tokens: int):
    """A no-argument callable: greedy generation of exactly `new_tokens` tokens for `batch_size` prompts.

    The prompts are encoded once, left-padded (a decoder continues from the last real token).
    """
    model.eval()
    device = next(model.parameters()).device
    chunk = (prompts * (batch_size // max(len(prompts), 1) + 1))[:batch_size]
    tokenizer.padding_side = "left"
    encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return lambda: model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)


# ----------------------------------------------------------------------------- interleaved throughput

SPREAD_WARNING = 0.10  # relative spread above which a speed figure is flagged as unreliable


def interleaved_seconds(runners: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each runner's call in each of `rounds` rounds, the models interleaved.

    Every round calls every model once, in an order rotated by one each round, so a
    change of machine load (another process starting, the CPU clocking down) falls
    on every model alike instead of on whichever happened to be measured then.
    Each timed call follows an untimed call of the same model: rotation keeps the
    cyclic order, so without it the model listed after a large one (the teacher)
    would always be timed on the caches the large one had just evicted (measured:
    an identical student 5-15% slower than its twins on the demo).
    """
    names = list(runners)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                runners[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                runners[name]()  # warm: its weights and activations back in cache, not timed
                start = clock()
                runners[name]()
                samples[name].append(clock() - start)
    return samples


def median_and_spread(samples: list[float]) -> tuple[float, float]:
    """(median, relative spread): the spread is the interquartile range over the median."""
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) < 4:
        return median, (ordered[-1] - ordered[0]) / median if median else 0.0
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
    return median, (quartiles[2] - quartiles[0]) / median if median else 0.0


def interleaved_throughput(runners: dict[str, Callable[[], object]], batch_size: int, rounds: int = 7,
                           warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """{name: {"throughput_per_s", "throughput_spread", "throughput_rounds"}} from interleaved rounds."""
    result = {}
    for name, seconds in interleaved_seconds(runners, rounds, warmup, clock).items():
        median, spread = median_and_spread(seconds)
        result[name] = {"throughput_per_s": batch_size / median, "throughput_spread": spread,
                        "throughput_rounds": len(seconds)}
    return result


def spread_warnings(measured: dict[str, dict], limit: float = SPREAD_WARNING, spread_key: str = "throughput_spread",
                    rounds_key: str = "throughput_rounds", what: str = "throughput") -> list[str]:
    return [f"{name}: {what} spread {values[spread_key]:.0%} over {values[rounds_key]} rounds "
            f"(> {limit:.0%}): the machine's load changed while measuring; treat this speed as approximate"
            for name, values in measured.items() if values.get(spread_key, 0.0) > limit]


def classifier_batch_runner(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32):
    """A no-argument callable running one batch of `batch_size` texts through `model` (inputs encoded once)."""
    model.eval()
    device = next(model.parameters()).device
    chunk = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
    return lambda: model(**batch)
