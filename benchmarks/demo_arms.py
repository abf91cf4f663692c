"""Rerun the demo's student arms with config overrides on finished demo runs: test accuracy per seed.

Reuses each seed's teacher, logit cache, student init and data (from
`benchmarks/demo_seeds.py` or `alambic demo`), so one arm costs only its own
training (~60 CPU-seconds at 200 steps). This is how the demo's defaults were
chosen (benchmarks/RESULTS.md, "Soft vs hard targets by training length").

    python benchmarks/demo_arms.py --root /tmp/seeds --seeds 0 1 2 \
        --variant base= --variant s400=train.max_steps=400 --jobs 2
    python benchmarks/demo_arms.py --root /tmp/seeds --seeds 0 --arms soft_targets --variant T4=loss.temperature=4

A variant is NAME=OVERRIDE[,OVERRIDE...] (dotted DistillConfig keys); every
variant runs for every arm and seed, each in its own process (--jobs at once,
one thread each). Results go to ROOT/arms/NAME-ARM-SEED/result.json and are
reused when present, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS = ("hard_labels", "soft_targets")


def run_arm(seed_dir: Path, arm: str, overrides: list[str], output: Path) -> dict:
    """Train one arm from the seed's saved config with `overrides`; return its test accuracy."""
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alambic.config import DistillConfig, apply_overrides
    from alambic.evaluate.suite import classifier_logits
    from alambic.training.loop import run_distillation

    raw = yaml.safe_load((seed_dir / arm / "config.yaml").read_text())
    raw = apply_overrides(raw, [*overrides, f"train.output_dir={output}", "train.progress=false"])
    config = DistillConfig.model_validate(raw)
    run_distillation(config, overwrite=True)
    model = AutoModelForSequenceClassification.from_pretrained(output / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(output / "final")
    result = {"overrides": overrides}
    for split in ("test", "validation"):
        rows = [json.loads(line) for line in (seed_dir / "data" / f"{split}.jsonl").read_text().splitlines()]
        logits = classifier_logits(model, tokenizer, [r["text"] for r in rows], config.data.max_length,
                                   description=arm, show_progress=False)
        correct = (logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).sum().item()
        prefix = "" if split == "test" else "validation_"
        result.update({f"{prefix}accuracy": correct / len(rows), f"{prefix}correct": correct,
                       f"{prefix}examples": len(rows)})
    return result


def _job(root: Path, name: str, overrides: list[str], arm: str, seed: int) -> tuple:
    folder = root / "arms" / f"{name}-{arm}-{seed}"
    result = folder / "result.json"
    if not result.exists():
        command = [sys.executable, __file__, "--one", str(root / f"seed{seed}"), arm, str(folder), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} {arm} seed {seed} failed:\n{done.stderr[-3000:]}")
    return name, arm, seed, json.loads(result.read_text())


def _variants(specs: list[str]) -> dict[str, list[str]]:
    variants = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    return variants


def _table(results: list[tuple], seeds: list[int]) -> str:
    """Test accuracy per seed, and validation accuracy (what a choice of setting may be based on) in brackets."""
    lines = ["| variant | arm | " + " | ".join(f"seed {s} test (val)" for s in seeds) + " | mean test (val) |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    by_key = {(n, a, s): r for n, a, s, r in results}
    for name, arm in dict.fromkeys((n, a) for n, a, _, _ in results):
        runs = [by_key[(name, arm, s)] for s in seeds]
        cells = [f"{100 * r['accuracy']:.2f}% ({100 * r.get('validation_accuracy', float('nan')):.2f}%)" for r in runs]
        mean_test = statistics.mean(r["accuracy"] for r in runs)
        mean_val = statistics.mean(r.get("validation_accuracy", float("nan")) for r in runs)
        lines.append(f"| {name} | {arm} | " + " | ".join(cells) + f" | {100 * mean_test:.2f}% ({100 * mean_val:.2f}%) |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        seed_dir, arm, output, *overrides = sys.argv[2:]
        result = run_arm(Path(seed_dir), arm, overrides, Path(output))
        Path(output, "result.json").write_text(json.dumps(result, indent=2))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding seedN/ demo runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE[,OVERRIDE...]")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    variants = _variants(args.variant or ["base="])
    jobs = [(name, overrides, arm, seed) for name, overrides in variants.items() for arm in args.arms
            for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: _job(args.root, *job), jobs))
    print(_table(results, args.seeds))


if __name__ == "__main__":
    main()
