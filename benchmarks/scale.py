"""Per-process memory and tokens/s of one KD config: 1 process, 2-process DDP, 2-process FSDP.

Also prints `alambic plan`'s predicted peak next to each measured one.

    python benchmarks/scale.py                      # CPU: 1 process, 2 x DDP, 2 x FSDP (gloo), size small
    python benchmarks/scale.py --size tiny --steps 4
    python benchmarks/scale.py --device cuda        # one GPU: 1 process plain vs FSDP (1-process group)

Every process uses the same per-process batch, so activations are equal and
the differences are the student's parameters/gradients/AdamW state and the
teacher's weights. Memory: peak of the training steps above what the process
held before building the models (CPU: resident memory high-water mark after a
warm-up; GPU: torch.cuda.max_memory_allocated). Threads: OMP_NUM_THREADS=1 per
process on CPU (2 processes on 2 cores).

On CPU every mode runs twice. The speed pass runs as users run it: alambic
lets glibc keep freed memory for reuse (losses/fused_threads.py), which makes
steps faster but leaves freed blocks in the resident size. The memory pass
turns that off (ALAMBIC_MALLOC_TUNING=0, MALLOC_MMAP_THRESHOLD_=128 KiB, so
freed blocks go back to the system) and measures what the tensors really
need; that peak is what `alambic plan` predicts. The speed pass's resident
peak is printed too ("RSS cached"), as the extra a CPU user sees.

FSDP's all-gathers and reduce-scatters move the same bytes per step whatever
the batch, while compute grows with the tokens per step, so the FSDP/DDP
tokens/s ratio depends on the batch: `--batch-size` / `--seq-len` override
the size's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_scale_worker.py"
MB = 1024**2
# (teacher hidden, teacher layers, student hidden, student layers, batch per process, length)
SIZES = {
    "tiny": (128, 2, 64, 2, 4, 64),
    "small": (512, 4, 384, 4, 8, 256),
    "gpu": (2048, 8, 1024, 8, 8, 512),
}


def build_models(folder: Path, size: str) -> dict:
    from alambic.testing import save_model_with_tokenizer, tiny_llama, write_stdlib_corpus

    paths = write_stdlib_corpus(folder / "data")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    t_hidden, t_layers, s_hidden, s_layers, _, _ = SIZES[size]
    heads = max(2, t_hidden // 64)
    teacher = save_model_with_tokenizer(
        tiny_llama(vocab, hidden=t_hidden, layers=t_layers, heads=heads), paths["tokenizer"], folder / f"teacher-{size}")
    student = save_model_with_tokenizer(
        tiny_llama(vocab, hidden=s_hidden, layers=s_layers, heads=max(2, s_hidden // 64), seed=1), paths["tokenizer"],
        folder / f"student-{size}")
    return {**paths, "teacher": teacher, "student": student}


def config(paths: dict, out: Path, size: str, steps: int, strategy: str, device: str, batch: int, length: int) -> dict:
    return {
        "teacher": {"model": str(paths["teacher"])},
        "student": {"model": str(paths["student"])},
        "data": {"train": str(paths["train"]), "max_length": length, "packing": True},
        "loss": {"objective": "forward_kl", "alpha": 0.5},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "lr": 1e-3, "progress": False,
                  "cpu": device == "cpu", "strategy": strategy, "eval_every": 0, "log_every": 1},
    }


LIVE_MEMORY_ENV = {"ALAMBIC_MALLOC_TUNING": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}


def run(name: str, mapping: dict, processes: int, folder: Path, extra_env: dict | None = None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(mapping))
    src_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src_path, **(extra_env or {})}
    if mapping["train"]["cpu"]:
        env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    started = time.perf_counter()
    result = subprocess.run([*launcher, str(WORKER), str(config_path), str(folder)], env=env, cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(processes)]


def predicted_peak(mapping: dict, processes: int) -> int:
    from alambic.config import DistillConfig
    from alambic.plan.cli import plan

    config = DistillConfig.model_validate(mapping)
    placement = "sharded" if config.train.strategy == "fsdp" else "co-located"
    result = plan(config, processes, None, 64, with_cache_size=False)
    chosen = next(e for e in result["estimates"] if e["strategy"] == config.train.strategy and e["teacher"] == placement)
    if not config.train.cpu:  # torch.cuda.max_memory_allocated sees tensors only: leave out the CUDA-context allowance
        return chosen["peak"] - chosen["parts"].get("runtime (not tensors)", 0)
    return chosen["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per process (default: the size's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the size's)")
    parser.add_argument("--out", default="runs/bench_scale")
    args = parser.parse_args()
    size = args.size or ("gpu" if args.device == "cuda" else "small")
    args.batch_size = args.batch_size or SIZES[size][4]
    args.seq_len = args.seq_len or SIZES[size][5]
    out = Path(args.out)
    sys.path.insert(0, str(REPO / "src"))
    paths = build_models(out / "setup", size)
    if args.device == "cuda":
        modes = [("1 process", "ddp", 1), ("1 process FSDP", "fsdp", 1)]
    else:
        modes = [("1 process", "ddp", 1), ("2 x DDP", "ddp", 2), ("2 x FSDP", "fsdp", 2)]
    rows = {}
    for name, strategy, processes in modes:
        slug = name.replace(" ", "_")
        mapping = config(paths, out / slug, size, args.steps, strategy, args.device, args.batch_size, args.seq_len)
        reports = run(name, mapping, processes, out / f"report-{slug}")
        row = {"reports": reports, "predicted": predicted_peak(mapping, processes), "live": reports}
        if args.device == "cpu":
            row["live"] = run(f"{name} (memory pass)", mapping, processes, out / f"report-{slug}-memory", LIVE_MEMORY_ENV)
        rows[name] = row
    print_table(rows, size, args)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU found: ran on CPU"


def print_table(rows: dict, size: str, args) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nscale.py --size {size} --steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} "
          f"--device {args.device} (load average {load:.1f}, {os.cpu_count()} cores"
          + ("; 1 thread per process)" if args.device == "cpu" else f"; {_gpu_name()})"))
    header = ("mode", "peak MB/proc", "RSS cached MB", "plan MB", "plan/meas", "student p+g+o MB", "teacher MB",
              "tokens/s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    base = rows[next(iter(rows))]["reports"][0]
    resident = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]  # noqa: E731
    for name, row in rows.items():
        peak = max(r["peak_bytes"] for r in row["live"])
        cached = max(r["peak_bytes"] for r in row["reports"])
        report = row["reports"][0]
        print(f"| {name} | {peak / MB:.1f} | {cached / MB:.1f} | {row['predicted'] / MB:.1f} | "
              f"{row['predicted'] / peak:.2f} | "
              f"{resident(report) / MB:.1f} | {report['teacher_param_bytes'] / MB:.1f} | {report['tokens_per_s']:.0f} |")
    if "2 x FSDP" in rows:
        fsdp, ddp = rows["2 x FSDP"]["reports"][0], rows["2 x DDP"]["reports"][0]
        print(f"\nFSDP / 1 process: student p+g+o x{resident(fsdp) / resident(base):.2f}, "
              f"teacher parameters x{fsdp['teacher_param_bytes'] / base['teacher_param_bytes']:.2f}; "
              f"tokens/s FSDP / DDP x{fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
