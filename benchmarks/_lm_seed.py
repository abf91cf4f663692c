"""Shared setup of the seed-capability benchmarks (interchange, QAT, merging) on the LM demo.

The LM demo's shipped teacher (alambic/assets/lm_teacher), its transfer set and its
pruned student (teacher layers [0, 3], width 128), all with the demo's defaults; the
students are trained through the one loop for `--steps` steps (equal for every arm)
and scored on the demo's held-out modules. Runs are cached under --out by name and
reused when their config is unchanged, so the three scripts share the plain KD run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from alambic.config import DistillConfig, dump_config  # noqa: E402

try:  # the demos are moving to alambic.demos
    from alambic.demos.lm_demo import LMDemoConfig, build_student_init, lm_train_config, prepare_corpus, shipped_teacher
except ImportError:
    from alambic.evaluate.lm_demo import LMDemoConfig, build_student_init, lm_train_config, prepare_corpus, shipped_teacher


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(1 / 5 / 15 min; the machine is shared with other jobs)")


class Setup:
    def __init__(self, out: Path, steps: int, threads: int):
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.out, self.steps = Path(out), steps
        self.demo = LMDemoConfig(output_dir=str(self.out), progress=False, eval_every=0, measure_speed=False)
        self.teacher, _ = shipped_teacher()
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths = {name: self.out / "data" / f"{name}.jsonl" for name in ("train", "validation", "heldout")}
        if not all(p.exists() for p in self.paths.values()):
            self.paths = prepare_corpus(self.demo, self.out)
        self.student_init = self.out / "student_init"
        if not (self.student_init / "config.json").exists():
            build_student_init(self.demo, self.paths, self.teacher, self.out)

    def config(self, name: str, seed: int = 0, **sections) -> DistillConfig:
        base = lm_train_config(self.demo, self.paths, self.student_init, self.out / name, self.teacher, self.steps,
                               self.demo.student_lr).model_dump(mode="json")
        base["train"]["seed"] = seed
        base["train"]["eval_every"] = 0
        base.update(sections)
        return DistillConfig.model_validate(base)

    def train(self, name: str, seed: int = 0, **sections) -> tuple[Path, float]:
        """(the run's final/ model, wall seconds; 0 when a finished run with this config was reused)."""
        from alambic.training.loop import run_distillation

        config = self.config(name, seed, **sections)
        folder = self.out / name
        if (folder / "final" / "config.json").exists() and (folder / "config.yaml").read_text() == dump_config(config):
            return folder / "final", 0.0
        started = time.perf_counter()
        run_distillation(config, overwrite=True)
        return folder / "final", time.perf_counter() - started

    def heldout(self) -> list[str]:
        from alambic.data import read_records

        return [r["text"] for r in read_records(self.paths["heldout"])]

    def evaluate(self, models: dict[str, Path], speed: bool = False) -> dict:
        from alambic.evaluate.suite import ModelSpec, evaluate_causal_lms

        specs = [ModelSpec("teacher", str(self.teacher), "teacher")]
        specs += [ModelSpec(name, str(path)) for name, path in models.items()]
        report = evaluate_causal_lms(specs, self.heldout(), self.demo.max_length, speed, show_progress=False)
        return {name: entry["metrics"] for name, entry in report["models"].items()}


def replace_section(results: Path, name: str, text: str) -> None:
    """Put `text` between <!-- name:start --> and <!-- name:end --> in RESULTS.md (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = results.read_text() if results.exists() else ""
    block = f"{start}\n{text.strip()}\n{end}"
    if start in body and end in body:
        body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    results.write_text(body)


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
