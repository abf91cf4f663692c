"""Small helpers shared by benchmarks: one subprocess per implementation, median
timings, and the peak resident memory of one step.

Peak memory on CPU: Linux's VmHWM (high-water mark of resident memory) is reset
through /proc/self/clear_refs right before the measured step, after freed heap
memory was handed back with malloc_trim, so the figure is the step's own peak
above what the process held before it (inputs, weights, compiled code). Where
the reset is not allowed, ru_maxrss minus the resident size before the step is
used instead (it then also counts warm-up and compilation).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_MB = 1024 * 1024


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_step_memory_mb(step: Callable[[], object]) -> tuple[float, str]:
    """Peak resident memory (MB) that running `step` once adds, and how it was measured."""
    release_free_memory()
    before_kib = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM reset"
    except OSError:
        method = "ru_maxrss"
    step()
    if method == "VmHWM reset":
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak_kib - before_kib, 0) / 1024, method


def median_seconds(step: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall-clock seconds of `repeats` calls (warm-up is the caller's business)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_in_subprocess(script: Path, config: dict, timeout: float) -> dict:
    """Run `script --worker JSON` and parse the JSON it prints on its last line."""
    command = [sys.executable, str(script), "--worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def available_memory_mb() -> float:
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("inf")


def machine_summary() -> list[str]:
    """First lines of lscpu (or /proc/cpuinfo's model), cores, load average, OMP settings."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10]
    except (OSError, subprocess.TimeoutExpired):
        lscpu = []
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    omp = os.environ.get("OMP_WAIT_POLICY", "unset")
    return [*lscpu, f"os.cpu_count: {os.cpu_count()}, load average (1/5/15 min): {load}, OMP_WAIT_POLICY: {omp}"]
