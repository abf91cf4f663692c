"""The classification demo over several seeds: mean and spread of teacher, distilled student and baseline.

Each seed runs the whole demo (teacher fine-tune, layer selection, KD, CE-only
baseline) on the same fixed train/validation/test split (split_seed 0); the
seed changes the head init, the data order and dropout. Test figures only
(nothing is tuned on them).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_seeds.py --seeds 0 1 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_seeds.py --seeds 0 1 2 --write   # update benchmarks/RESULTS.md
    python benchmarks/demo_seeds.py --seeds 0 1 2 --collect-only --write             # from finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from alambic.evaluate.demo import DemoConfig, run_demo

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
MODELS = ("teacher", "distilled", "baseline")
METRICS = ("accuracy", "macro_f1", "agreement", "ece", "throughput_per_s", "latency_ms")


def run_seed(seed: int, root: Path, overrides: dict, collect_only: bool) -> dict:
    folder = root / f"seed{seed}"
    if collect_only:
        return json.loads((folder / "metrics.json").read_text())
    return run_demo(DemoConfig(**{**overrides, "seed": seed, "output_dir": str(folder)}))


def mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def summary_markdown(reports: dict[int, dict], command: str) -> str:
    seeds = sorted(reports)
    lines = [f"Command: `{command}` (seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation)", "",
             "| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for model in MODELS:
        cells = [mean_spread([reports[s]["models"][model]["metrics"][k] for s in seeds]) for k in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    wins = {k: sum(reports[s]["models"]["distilled"]["metrics"][k] >= reports[s]["models"]["baseline"]["metrics"][k]
                   for s in seeds) for k in ("accuracy", "agreement")}
    retention = [reports[s]["models"]["distilled"]["retention"]["accuracy"] for s in seeds]
    speedup = [reports[s]["models"]["distilled"]["retention"].get("throughput_per_s", float("nan")) for s in seeds]
    wall = [reports[s].get("total_seconds", float("nan")) for s in seeds]
    lines += ["", f"- distilled accuracy retention (student / teacher): {mean_spread(retention)}",
              f"- distilled throughput / teacher throughput at batch 32: {mean_spread(speedup)}",
              f"- distilled >= baseline: accuracy in {wins['accuracy']}/{len(seeds)} seeds, "
              f"agreement in {wins['agreement']}/{len(seeds)} seeds",
              f"- wall time per seed (s): {', '.join(f'{w:.0f}' for w in wall)}"]
    return "\n".join(lines)


def write_section(markdown: str) -> None:
    """Replace the demo section of RESULTS.md (other sections belong to other benchmarks)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{START}\n## demo\n\n{markdown}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/demo-seeds")
    parser.add_argument("--collect-only", action="store_true", help="read finished runs instead of training")
    parser.add_argument("--write", action="store_true", help="update the demo section of benchmarks/RESULTS.md")
    parser.add_argument("--set", nargs="*", default=[], help="DemoConfig overrides, e.g. student_steps=120")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    reports = {seed: run_seed(seed, Path(args.root), overrides, args.collect_only) for seed in args.seeds}
    command = "python benchmarks/demo_seeds.py --seeds " + " ".join(map(str, args.seeds))
    markdown = summary_markdown(reports, command + (" --set " + " ".join(args.set) if args.set else ""))
    print(markdown)
    if args.write:
        write_section(markdown)


if __name__ == "__main__":
    main()
