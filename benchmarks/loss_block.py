"""CPU cost of the fused loss's per-block math, per logit, with and without the allocator tuning.

Times `alambic.losses.fused_kernels.block_loss_and_grad` on one eager block
(fused_threads.EAGER_BLOCK_ELEMENTS logits) in ONE thread, as thread CPU time
(time.thread_time, min over --rounds): CPU time is what a loaded machine distorts
least, so this is the figure to develop with when the wall clock is unreliable.
Each objective runs in two subprocesses, ALAMBIC_MALLOC_TUNING=0 (glibc defaults:
blocks' 1 MiB temporaries come from mmap and are page-faulted back every time)
and =1 (alambic.losses.fused_threads.tune_cpu_allocator), and the ratio is printed.

    python benchmarks/loss_block.py
    python benchmarks/loss_block.py --vocab 128256 --objectives jsd forward_kl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(vocab: int, objective: str, rounds: int, alpha: float, beta: float) -> dict:
    import torch

    from alambic.losses import fused_threads
    from alambic.losses.fused_kernels import LossSpec, block_loss_and_grad

    torch.set_num_threads(1)
    fused_threads.tune_cpu_allocator()  # a no-op under ALAMBIC_MALLOC_TUNING=0
    rows = max(1, fused_threads.EAGER_BLOCK_ELEMENTS // vocab)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=generator) * 2
    teacher = torch.randn(rows, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    spec = LossSpec(objective=objective, temperature=1.0, beta=beta, skew_alpha=0.1, top_k=None,
                    kd_weight=1.0 - alpha, ce_weight=alpha, labels_may_be_ignored=False)
    block = student.clone()
    times = []
    for _ in range(rounds):
        block.copy_(student)
        start = time.thread_time()
        block_loss_and_grad(block, teacher, labels, spec, out=block)
        times.append(time.thread_time() - start)
    return {"ns_per_logit": min(times) / (rows * vocab) * 1e9, "tuned": fused_threads.tune_cpu_allocator()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--objectives", nargs="+", default=["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.vocab, args.worker, args.rounds, args.alpha, args.beta)))
        return
    print(f"V = {args.vocab}, CE weight {args.alpha}, beta {args.beta}, 1 thread, thread CPU time, min of {args.rounds}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| objective | ns/logit, glibc defaults | ns/logit, tuned | tuned / defaults |\n|---|---|---|---|")
    for objective in args.objectives:
        figures = []
        for tuning in ("0", "1"):
            command = [sys.executable, __file__, "--worker", objective, "--vocab", str(args.vocab),
                       "--rounds", str(args.rounds), "--alpha", str(args.alpha), "--beta", str(args.beta)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "ALAMBIC_MALLOC_TUNING": tuning})
            figures.append(json.loads(done.stdout.strip().splitlines()[-1])["ns_per_logit"])
        print(f"| {objective} | {figures[0]:.2f} | {figures[1]:.2f} | {figures[1] / figures[0]:.2f} |")


if __name__ == "__main__":
    main()
