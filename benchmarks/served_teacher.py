"""Training-loop speed with a served teacher vs a cached and a live one, and how long the loop waits on the server.

One student, data, batch and seed; the teacher signal changes:
- live: the teacher model runs in the loop (dense logits, fused loss);
- cached: a top-k logit cache written beforehand (`alambic cache-logits`);
- served (tiny real teacher): the same teacher behind the loopback prompt-logprob server, in its own process;
- served, fixed delay D: a server that answers each request after exactly D seconds from a bigram table
  (no model cost), for D = 0, 0.2 and 1 s, with the default prefetch (4 micro-batches ahead, 4 in flight),
  none (prefetch 0, 1 in flight) and deep (prefetch = in flight = 32).

Reported: the loop's tokens/s after warm-up (harmonic mean of the step rates, and its ratio to the cached
run measured in the same invocation), the share of the loop's time spent waiting for the server
(after warm-up; served_teacher.json has the whole run's), and for the delay servers the rate they bound the loop to (in flight / D requests
per second, one micro-batch each). The student (2 layers, width 128 by default) sets the loop's speed.

    python benchmarks/served_teacher.py                  # ~4 min on 2 loaded cores
    python benchmarks/served_teacher.py --steps 20 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- served_teacher:start -->", "<!-- served_teacher:end -->"
TOP_K = 20
TOKENS_PER_REQUEST = 8 * 128  # one micro-batch: batch 8 rows of up to max_length 128 tokens (most are full)
PRESETS = {"none": (0, 1), "default": (4, 4), "deep": (32, 32)}  # (prefetch, max_in_flight)


def build(folder: Path, student_hidden: int) -> dict:
    from transformers import AutoTokenizer

    from alambic.testing import save_model_with_tokenizer, tiny_llama, write_stdlib_corpus

    paths = write_stdlib_corpus(folder / "data", n_train=6, n_heldout=1)
    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    teacher = save_model_with_tokenizer(tiny_llama(vocab, hidden=64, layers=2), paths["tokenizer"], folder / "teacher")
    student = save_model_with_tokenizer(tiny_llama(vocab, hidden=student_hidden, layers=2, seed=1),
                                        paths["tokenizer"], folder / "student")
    return {"train": paths["train"], "teacher": teacher, "student": student}


def config(paths: dict, out: Path, teacher: dict, steps: int) -> dict:
    return {
        "teacher": teacher, "student": {"model": str(paths["student"])},
        "data": {"train": str(paths["train"]), "max_length": 128},
        "loss": {"objective": "forward_kl", "alpha": 0.0},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 8, "lr": 3e-3, "progress": False,
                  "cpu": True, "eval_every": 0, "scheduler": "constant"},
    }


def start_server(model: Path, delay: float, table: bool) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "alambic.teachers.testing.logprob_server", str(model), "--name", "teacher",
               "--delay", str(delay), "--max-logprobs", str(TOP_K)] + (["--table"] if table else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()
    if not line.startswith("listening"):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process, f"http://127.0.0.1:{int(line.split()[1])}/v1"


CALLS: list[tuple[float, float, float]] = []  # (call start, seconds waited, return) of every served-teacher call


def record_calls() -> None:
    """Time each call of the served source (benchmark instrumentation: steady state, after the pipeline fills)."""
    from alambic.teachers.served import ServedTeacher

    original = ServedTeacher.__call__

    def timed(self, batch, request):
        before, started = self.wait_s, time.perf_counter()
        signal = original(self, batch, request)
        CALLS.append((started, self.wait_s - before, time.perf_counter()))
        return signal

    ServedTeacher.__call__ = timed


def measure(mapping: dict, warmup: int) -> dict:
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    CALLS.clear()
    started = time.perf_counter()
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    wall = time.perf_counter() - started
    # Steps after warm-up; rows are ~equal length, so the loop's rate is the harmonic mean of the step rates
    # (bursty waits make a median of steps misleading).
    rates = [r["tokens_per_s"] for r in result.history[warmup:]]
    stats_file = result.output_dir / "served_teacher.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    steady = CALLS[warmup:]  # one call per step (grad_accum 1)
    wait = sum(w for _, w, _ in steady) / (steady[-1][2] - steady[0][0]) if steady else None
    return {"tokens_per_s": statistics.harmonic_mean(rates), "wall_s": wall, "wait_fraction": wait,
            "wait_fraction_all_steps": stats.get("wait_fraction"), "requests": stats.get("requests"),
            "errors": stats.get("errors_by_kind")}


def served(url: str, prefetch: int, in_flight: int) -> dict:
    return {"server": url, "server_model": "teacher", "top_k": TOP_K,
            "served": {"prefetch": prefetch, "max_in_flight": in_flight}}


def run_all(work: Path, steps: int, delays: list[float], student_hidden: int, warmup: int) -> list[dict]:
    from alambic.cache.cli import cache_logits

    record_calls()
    measure_ = lambda mapping: measure(mapping, warmup)  # noqa: E731

    paths = build(work / "setup", student_hidden)
    rows = []
    rows.append({"mode": "live", **measure_(config(paths, work / "live", {"model": str(paths["teacher"])}, steps))})
    live_yaml = work / "live.yaml"
    live_yaml.write_text(json.dumps(config(paths, work / "unused", {"model": str(paths["teacher"])}, steps)))
    cache_logits(str(live_yaml), [], TOP_K, str(work / "cache"), 256, 8, "auto", 250, False, True, "cpu", False)
    rows.append({"mode": "cached", **measure_(config(paths, work / "cached", {"cache": str(work / "cache")}, steps))})
    process, url = start_server(paths["teacher"], 0.0, table=False)
    try:
        rows.append({"mode": "served, tiny real teacher", "preset": "default",
                     **measure_(config(paths, work / "served_real", served(url, *PRESETS["default"]), steps))})
    finally:
        process.kill()
    for delay in delays:
        process, url = start_server(paths["teacher"], delay, table=True)
        try:
            for preset, (prefetch, in_flight) in PRESETS.items():
                if delay >= 1.0 and preset == "none":
                    continue  # one request per step at 1 s each: nothing to learn but patience
                mapping = config(paths, work / f"served_{delay}_{preset}", served(url, prefetch, in_flight), steps)
                rows.append({"mode": f"served, D = {delay:g} s", "preset": preset, "delay": delay, **measure_(mapping)})
        finally:
            process.kill()
    return rows


def table(rows: list[dict]) -> str:
    cached = next(r["tokens_per_s"] for r in rows if r["mode"] == "cached")
    lines = ["| teacher signal | prefetch / in flight | server-bound tokens/s | loop tokens/s | vs cached "
             "| waiting on the server |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        preset = row.get("preset")
        knobs = "-" if preset is None else f"{preset} ({PRESETS[preset][0]} / {PRESETS[preset][1]})"
        wait = "-" if row["wait_fraction"] is None else f"{100 * row['wait_fraction']:.1f}%"
        bound = "-" if not row.get("delay") else f"{PRESETS[preset][1] / row['delay'] * TOKENS_PER_REQUEST:,.0f}"
        lines.append(f"| {row['mode']} | {knobs} | {bound} | {row['tokens_per_s']:,.0f} | "
                     f"{row['tokens_per_s'] / cached:.2f} | {wait} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{START}\n{text}\n{END}"
    if START in current:
        before, rest = current.split(START, 1)
        current = before + block + rest.split(END, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8, help="first steps left out (the pipeline fills)")
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.2, 1.0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--student-hidden", type=int, default=128, help="2-layer student width (sets the loop's speed)")
    parser.add_argument("--write", action="store_true", help="update the served_teacher section of RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        rows = run_all(Path(args.workdir or scratch), args.steps, args.delays, args.student_hidden, args.warmup)
    text = table(rows)
    print(text)
    print(json.dumps(rows, indent=1))
    if args.write:
        header = (f"## served_teacher\n\nCommand: `python benchmarks/served_teacher.py --steps {args.steps} "
                  f"--warmup {args.warmup} --write`  \n"
                  f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                  f"{torch.__version__}, torch threads {torch.get_num_threads()}, load average {load:.1f} at start "
                  f"(shared machine: lower bounds)  \n")
        write_results(header + "\n" + text)


if __name__ == "__main__":
    main()
