"""Fused chunked KD loss vs full logits, Liger's fused JSD and the GEMM floor.

One forward+backward step of the LM-head distillation loss (JSD, beta 0.5, mixed
with CE at alpha 0.5, mean over counted tokens) for each implementation, each in
its own subprocess so its peak memory is its own:
- naive:   full student and teacher logits + `distillation_loss` (plain path)
- liger:   liger_kernel.chunked_loss.LigerFusedLinearJSDLoss, torch.compile'd,
           same chunk size (benchmark-only dependency: pip install liger-kernel)
- fused:   alambic.losses.fused.fused_distillation_loss, eager
- fused-compiled: the same with compile=True
- fused-fp32: the same with fp32_matmul=True (bf16 heads upcast to fp32 GEMMs,
           the path before bf16 GEMMs; identical to fused for fp32 inputs)
- floor:   the same chunked matmuls with no loss (student logits, teacher
           logits, grad of hidden, grad of weight) into buffers allocated once,
           in the fused path's GEMM dtype (the inputs' dtype: bf16 on GPU,
           fp32 on CPU unless --dtype): the 4-GEMM floor
Timings: median of --repeats steps after one warm-up step. The machine is shared,
so each worker also times a floor step after each of its own steps; "norm"
columns divide by that in-process floor, which cancels most load drift between
subprocesses. Peak memory: extra resident memory of one step (see _common.py).

    .venv/bin/python benchmarks/kd_loss.py --quick        # 1 small shape, a few minutes
    .venv/bin/python benchmarks/kd_loss.py                # N in {1024, 4096} x V in {32000, 128256}
    .venv/bin/python benchmarks/kd_loss.py --rows 1024 --vocab 32000 --impls naive fused floor
    .venv/bin/python benchmarks/kd_loss.py --shapes 1024x32000 4096x32000 1024x128256 --repeats 3
    .venv/bin/python benchmarks/kd_loss.py --threads 2 --shapes 1024x32000 1024x128256 --impls fused floor  # issue 11 target
    python benchmarks/kd_loss.py --device cuda      # GPU: N=8192, H=4096, bf16 inputs, naive/liger/fused/fused-fp32/floor
    .venv/bin/python benchmarks/kd_loss.py --quick --dtype bfloat16 --impls naive fused fused-fp32 floor  # bf16 on CPU

Headline: raw median seconds ("time s"), with the worker threads printed; "norm"
divides by the floor timed in the same worker. Target (issue 11): fused eager
>= 85% of the floor ("floor / time") at V = 32000 and V = 128256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    available_memory_mb,
    machine_summary,
    median,
    median_seconds,
    peak_step_memory_mb,
    run_in_subprocess,
)

IMPLEMENTATIONS = ("naive", "liger", "fused", "fused-compiled", "fused-fp32", "floor")
GPU_IMPLEMENTATIONS = ["naive", "liger", "fused", "fused-fp32", "floor"]
# Resident bytes of the naive step per logit, measured: ~13 fp32 [N, V] tensors live at once.
NAIVE_BYTES_PER_LOGIT = 4 * 14


def _inputs(config: dict):
    import torch

    generator = torch.Generator().manual_seed(0)
    rows, width, vocab = config["rows"], config["hidden"], config["vocab"]
    dtype = getattr(torch, config["dtype"])
    device = config["device"]

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.05] = -100  # a few ignored positions
    return {
        "hidden": tensor(rows, width).requires_grad_(),
        "weight": tensor(vocab, width, scale=width**-0.5).requires_grad_(),
        "teacher_hidden": tensor(rows, width),
        "teacher_weight": tensor(vocab, width, scale=2 * width**-0.5),
        "labels": labels.to(device),
    }


def _floor_step(inputs: dict, chunk: int):
    """The four GEMMs of the fused loss, into buffers allocated once, in the fused path's
    GEMM dtype (the inputs' own dtype: bf16 inputs, bf16 tensor-core GEMMs with fp32
    accumulation): nothing does less work."""
    import torch

    compute = inputs["hidden"].dtype
    hidden, weight = inputs["hidden"].detach().to(compute), inputs["weight"].detach().to(compute)
    teacher_hidden, teacher_weight = inputs["teacher_hidden"].to(compute), inputs["teacher_weight"].to(compute)
    rows, vocab = hidden.shape[0], weight.shape[0]
    logits = torch.empty(min(chunk, rows), vocab, dtype=compute, device=hidden.device)
    teacher_logits = torch.empty_like(logits)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)

    def step():
        with torch.no_grad():
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                block, n = hidden[start:stop], stop - start
                torch.matmul(block, weight.T, out=logits[:n])
                torch.matmul(teacher_hidden[start:stop], teacher_weight.T, out=teacher_logits[:n])
                torch.matmul(logits[:n], weight, out=grad_hidden[start:stop])  # gradient of the hidden states
                if start == 0:
                    torch.matmul(logits[:n].T, block, out=grad_weight)
                else:
                    grad_weight.addmm_(logits[:n].T, block)
        return torch.zeros(())

    return step


def _loss_step(impl: str, inputs: dict, config: dict):
    import torch

    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    teacher_hidden, teacher_weight = inputs["teacher_hidden"], inputs["teacher_weight"]
    options = {"objective": config["objective"], "alpha": config["alpha"], "beta": config["beta"]}
    if impl == "naive":
        from alambic.losses import distillation_loss

        def forward():
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            return distillation_loss(hidden @ weight.T, teacher_logits, labels, **options)["loss"]

    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=config["alpha"], weight_soft_loss=1 - config["alpha"], beta=config["beta"],
            compiled=True, chunk_size=config["chunk"],
        )

        def forward():
            return liger(hidden, weight, teacher_hidden, teacher_weight, labels)

    else:
        from alambic.losses.fused import fused_distillation_loss

        def forward():
            return fused_distillation_loss(
                hidden, weight, None, labels, None, teacher_hidden=teacher_hidden,
                teacher_head_weight=teacher_weight, chunk_size=config["chunk"],
                compile=impl == "fused-compiled", reduction="mean", fp32_matmul=impl == "fused-fp32", **options,
            )["loss"]

    def step():
        hidden.grad = weight.grad = None
        loss = forward()
        loss.backward()
        return loss.detach()

    return step


def worker(config: dict) -> dict:
    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    inputs = _inputs(config)
    on_gpu = config["device"] == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    floor = _floor_step(inputs, config["chunk"])
    step = floor if config["impl"] == "floor" else _loss_step(config["impl"], inputs, config)
    start = time.perf_counter()
    loss = float(step())
    warmup_seconds = time.perf_counter() - start
    # Gradients of the warm-up step go first, so each peak includes allocating its own.
    inputs["hidden"].grad = inputs["weight"].grad = None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        memory_mb, method = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda allocator"
    else:
        memory_mb, method = peak_step_memory_mb(step)
    times, floor_times = [], []
    for _ in range(config["repeats"]):
        times += median_seconds(step, 1, sync)
        if config["impl"] != "floor":
            floor_times += median_seconds(floor, 1, sync)
    floor_times = floor_times or times
    return {
        "threads": torch.get_num_threads(),
        "seconds": median(times), "floor_seconds": median(floor_times), "times": times,
        "memory_mb": memory_mb, "memory_method": method, "loss": loss, "warmup_seconds": warmup_seconds,
    }


def _skip_reason(impl: str, config: dict) -> str | None:
    if impl == "liger":
        if config["objective"] != "jsd":
            return "Liger's fused loss here is JSD only"
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as error:  # any import failure means: not benchmarkable here
            return f"liger-kernel does not import ({type(error).__name__}); pip install liger-kernel"
    if impl == "naive" and config["device"] == "cpu":
        needed = NAIVE_BYTES_PER_LOGIT * config["rows"] * config["vocab"] / 2**20
        if needed > 0.8 * available_memory_mb():
            return f"needs ~{needed / 1024:.0f} GB, {available_memory_mb() / 1024:.0f} GB available"
    return None


def _flops(config: dict) -> float:
    # student logits, grad hidden, grad weight (3 x H_s) + teacher logits (H_t)
    return 2 * config["rows"] * config["vocab"] * (3 * config["hidden"] + config["hidden"])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


class _Results:
    """Worker results by (shape, implementation), with the ratios the report needs."""

    def __init__(self, shapes: list, entries: dict):
        self.shapes, self.entries = shapes, entries

    def get(self, shape, impl, key):
        return self.entries.get((shape, impl), {}).get(key)

    def normalised(self, shape, impl):
        """Step time over the floor step timed in the same process (cancels load drift)."""
        return _ratio(self.get(shape, impl, "seconds"), self.get(shape, impl, "floor_seconds"))

    def time_vs(self, shape, impl, other) -> str:
        raw = _ratio(self.get(shape, impl, "seconds"), self.get(shape, other, "seconds"))
        return f"{_fmt(raw)} / {_fmt(_ratio(self.normalised(shape, impl), self.normalised(shape, other)))}"

    def memory_vs(self, shape, impl, other):
        return _ratio(self.get(shape, impl, "memory_mb"), self.get(shape, other, "memory_mb"))

    def floor_share(self, shape, impl):
        return _ratio(self.get(shape, impl, "floor_seconds"), self.get(shape, impl, "seconds"))


def _table(results: _Results, gpu: bool) -> list[str]:
    lines = [
        "| N | V | impl | time s | norm | peak MB | loss | time vs naive | time vs liger "
        "| mem vs naive | mem vs liger | floor / time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in results.shapes:
        for impl in IMPLEMENTATIONS:
            entry = results.entries.get((shape, impl))
            if entry is None:
                continue
            if "seconds" not in entry:
                lines.append(f"| {shape[0]} | {shape[1]} | {impl} | {entry.get('error') or entry.get('skipped')} |")
                continue
            tflops = f" ({_flops(entry['config']) / entry['seconds'] / 1e12:.1f} TFLOP/s)" if gpu else ""
            lines.append(
                f"| {shape[0]} | {shape[1]} | {impl} | {entry['seconds']:.3f}{tflops} "
                f"| {results.normalised(shape, impl):.2f} | {entry['memory_mb']:.0f} | {entry['loss']:.5f} "
                f"| {results.time_vs(shape, impl, 'naive')} | {results.time_vs(shape, impl, 'liger')} "
                f"| {_fmt(results.memory_vs(shape, impl, 'naive'), '{:.3f}')} "
                f"| {_fmt(results.memory_vs(shape, impl, 'liger'))} "
                f"| {_fmt(results.floor_share(shape, impl), '{:.0%}')} |"
            )
    return lines


def _checks(results: _Results, shape, impl: str) -> list[tuple[str, float | None, bool]]:
    """(target, measured ratio, met) for one shape, following the issue's targets."""
    floor_target = 0.85
    liger_time = _ratio(results.normalised(shape, impl), results.normalised(shape, "liger"))
    naive_time = _ratio(results.normalised(shape, impl), results.normalised(shape, "naive"))
    checks = [
        ("time <= 1.0x Liger (normalised)", liger_time, liger_time is not None and liger_time <= 1.0),
        ("memory <= Liger", results.memory_vs(shape, impl, "liger"), None),
        ("time <= 0.55x naive (normalised)", naive_time, naive_time is not None and naive_time <= 0.55),
        (f">= {floor_target:.0%} of GEMM floor", results.floor_share(shape, impl), None),
    ]
    memory_liger, floor_share = checks[1][1], checks[3][1]
    checks[1] = (checks[1][0], memory_liger, memory_liger is not None and memory_liger <= 1.0)
    checks[3] = (checks[3][0], floor_share, floor_share is not None and floor_share >= floor_target)
    if shape[0] >= 4096 and shape[1] <= 32000:
        saving = _ratio(results.get(shape, "naive", "memory_mb"), results.get(shape, impl, "memory_mb"))
        checks.append(("memory >= 25x below naive", saving, saving is not None and saving >= 25))
    if impl == "fused" and results.entries.get((shape, "fused-fp32")):
        gemm = _ratio(results.normalised(shape, "fused"), results.normalised(shape, "fused-fp32"))
        checks.append(("time vs fused-fp32 (normalised; < 1 = bf16 GEMMs pay)", gemm, gemm is not None and gemm < 1.0))
    if impl == "fused":
        eager = _ratio(results.normalised(shape, "fused"), results.normalised(shape, "fused-compiled"))
        checks.append(("eager <= 1.3x compiled (normalised)", eager, eager is not None and eager <= 1.3))
    return checks


