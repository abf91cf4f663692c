"""Distillation modes at equal wall time on the tiny LM setup (teacher trained on stdlib source).

Every method trains the same 1-layer student from the same init with the same
data, batch, learning rate (constant) and seed, for the same wall-clock budget
(sampling time included: that is the cost of on-policy methods). Then, on the
held-out modules:
- KL(teacher || student) per token and the student's bits per byte (teacher-forced);
- exposure bias: the student samples 48 tokens after the first 32 of each
  held-out record, and the teacher's log-likelihood per token of those samples
  is reported, with the Monte-Carlo sequence-level reverse KL(student || teacher) per token.

    python benchmarks/modes.py                  # 75 s per method, ~10 min on 2 cores
    python benchmarks/modes.py --quick          # 15 s per method
    python benchmarks/modes.py --write          # also update the modes section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- modes:start -->", "<!-- modes:end -->"

METHODS = {
    "ce_only": ({"objective": "forward_kl", "alpha": 1.0}, None),
    "off_policy_kd": ({"objective": "forward_kl", "alpha": 0.0}, None),
    "token_reverse_kl": ({"objective": "reverse_kl", "alpha": 0.0}, None),
    "gkd_lambda_0.5": ({"objective": "jsd", "beta": 0.5, "alpha": 0.0}, {"policy": "on_policy", "lambda": 0.5}),
    "seqkd_teacher_samples": ({"objective": "forward_kl", "alpha": 1.0}, {"policy": "sequence_level"}),
    "minillm": ({"objective": "reverse_kl", "alpha": 0.0}, {"policy": "minillm", "teacher_mix": 0.2}),
}


class TimeUp(Exception):
    """Raised from an after-step hook at the deadline; carries the student as trained so far."""

    def __init__(self, student, steps: int, seconds: float):
        super().__init__(f"budget reached after {steps} steps")
        self.student, self.steps, self.seconds = student, steps, seconds


def install_deadline(budget_s: float) -> None:
    """The loop has no wall-time budget: wrap mode configuration to add a clock and a deadline hook.

    The clock starts when the first batch is rolled out, so model loading is not
    counted and sampling (on-policy, teacher samples) is.
    """
    import alambic.training.setup as setup_module

    original = setup_module.configure_modes

    def configure_with_deadline(setup, config):
        original(setup, config)
        clock = {}
        rollout = setup.rollout

        def timed_rollout(batch, step):
            clock.setdefault("start", time.perf_counter())
            return rollout(batch, step)

        def deadline(student, step):
            elapsed = time.perf_counter() - clock["start"]
            if elapsed >= budget_s:
                raise TimeUp(student, step, elapsed)

        setup.rollout = timed_rollout
        setup.after_step.append(deadline)

    setup_module.configure_modes = configure_with_deadline


def run_config(paths: dict, name: str, workdir: Path, max_new_tokens: int) -> dict:
    loss, rollout = METHODS[name]
    mapping = {
        "student": {"model": str(paths["student_init"])},
        "data": {"train": str(paths["train"]), "max_length": 128},
        "loss": {"temperature": 1.0, **loss},
        "train": {"output_dir": str(workdir / "runs" / name), "max_steps": 1_000_000, "batch_size": 16, "lr": 3e-3,
                  "scheduler": "constant", "seed": 0, "progress": False, "cpu": True},
    }
    if loss["alpha"] < 1.0 or rollout is not None:
        mapping["teacher"] = {"model": str(paths["teacher"])}
    if rollout is not None:
        mapping["rollout"] = {"max_new_tokens": max_new_tokens, **rollout}
    return mapping


def train(paths: dict, name: str, workdir: Path, max_new_tokens: int):
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    try:
        run_distillation(DistillConfig.model_validate(run_config(paths, name, workdir, max_new_tokens)), overwrite=True)
    except TimeUp as done:
        return done
    raise RuntimeError(f"{name} finished its steps before the time budget")


def held_out_metrics(model, teacher, tokenizer, texts: list[str], prompts: list[list[int]], seed: int) -> dict:
    from alambic.evaluate.metrics import bits_per_byte
    from alambic.evaluate.predict import causal_lm_scores, lm_windows
    from alambic.training.modes.minillm import estimate_sequence_reverse_kl

    model.eval()
    totals = causal_lm_scores(model, lm_windows(tokenizer, texts, 128), teacher, batch_size=16, show_progress=False)
    generation = estimate_sequence_reverse_kl(
        model, teacher, prompts, max_new_tokens=48, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
        seed=seed, vocab_size=len(tokenizer),
    )
    return {
        "kl": totals["kl"] / totals["tokens"],
        "bits_per_byte": bits_per_byte(totals["nll"], totals["bytes"]),
        "teacher_logprob_of_samples": generation["teacher_logprob_per_token"],
        "sample_reverse_kl": generation["reverse_kl_per_token"],
    }


def machine() -> str:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), load average {load:.1f} at start"


def table(report: dict) -> list[str]:
    lines = [
        "| method | steps in budget | held-out KL(teacher ‖ student) | bits/byte | teacher log-lik/token of student samples | sample reverse KL/token |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        steps = "-" if row.get("steps") is None else f"{row['steps']} ({row['seconds']:.0f} s)"
        lines.append(f"| {name} | {steps} | {row['kl']:.4f} | {row['bits_per_byte']:.4f} | "
                     f"{row['teacher_logprob_of_samples']:.3f} | {row['sample_reverse_kl']:.4f} |")
    return lines


def markdown(report: dict) -> str:
    lines = [START, "## modes", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Budget: {report['budget_s']:.0f} s of training per method (sampling included), batch 16, lr 3e-3 constant, "
             f"rollouts of {report['max_new_tokens']} new tokens after the first half of each 128-token row.", ""]
    lines += table(report)
    lines += ["", "Rows `teacher` and `student_init` are references (no training). Higher teacher log-likelihood of the "
              "student's own samples = less exposure bias, but low-entropy (repetitive) samples also score high, so read it "
              "with the sample reverse KL (Monte-Carlo KL(student ‖ teacher) per token on those samples; lower is better). "
              "The cores are shared with other jobs, so the number of steps each method fits in its budget varies from run "
              "to run; the comparison is at equal wall time, not equal steps.", END]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    from alambic.durable import atomic_write_text

    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if START in current and END in current:
        updated = current[: current.index(START)] + text.rstrip("\n") + current[current.index(END) + len(END) :]
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    atomic_write_text(RESULTS, updated)


def prepare(workdir: Path) -> dict:
    from alambic.testing import build_tiny_setup

    setup = workdir / "tiny"
    paths = {"train": setup / "data" / "train.jsonl", "eval": setup / "data" / "eval.jsonl",
             "tokenizer": setup / "data" / "tokenizer", "teacher": setup / "teacher_run" / "final",
             "student_init": setup / "student_init"}
    if not all(p.exists() for p in paths.values()):
        paths = build_tiny_setup(setup, teacher_steps=150)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_modes"))
    parser.add_argument("--budget", type=float, default=None, help="training seconds per method (default 75, --quick 15)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="replace the modes section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    budget = args.budget or (15.0 if args.quick else 75.0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alambic.data.files import read_records

    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    report = {"command": f"{threads}python " + " ".join(sys.argv), "machine": machine(), "budget_s": budget,
              "max_new_tokens": args.max_new_tokens, "rows": {}}
    paths = prepare(args.workdir)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    texts = [r["text"] for r in read_records(paths["eval"])]
    prompts = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"][:32]] for t in texts]
    reference = {"teacher": teacher, "student_init": AutoModelForCausalLM.from_pretrained(paths["student_init"])}
    for name, model in reference.items():
        report["rows"][name] = held_out_metrics(model, teacher, tokenizer, texts, prompts, seed=1)
    install_deadline(budget)
    for name in args.methods:
        done = train(paths, name, args.workdir, args.max_new_tokens)
        row = held_out_metrics(done.student.model, teacher, tokenizer, texts, prompts, seed=1)
        report["rows"][name] = {"steps": done.steps, "seconds": done.seconds, **row}
        print(f"{name}: {json.dumps(report['rows'][name])}", flush=True)
    (args.workdir / "modes_report.json").write_text(json.dumps(report, indent=2))
    print("\n".join(table(report)))
    if args.write:
        write_results(markdown(report))


if __name__ == "__main__":
    main()
