"""`alambic eval`, `alambic report` and `alambic demo`."""

from __future__ import annotations

import json
from typing import List, Optional

import typer


def evaluate_plan(plan, speed: bool, limit: Optional[int]) -> dict:
    """Read the plan's data and evaluate its models; the result is the metrics.json schema."""
    from alambic.data import read_records
    from alambic.errors import DataError
    from alambic.evaluate.suite import evaluate_causal_lms, evaluate_classifiers

    records = read_records(plan.data, limit)
    if not records:
        raise DataError(f"the evaluation set {plan.data!r} is empty", "give a file with at least one record")
    missing = [c for c in (plan.text_column,) + ((plan.label_column,) if plan.task != "causal_lm" else ())
               if c not in records[0]]
    if missing:
        raise DataError(f"{plan.data}: records have no column {missing[0]!r} (columns: {', '.join(records[0])})",
                        "rename the column or evaluate through a config that sets data.text_column/label_column")
    if plan.task == "causal_lm":
        report = evaluate_causal_lms(plan.specs, [str(r[plan.text_column]) for r in records], plan.max_length, speed)
    else:
        rows = [{"text": r[plan.text_column], "label": r[plan.label_column]} for r in records]
        report = evaluate_classifiers(plan.specs, rows, plan.max_length, plan.extra.get("class_names"), speed)
    report.update({k: v for k, v in plan.extra.items() if k not in report})
    report["eval_data"] = str(plan.data)
    return report


def register(app: typer.Typer) -> None:
    @app.command(name="eval")
    def eval_command(
        target: str = typer.Argument(..., help="distill config, run folder, demo run folder, or model folder"),
        student: Optional[List[str]] = typer.Option(None, "--student", help="another student model folder (repeat)"),
        data: Optional[str] = typer.Option(None, "--data", help="evaluation file (jsonl/csv/parquet)"),
        task: Optional[str] = typer.Option(None, "--task", help="causal_lm or sequence_classification"),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example / LM window"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate the first N records only"),
        speed: bool = typer.Option(True, "--speed/--no-speed", help="measure latency, throughput and memory"),
        output_dir: Optional[str] = typer.Option(None, "--out", help="folder for metrics.json and report.html"),
        baseline: Optional[str] = typer.Option(None, "--baseline", help="a baseline student (folder, or the name of "
                                               "an evaluated one): report the share of its gap each student closes"),
    ) -> None:
        """Teacher and students side by side: quality, agreement, speed, memory, size, retention."""
        from alambic.errors import ConfigError
        from alambic.evaluate.report import write_report
        from alambic.evaluate.gap import describe_gaps, gap_closed_shares
        from alambic.evaluate.targets import add_baseline, apply_options, resolve_target
        from alambic.durable import atomic_write_text
        from alambic.output_paths import check_output_folder

        if task not in (None, "causal_lm", "sequence_classification"):
            raise ConfigError(f"unknown task {task!r}", "use --task causal_lm or --task sequence_classification")
        plan = apply_options(resolve_target(target), list(student or []), data, task, max_length, output_dir)
        check_output_folder(plan.output_dir, "--out" if output_dir else "the eval output folder")
        baseline_name = add_baseline(plan, baseline)
        report = evaluate_plan(plan, speed, limit)
        if baseline_name:
            report["baseline"], report["gap_closed"] = baseline_name, gap_closed_shares(report, baseline_name)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.output_dir / "metrics.json", json.dumps(report, indent=2))
        path = write_report([plan.output_dir])
        _print_models(report)
        for warning in report.get("speed_warnings") or []:
            typer.echo(f"warning: {warning}", err=True)
        for line in describe_gaps(report):
            typer.echo(line)
        typer.echo(f"metrics: {plan.output_dir / 'metrics.json'}\nreport: {path}")

    @app.command()
    def report(
        run_folders: List[str] = typer.Argument(..., help="run folders holding a metrics.json"),
        output: Optional[str] = typer.Option(None, "--out", help="HTML file (default: FIRST_RUN/report.html)"),
    ) -> None:
        """Render the HTML report from saved metrics (nothing is recomputed)."""
        from alambic.evaluate.report import write_report

        typer.echo(f"report: {write_report(run_folders, output)}")


def _print_models(report: dict) -> None:
    from rich.table import Table

    from alambic.evaluate.console import table_console
    from alambic.evaluate.ratios import versus_teacher
    from alambic.evaluate.report import METRIC_LABELS, metric_cell

    teacher = next((e["metrics"] for e in report["models"].values() if e["role"] == "teacher"), {})

    names = list(report["models"])
    table = Table(title=f"alambic eval ({report['task']})")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    keys = [k for k in METRIC_LABELS if any(k in report["models"][n]["metrics"] for n in names)]
    for key in keys:
        cells = []
        for name in names:
            entry = report["models"][name]
            cell = metric_cell(key, entry["metrics"])
            ratio = None if entry["role"] == "teacher" else versus_teacher(key, entry["metrics"].get(key), teacher.get(key))
            cells.append(cell + (f" ({ratio})" if ratio else ""))
        table.add_row(METRIC_LABELS[key][0], *cells)
    table_console().print(table)
