"""The classification demo over several seeds: mean and spread of every arm, and each target's verdict per seed.

Each seed runs the whole demo (teacher fine-tune on the labelled share, the
teacher labelling the transfer set, init-student, the three student arms, the
TF-IDF student) on the same split and labelled share (split_seed 0); the seed
changes the head init, the data order and dropout. Test figures only.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_seeds.py --seeds 0 1 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_seeds.py --seeds 0 1 2 --write   # update benchmarks/RESULTS.md
    python benchmarks/demo_seeds.py --seeds 0 1 2 --collect-only --write             # from finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from alambic.demos.demo import DemoConfig, demo_targets, run_demo

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- demo-seeds:start -->", "<!-- demo-seeds:end -->"
MODELS = ("teacher", "gold_only", "hard_labels", "soft_targets")
METRICS = ("accuracy", "macro_f1", "agreement", "throughput_per_s", "throughput_spread")


def load_run(folder: Path) -> dict:
    """A finished run's metrics; models re-measured by `alambic eval FOLDER` (FOLDER/eval) take precedence.

    Re-measuring all runs back to back with one version of the timing code keeps
    the speed figures of different seeds comparable.
    """
    saved = json.loads((folder / "metrics.json").read_text())
    remeasured = folder / "eval" / "metrics.json"
    if remeasured.exists():
        saved["models"] = json.loads(remeasured.read_text())["models"]
        saved["remeasured"] = True
        saved["targets"] = demo_targets(saved)  # the verdicts follow the re-measured figures
    return saved


def run_seed(seed: int, root: Path, overrides: dict, collect_only: bool) -> dict:
    folder = root / f"seed{seed}"
    if collect_only:
        return load_run(folder)
    return run_demo(DemoConfig(**{**overrides, "seed": seed, "output_dir": str(folder)}))


def mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def summary_markdown(reports: dict[int, dict], command: str) -> str:
    seeds = sorted(reports)
    lines = [f"Command: `{command}` (seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation)", "",
             "| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for model in MODELS:
        cells = [mean_spread([reports[s]["models"][model]["metrics"].get(k, float("nan")) for s in seeds]) for k in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    tfidf = [reports[s]["classic_students"]["tfidf_logistic_regression"]["accuracy"] for s in seeds]
    lines.append(f"| tfidf_logistic_regression | {mean_spread(tfidf)} | | | | |")
    lines += ["", "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | verdict |", "|---" * (len(seeds) + 2) + "|"]
    names = [t["name"] for t in reports[seeds[0]]["targets"]]
    for name in names:
        per_seed = [next(t for t in reports[s]["targets"] if t["name"] == name) for s in seeds]
        verdict = "met on every seed" if all(t["met"] for t in per_seed) else \
            f"NOT met ({sum(t['met'] for t in per_seed)}/{len(seeds)} seeds)"
        goal = per_seed[0]["target"]
        lines.append(f"| {name} ({goal}) | " + " | ".join(t["measured"] for t in per_seed) + f" | {verdict} |")
    wall = [reports[s].get("total_seconds", float("nan")) for s in seeds]
    cpu = [sum((reports[s].get("stage_cpu_seconds") or {"-": float("nan")}).values()) for s in seeds]
    loads = [reports[s].get("setup", {}).get("load_average") for s in seeds]
    lines += ["", f"- wall time per seed (s): {', '.join(f'{w:.0f}' for w in wall)}; CPU seconds, all threads: "
              f"{', '.join(f'{c:.0f}' for c in cpu)}; load average at the end of each: {loads}"]
    remeasured = [s for s in seeds if reports[s].get("remeasured")]
    if remeasured:
        lines.append(f"- seeds {', '.join(map(str, remeasured))}: models re-measured by `alambic eval FOLDER` "
                     "(FOLDER/eval/metrics.json: the same models on the same test set; speed timed again, all "
                     "seeds back to back with one version of the timing code); the targets use those figures")
    return "\n".join(lines)


def lm_markdown(run_folder: Path) -> str:
    """The LM demo's figures (one run) from its metrics.json."""
    saved = load_run(run_folder)
    keys = ("bits_per_byte", "perplexity", "kl_to_teacher", "top1_agreement", "tokens_per_s_batch1",
            "tokens_per_s_batch8", "num_parameters")
    lines = [f"### `alambic demo --task lm` ({run_folder})", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, entry in saved["models"].items():
        values = entry["metrics"]
        lines.append(f"| {name} | " + " | ".join("–" if values.get(k) is None else f"{values[k]:.4g}" for k in keys) + " |")
    closed = saved.get("kd_gap_closed")
    lines += ["", f"- KD closes {closed:.1%} of the CE student's gap to the teacher in held-out bits per byte "
              "(target >= 40%)" if closed is not None else "- gap closed: n/a",
              f"- wall time {saved.get('total_seconds', float('nan')):.0f} s; CPU seconds per stage: "
              + ", ".join(f"{k} {v:.0f}" for k, v in (saved.get("stage_cpu_seconds") or {}).items())]
    return "\n".join(lines)


def write_section(markdown: str) -> None:
    """Replace the demo section of RESULTS.md (other sections belong to other benchmarks)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{START}\n{markdown}\n{END}"
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
    parser.add_argument("--lm-run", help="also report a finished `alambic demo --task lm` run folder")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    reports = {seed: run_seed(seed, Path(args.root), overrides, args.collect_only) for seed in args.seeds}
    command = "python benchmarks/demo_seeds.py --seeds " + " ".join(map(str, args.seeds))
    markdown = summary_markdown(reports, command + (" --set " + " ".join(args.set) if args.set else ""))
    if args.lm_run:
        markdown += "\n\n" + lm_markdown(Path(args.lm_run))
    print(markdown)
    if args.write:
        write_section(markdown)


if __name__ == "__main__":
    main()
