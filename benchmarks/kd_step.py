"""One off-policy KD step vs a supervised step plus a teacher forward, timed in one run.

The question (issue 11, section 5): how close is a KD step to its floor, the sum
of what it cannot avoid: training the student on the batch (forward, backward,
optimiser step: the supervised step) and running the teacher on it (its full
forward, head included)? Target: KD step <= 1.10 x (supervised + teacher forward).

Same models and data as benchmarks/e2e.py (Llama-style teacher 4 x 256, student
2 x 128, V = 32000, batch 8 x --seq-len tokens, forward KL, T = 1, alpha 0),
built through alambic's own setup (build_models, build_datasets) and stepped
with the loop's own loss (training.step_loss.loss_sums), AdamW and clipping.
The three kinds of step are interleaved (sup, teacher, kd, sup, ...) so that load
drift hits them alike; medians after --warmup rounds. --profile prints where a
KD step's time goes (torch.profiler, top ops).

    python benchmarks/kd_step.py                       # ~2 min on 2 cores
    python benchmarks/kd_step.py --threads 2 --rounds 10 --seq-len 256
    python benchmarks/kd_step.py --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _config(folder: Path, seq_len: int, batch: int, fused: bool):
    from alambic.config import DistillConfig

    return DistillConfig.model_validate({
        "teacher": {"model": str(folder / "teacher")},
        "student": {"model": str(folder / "student")},
        "data": {"train": str(folder / "train.jsonl"), "format": "messages", "max_length": seq_len},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.0, "fused": fused, "chunk_size": 1024},
        "train": {"output_dir": str(folder / "kd_step_run"), "max_steps": 1, "batch_size": batch, "lr": 1e-4,
                  "progress": False, "cpu": True, "max_grad_norm": 1.0, "scheduler": "constant"},
    })


class Steps:
    """The three timed operations on one batch, with the loop's own pieces."""

    def __init__(self, config):
        import torch

        from alambic.training.loop import _load_batch
        from alambic.training.step_loss import loss_sums
        from alambic.training.optim import build_optimizer
        from alambic.training.setup import build_models
        from alambic.data import build_datasets

        self.torch, self.loss_sums, self.config = torch, loss_sums, config
        setup = build_models(config, torch.device("cpu"))
        train, _ = build_datasets(config.data, setup.tokenizer, config.task, config.train.seed)
        self.student, self.teacher, self.teacher_model = setup.student, setup.teacher, setup.teacher_model
        self.optimizer = build_optimizer(self.student, config.train)
        rows = list(range(config.train.batch_size))
        self.batch = _load_batch(train, rows, setup.tokenizer.pad_token_id, torch.device("cpu"))
        self.tokens = int(self.batch["attention_mask"].sum())

    def _train(self, teacher) -> None:
        batch = dict(self.batch)
        sums = self.loss_sums(self.student, batch, teacher, self.config.loss, self.config.task)
        count = int((batch["labels"][:, 1:] != -100).sum())
        (sums["loss"] / max(count, 1)).backward()
        self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def supervised(self) -> None:
        self._train(None)

    def kd(self) -> None:
        self._train(self.teacher)

    def teacher_forward(self) -> None:
        with self.torch.no_grad():
            self.teacher_model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"]).logits


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(steps: Steps, rounds: int, warmup: int) -> dict:
    names = ("supervised", "teacher_forward", "kd")
    times = {name: [] for name in names}
    for index in range(warmup + rounds):
        for name in names:
            seconds = _time(getattr(steps, name))
            if index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()} | {"raw": times}


def profile(steps: Steps) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps.kd()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        steps.kd()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--plain", action="store_true", help="loss.fused=false (full logits) for comparison")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--folder", default="runs/bench_e2e")
    args = parser.parse_args(argv)
    import torch

    from _common import machine_summary
    from e2e import build_assets

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    if not (folder / "train.jsonl").exists() or not (folder / "teacher").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_assets(folder, args.seq_len, rows=args.batch * 12)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = Steps(_config(folder, args.seq_len, args.batch, fused=not args.plain))
    print("\n".join(machine_summary()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; batch {args.batch} x "
          f"{args.seq_len} ({steps.tokens} tokens), loss.fused={not args.plain}")
    if args.profile:
        profile(steps)
        return
    result = measure(steps, args.rounds, args.warmup)
    floor = result["supervised"] + result["teacher_forward"]
    print(f"\nmedian of {args.rounds} interleaved rounds (after {args.warmup} warm-up rounds), seconds:")
    print("| supervised step | teacher forward | sum | KD step | KD / sum | target |")
    print("|---|---|---|---|---|---|")
    ratio = result["kd"] / floor
    print(f"| {result['supervised']:.3f} | {result['teacher_forward']:.3f} | {floor:.3f} | {result['kd']:.3f} "
          f"| {ratio:.2f} | <= 1.10 {'met' if ratio <= 1.10 else 'NOT met'} |")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
