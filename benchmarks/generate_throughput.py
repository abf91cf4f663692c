"""Throughput of `alambic generate` against a loopback server that answers after a fixed delay.

With d seconds per answer and k requests in flight, the server bounds the rate
at k/d requests/s; whatever is missing is the client's cost (openai client,
cache fsync, bookkeeping). The server runs in its own process. A bare client
(raw httpx, no parsing, no cache) is measured too: it is the floor this
machine allows, so a loaded machine is not mistaken for a slow client.

    .venv/bin/python benchmarks/generate_throughput.py --delay 0.2 --in-flight 1 8 64
    .venv/bin/python benchmarks/generate_throughput.py --delay 0.2 --in-flight 64 --progress   # with the bar
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alambic.generate.config import GenerateConfig
from alambic.generate.pipeline import GenerateRun


def start_server(delay: float) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "alambic.generate.testing.scripted_server", "--delay", str(delay), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("listening"):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process, int(line.split()[1])


def measure(port: int, in_flight: int, requests: int, workdir: Path, progress: bool) -> dict:
    inputs = workdir / f"prompts-{in_flight}.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"benchmark prompt {i}"}) + "\n" for i in range(requests)))
    config = GenerateConfig.model_validate({
        "teacher": {"model": "scripted", "base_url": f"http://127.0.0.1:{port}/v1", "max_in_flight": in_flight,
                    "timeout_s": 30},
        "sampling": {"max_tokens": 16},
        "input": {"path": str(inputs)},
        "filters": {"dedupe": False},
        "output": {"dir": str(workdir / f"run-{in_flight}")},
        "progress": progress,
    })
    started = time.perf_counter()
    summary = GenerateRun(config).execute()
    total = time.perf_counter() - started
    stats = summary["requests"]
    if stats["answered"] != requests:
        raise RuntimeError(f"only {stats['answered']} of {requests} answered: {stats}")
    return {"in_flight": in_flight, "requests": requests, "request_phase_s": stats["seconds"], "end_to_end_s": total}


def measure_bare(port: int, in_flight: int, requests: int) -> float:
    """Requests/s of the plainest client: k tasks posting in a loop, the body read and dropped."""
    import asyncio

    import httpx2

    async def run() -> float:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "scripted", "messages": [{"role": "user", "content": "bare"}], "max_tokens": 16}
        remaining = [requests]
        limits = httpx2.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
            async def worker() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    (await client.post(url, json=body)).raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return requests / (time.perf_counter() - started)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="server seconds per answer")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=10, help="requests per slot: requests = in_flight x rounds")
    parser.add_argument("--progress", action="store_true", help="show the progress bar while measuring")
    args = parser.parse_args()
    server, port = start_server(args.delay)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="alambic-bench-") as folder:
            measure(port, 4, 8, Path(folder), False)  # warm-up: imports, first connections
            for in_flight in args.in_flight:
                result = measure(port, in_flight, in_flight * args.rounds, Path(folder), args.progress)
                bound = in_flight / args.delay
                rate = result["requests"] / result["request_phase_s"]
                bare = measure_bare(port, in_flight, in_flight * args.rounds)
                rows.append({**result, "server_bound_rps": round(bound, 2), "measured_rps": round(rate, 2),
                             "client_overhead_pct": round((bound / rate - 1) * 100, 2), "bare_rps": round(bare, 2)})
    finally:
        server.kill()
        server.wait()
    print(f"delay {args.delay} s per answer, {args.rounds} requests per slot")
    print("| in flight | requests | server-bound req/s | alambic req/s | overhead vs bound | bare httpx req/s |"
          " end-to-end s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['in_flight']} | {row['requests']} | {row['server_bound_rps']:.1f} | {row['measured_rps']:.1f} "
              f"| {row['client_overhead_pct']:.1f}% | {row['bare_rps']:.1f} | {row['end_to_end_s']:.2f} |")


if __name__ == "__main__":
    main()
