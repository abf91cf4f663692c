"""End-to-end off-policy KD: alambic's loop vs TRL's GKDTrainer (lambda = 0), same everything.

Same Llama-style teacher (4 layers, hidden 256) and student (2 layers, hidden
128), a 32000-token vocabulary, the same chat data (stdlib source as assistant
answers), batch 8, every sequence exactly --seq-len tokens, forward KL at T = 1,
CPU. Each trainer runs in its own process; the table shows the median step time,
tokens/s and peak resident memory, and the ratios alambic / TRL from this run.

    python benchmarks/e2e.py            # ~5 min on 2 cores
    python benchmarks/e2e.py --steps 6 --seq-len 128   # quicker
    python benchmarks/e2e.py --threads 2 --steps 10 --seq-len 256   # the recorded setting

trl is a benchmark-only dependency (`pip install trl`, extra `bench`); without it the TRL row is skipped.
Thread settings are the same for both trainers: each child process gets
OMP_NUM_THREADS / MKL_NUM_THREADS = --threads (default: the number of cores) and
calls torch.set_num_threads(--threads) before anything runs; the threads each
child really ran with are printed. alambic's CPU loss serves large temporaries
from the heap (alambic.losses.fused_threads.tune_cpu_allocator); --same-allocator
applies that same glibc setting to the TRL child too, --no-allocator-tuning to neither.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32000


def build_assets(folder: Path, seq_len: int, rows: int) -> None:
    """A 32000-token BPE trained on the stdlib, random teacher/student, chat JSONL of stdlib code.

    Each answer is cut so that the rendered chat is just under seq_len tokens:
    neither trainer truncates, so both see exactly the same tokens.
    """
    from alambic.data.stdlib_corpus import build_tokenizer, stdlib_files
    from alambic.testing import tiny_llama

    texts = [p.read_text(errors="replace") for p in stdlib_files(min_bytes=500, max_bytes=400_000)]
    tokenizer = build_tokenizer(texts, vocab_size=VOCAB)
    assert len(tokenizer) == VOCAB, len(tokenizer)
    for name, hidden, layers in (("teacher", 256, 4), ("student", 128, 2)):
        model = tiny_llama(VOCAB, hidden=hidden, layers=layers, heads=4, seed=layers)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    prompt = [{"role": "user", "content": "Write Python."}]
    overhead = len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": ""}], tokenize=True))
    budget = seq_len - overhead - 4
    records = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - budget, budget):
            answer = tokenizer.decode(ids[start : start + budget])
            records.append({"messages": prompt + [{"role": "assistant", "content": answer}]})
            if len(records) >= rows:
                break
        if len(records) >= rows:
            break
    with open(folder / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


def run_alambic(folder: Path, steps: int, seq_len: int, batch: int) -> dict:
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    config = DistillConfig.model_validate({
        "teacher": {"model": str(folder / "teacher")},
        "student": {"model": str(folder / "student")},
        "data": {"train": str(folder / "train.jsonl"), "format": "messages", "max_length": seq_len},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.0, "fused": True, "chunk_size": 1024},
        "train": {"output_dir": str(folder / "alambic_run"), "max_steps": steps, "batch_size": batch, "lr": 1e-4,
                  "progress": False, "cpu": True, "max_grad_norm": 1.0, "scheduler": "constant"},
    })
    import alambic.training.loop as loop

    stamps = []
    original = loop._step_record

    def record(*args, **kwargs):
        stamps.append(time.perf_counter())
        return original(*args, **kwargs)

    loop._step_record = record
    run_distillation(config, overwrite=True)
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])]}


def run_trl(folder: Path, steps: int, seq_len: int, batch: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    data = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    args = GKDConfig(
        output_dir=str(folder / "trl_run"), per_device_train_batch_size=batch, max_steps=steps, lmbda=0.0, beta=0.0,
        temperature=1.0, max_length=seq_len, learning_rate=1e-4, logging_steps=1000, report_to=[], use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, lr_scheduler_type="constant", seq_kd=False, max_grad_norm=1.0,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(folder / "teacher"),
        args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Stamp()],
    )
    trainer.train()
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])]}


def child(which: str, folder: Path, steps: int, seq_len: int, batch: int, threads: int, tune: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    if tune:
        from alambic.losses.fused_threads import tune_cpu_allocator

        tune_cpu_allocator()
    runner = {"alambic": run_alambic, "trl": run_trl}[which]
    result = runner(folder, steps, seq_len, batch)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


def measure(which: str, folder: Path, args) -> dict | None:
    command = [sys.executable, __file__, "--child", which, "--folder", str(folder),
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               "--threads", str(args.threads)]
    tune = args.same_allocator if which == "trl" else not args.no_allocator_tuning
    command += ["--tune"] if tune else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "ALAMBIC_MALLOC_TUNING": "1" if tune else "0", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{which} failed:\n{done.stderr[-2000:]}")
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    warm = result["step_times"][1:] or result["step_times"]  # first measured step still warms caches
    result["median_step_s"] = statistics.median(warm)
    result["tokens_per_s"] = args.batch * args.seq_len / result["median_step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--folder", default="runs/bench_e2e")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of BOTH trainers")
    parser.add_argument("--same-allocator", action="store_true", help="tune glibc malloc in the TRL child as in alambic's")
    parser.add_argument("--no-allocator-tuning", action="store_true", help="leave glibc malloc alone in alambic too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder)
    if args.child:
        child(args.child, folder, args.steps, args.seq_len, args.batch, args.threads, args.tune)
        return
    folder.mkdir(parents=True, exist_ok=True)
    build_assets(folder, args.seq_len, rows=args.batch * (args.steps + 2))
    results = {name: measure(name, folder, args) for name in ("alambic", "trl")}
    print(f"\nN per step = {args.batch} x {args.seq_len} tokens, V = {VOCAB}, teacher 4x256, student 2x128, CPU, {args.steps} steps")
    print(f"load average (1/5/15 min) after the runs: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'trainer':10s} {'median step s':>14s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'threads':>8s}")
    for name, result in results.items():
        if result:
            print(f"{name:10s} {result['median_step_s']:14.3f} {result['tokens_per_s']:10.0f} {result['peak_rss_mb']:12.0f} "
                  f"{result['threads']:8d}")
    if results["alambic"] and results["trl"]:
        speed = results["alambic"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        memory = results["alambic"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
        print(f"alambic / TRL: tokens/s x{speed:.2f} (target >= 1.5), peak memory x{memory:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
