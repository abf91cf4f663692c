"""The demo's console summary: one table (ratios against the teacher), the targets, the time per stage.

Tables are printed at their full width when the output is a file or a pipe, so
`alambic demo | tee demo.log` keeps every column.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from alambic.evaluate.console import table_console
from alambic.evaluate.ratios import versus_teacher

LABELS = {"teacher": "teacher", "gold_only": "(a) gold only", "hard_labels": "(b) teacher hard labels",
          "soft_targets": "(c) teacher soft targets"}


def _speed_cell(metrics: dict, teacher: dict) -> str:
    value = metrics.get("throughput_per_s")
    if value is None:
        return "–"
    spread = metrics.get("throughput_spread")
    cell = f"{value:,.0f}" + (f" ±{spread:.0%}" if spread is not None else "")
    ratio = versus_teacher("throughput_per_s", value, teacher.get("throughput_per_s"))
    return cell + (f" ({ratio})" if ratio and metrics is not teacher else "")


def summary_table(report: dict) -> Table:
    table = Table(title="alambic demo: BBC News test split, equal student steps", box=box.SIMPLE_HEAD)
    for title in ("model", "accuracy", "macro-F1", "agrees w/ teacher", "ex/s @32 (median ±IQR)", "params", "MB"):
        table.add_column(title, justify="left" if title == "model" else "right")
    teacher = report["models"]["teacher"]["metrics"]
    for name, entry in report["models"].items():
        metrics = entry["metrics"]
        accuracy = f"{metrics['accuracy']:.2%}"
        params = f"{metrics['num_parameters'] / 1e6:.1f}M"
        if name != "teacher":
            accuracy += f" ({versus_teacher('accuracy', metrics['accuracy'], teacher['accuracy'])})"
            params += f" ({versus_teacher('num_parameters', metrics['num_parameters'], teacher['num_parameters'])})"
        disk = metrics.get("disk_mb")
        table.add_row(LABELS.get(name, name), accuracy, f"{metrics['macro_f1']:.3f}", f"{metrics['agreement']:.2%}",
                      _speed_cell(metrics, teacher), params, "–" if disk is None else f"{disk:.0f}")
    for name, values in (report.get("classic_students") or {}).items():
        table.add_row("(d) TF-IDF + logistic regression" if name.startswith("tfidf") else name,
                      f"{values['accuracy']:.2%} ({versus_teacher('accuracy', values['accuracy'], teacher['accuracy'])})",
                      "–", "–", "–", "–", "–")
    return table


def print_demo_summary(report: dict, report_path: Path, total_seconds: float) -> None:
    console = table_console()
    console.print(summary_table(report))
    for name, share in (report.get("gap_closed") or {}).items():
        if share is not None:
            console.print(f"  {LABELS.get(name, name)} closes {share:.0%} of (a)'s accuracy gap to the teacher")
    for warning in report.get("speed_warnings") or []:
        console.print(f"  [yellow]speed warning[/] {warning}")
    for target in report.get("targets", []):
        mark = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(f"  {target['name']}: {target['measured']} (target {target['target']}) {mark}")
    load = (report.get("setup") or {}).get("load_average")
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report["stages"].items())
    console.print(f"total wall time {total_seconds:.0f} s (load average at the end {load})")
    console.print(f"stages: {stages}")
    console.print(f"report: [bold]{report_path}[/]")