def _targets(results: _Results, impl: str) -> list[str]:
    lines = ["| impl | shape | target | measured | verdict |", "|---|---|---|---|---|"]
    for shape in results.shapes:
        for name, ratio, met in _checks(results, shape, impl):
            verdict = "n/a" if ratio is None else ("met" if met else "NOT met")
            lines.append(f"| {impl} | N={shape[0]} V={shape[1]} | {name} | {_fmt(ratio, '{:.3f}')} | {verdict} |")
    for vocab in sorted({v for _, v in results.shapes}):
        rows = sorted(n for n, v in results.shapes if v == vocab)
        if len(rows) >= 2:
            largest, smallest = (rows[-1], vocab), (rows[0], vocab)
            growth = _ratio(results.get(largest, impl, "memory_mb"), results.get(smallest, impl, "memory_mb"))
            verdict = "n/a" if growth is None else ("met" if growth <= 1.05 else "NOT met")
            name = f"peak memory N={rows[0]} -> {rows[-1]} grows <= 5%"
            lines.append(f"| {impl} | V={vocab} | {name} | {_fmt(growth, '{:.3f}')} | {verdict} |")
    return lines


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", help="token counts N (default 1024 4096; GPU 4096 8192)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V (default 32000 128256)")
    parser.add_argument("--shapes", nargs="+", help="explicit NxV shapes instead of the rows x vocab grid, e.g. 1024x32000")
    parser.add_argument("--hidden", type=int, help="hidden size H of student and teacher (default 512; GPU 4096)")
    parser.add_argument("--chunk", type=int, default=256, help="token chunk of fused, liger and floor")
    parser.add_argument("--impls", nargs="+", default=None, choices=IMPLEMENTATIONS,
                        help="default: all on CPU (fused-fp32 only for --dtype bfloat16/float16); on GPU all but fused-compiled")
    parser.add_argument("--objective", default="jsd")
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight (Liger's weight_hard_loss)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per implementation")
    parser.add_argument("--quick", action="store_true", help="one small shape: N=512, H=256, V=8192, 3 repeats")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in every worker (default: torch's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of hidden states and head weights (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_grid(args) -> tuple[list, dict, bool]:
    import torch

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rows = args.rows or ([512] if args.quick else [8192] if gpu else [1024, 4096])
    vocabs = args.vocab or ([8192] if args.quick else [32000, 128256])
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    # fused-fp32 is the fused path itself for fp32 inputs: run by default only where it differs.
    cpu_default = [impl for impl in IMPLEMENTATIONS if impl != "fused-fp32" or dtype != "float32"]
    impls = args.impls or (GPU_IMPLEMENTATIONS if gpu else cpu_default)
    hidden = args.hidden or (256 if args.quick else 4096 if gpu else 512)
    repeats = 3 if args.quick and args.repeats == 5 else args.repeats
    shapes = [(n, v) for v in vocabs for n in rows]
    if args.shapes:
        shapes = [tuple(int(part) for part in shape.lower().split("x")) for shape in args.shapes]
    results = {}
    for shape in shapes:
        for impl in impls:
            config = {
                "impl": impl, "rows": shape[0], "vocab": shape[1], "hidden": hidden, "chunk": args.chunk,
                "objective": args.objective, "alpha": args.alpha, "beta": args.beta, "repeats": repeats,
                "device": "cuda" if gpu else "cpu", "dtype": dtype,
                "threads": args.threads,
            }
            reason = _skip_reason(impl, config)
            if reason:
                entry = {"skipped": f"skipped: {reason}"}
            else:
                entry = run_in_subprocess(Path(__file__), config, args.timeout)
            entry["config"] = config
            results[(shape, impl)] = entry
            summary = entry.get("skipped") or entry.get("error") or (
                f"{entry['seconds']:.3f} s (floor in process {entry['floor_seconds']:.3f} s), "
                f"{entry['memory_mb']:.0f} MB, loss {entry['loss']:.5f}, warm-up {entry['warmup_seconds']:.1f} s"
            )
            print(f"N={shape[0]:5d} V={shape[1]:6d} H={hidden} {impl:15s} {summary}", flush=True)
    return shapes, results, gpu


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    print("\n".join(machine_summary()), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads", flush=True)
    started = time.time()
    shapes, entries, gpu = _run_grid(args)
    results = _Results(shapes, entries)
    threads = sorted({e["threads"] for e in entries.values() if "threads" in e})
    print(f"\nworker intra-op threads: {threads}")
    print(f"\nwall time {time.time() - started:.0f} s; {machine_summary()[-1]}\n")
    print("time: median s per forward+backward step; norm: time / floor step timed in the same process;")
    print("time ratios: raw / normalised; memory: peak extra resident MB of one step\n")
    print("\n".join(_table(results, gpu)))
    for impl in ("fused", "fused-compiled"):
        if any(key[1] == impl for key in entries):
            print("\n" + "\n".join(_targets(results, impl)))


if __name__ == "__main__":
    main()
