"""Merged KD students vs the best and the mean single student (3 seeds) on the LM demo.

Three students are distilled from the demo's pruned student for --steps steps each,
seeds 0, 1, 2 (the seed changes the order of the training data), then merged with
`alambic merge` (mergekit): linear (the uniform mean of the weights) and TIES with
the common pruned init as base. Scored on the held-out modules: bits per byte and
KL to the teacher.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/merge_seeds.py --steps 200 --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _lm_seed import Setup, dump, machine, replace_section, table

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-seed")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    from alambic.models.merge import MergeConfig, merge_models

    started = time.time()
    setup = Setup(Path(args.out), args.steps, args.threads)
    students = {f"kd_seed{seed}": setup.train(f"kd_seed{seed}", seed=seed)[0] for seed in args.seeds}
    merged = {}
    for method, extra in (("linear", {}), ("ties", {"base": str(setup.student_init), "density": 0.5})):
        merged[f"merged_{method}"] = merge_models(MergeConfig(
            models=[str(p) for p in students.values()], method=method, output=str(Path(args.out) / f"merged_{method}"),
            **extra), overwrite=True)
    metrics = setup.evaluate({**students, **merged})
    rows = [{"student": name, "bits_per_byte": metrics[name]["bits_per_byte"],
             "kl_to_teacher": metrics[name]["kl_to_teacher"], "top1_agreement": metrics[name]["top1_agreement"]}
            for name in (*students, *merged)]
    singles = [metrics[name]["bits_per_byte"] for name in students]
    best, mean = min(singles), statistics.mean(singles)
    dump(Path(args.out) / "merge_seeds.json", {"rows": rows, "best": best, "mean": mean})
    lines = [f"- {name}: {metrics[name]['bits_per_byte']:.4f} bits/byte = best single "
             f"{metrics[name]['bits_per_byte'] - best:+.4f}, mean single {metrics[name]['bits_per_byte'] - mean:+.4f} "
             "(negative = better)" for name in merged]
    text = "\n".join([
        f"## Merging KD students of 3 seeds, {args.steps} student steps (LM demo)", "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/merge_seeds.py --steps {args.steps} --write` "
        f"({(time.time() - started) / 60:.0f} min, finished runs reused).", f"Machine: {machine()}.", "",
        f"Teacher: {metrics['teacher']['bits_per_byte']:.4f} bits/byte. Students: the demo's pruned student, "
        f"{args.steps} steps each, forward KL at T = 1, seeds {args.seeds} (data order). Merges by `alambic merge` "
        "(mergekit 0.1.5): linear = uniform mean; ties = TIES (density 0.5) on the changes from the pruned init.", "",
        table(rows, ["student", "bits_per_byte", "kl_to_teacher", "top1_agreement"]), "",
        f"- single students: best {best:.4f}, mean {mean:.4f} bits/byte", *lines,
    ])
    print(text)
    if args.write:
        replace_section(RESULTS, f"merge-seeds-{args.steps}", text)


if __name__ == "__main__":
    main()
