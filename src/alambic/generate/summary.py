"""The end-of-run summary: counts, failures, tokens and cost (when prices are configured)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from alambic.generate.config import GenerateConfig, PriceConfig
from alambic.output import format_money


def cost(prices: PriceConfig | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    if prices is None:
        return None
    return prompt_tokens / 1e6 * prices.input_per_million + completion_tokens / 1e6 * prices.output_per_million


def build_summary(config: GenerateConfig, stats, teacher_rows: list[dict], kept, rejected: list[dict],
                  example_filter, input_records: int, files: dict, pool) -> dict:
    ok_rows = [row for row in teacher_rows if row["status"] == "ok"]
    dataset_prompt = sum((row["usage"] or {}).get("prompt_tokens") or 0 for row in ok_rows)
    dataset_completion = sum((row["usage"] or {}).get("completion_tokens") or 0 for row in ok_rows)
    prices = config.teacher.prices
    failures = Counter(row["error"]["kind"] for row in teacher_rows if row["status"] != "ok")
    summary = {
        "output_dir": config.output.dir,
        "teacher": {"backend": config.teacher.backend, "model": config.teacher.model},
        "recipe": config.recipe.kind,
        "input_records": input_records,
        "samples_per_prompt": config.sampling.n,
        "requests": stats.as_dict(),
        "teacher_records": {"total": len(teacher_rows), "ok": len(ok_rows), "failed": len(teacher_rows) - len(ok_rows),
                            "failed_by_kind": dict(failures)},
        "student": {"examples": len(kept), "records": sum(len(example.records) for example in kept),
                    "rejected": len(rejected), "rejected_by_reason": dict(Counter(r["reason"] for r in rejected))},
        "tokens": {"this_run": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
                   "dataset": {"prompt": dataset_prompt, "completion": dataset_completion}},
        "files": files,
    }
    if prices is not None:
        summary["cost"] = {"currency": prices.currency,
                           "this_run": cost(prices, stats.prompt_tokens, stats.completion_tokens),
                           "dataset": cost(prices, dataset_prompt, dataset_completion)}
    if example_filter.contamination is not None:
        report = example_filter.contamination.report()
        summary["contamination"] = {name: entry["flagged"] for name, entry in report["eval_sets"].items()}
    if pool is not None:
        summary["self_instruct"] = {"generated_instructions": len(pool.generated),
                                    "proposals_rejected": dict(Counter(e["reason"] for e in pool.log if e["reason"]))}
    return summary


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    table = Table(title=f"alambic generate — {summary['output_dir']}", show_header=False, title_justify="left")
    requests = summary["requests"]
    table.add_row("requests", f"{requests['requested']} needed: {requests['from_cache']} from cache, "
                              f"{requests['sent']} sent, {requests['answered']} answered, {requests['failed']} failed")
    if requests["failed_earlier_not_retried"]:
        table.add_row("", f"{requests['failed_earlier_not_retried']} failed earlier (rerun with --retry-failed)")
    if requests["errors_by_kind"]:
        table.add_row("errors seen", ", ".join(f"{k}: {v}" for k, v in sorted(requests["errors_by_kind"].items())))
    records = summary["teacher_records"]
    table.add_row("teacher records", f"{records['total']} ({records['ok']} ok, {records['failed']} failed)")
    student = summary["student"]
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(student["rejected_by_reason"].items())) or "none"
    table.add_row("student data",
                  f"{student['records']} records from {student['examples']} answers; rejected: {rejected}")
    tokens = summary["tokens"]
    table.add_row("tokens", f"this run {tokens['this_run']['prompt']} in / {tokens['this_run']['completion']} out; "
                            f"dataset {tokens['dataset']['prompt']} in / {tokens['dataset']['completion']} out")
    if "cost" in summary:
        spent = summary["cost"]
        table.add_row("cost", f"this run {format_money(spent['this_run'], spent['currency'])}, "
                              f"dataset {format_money(spent['dataset'], spent['currency'])}")
    if "contamination" in summary:
        table.add_row("contamination", ", ".join(f"{k}: {v} flagged" for k, v in summary["contamination"].items()))
    table.add_row("written", ", ".join(summary["files"].values()))
    console.print(table)
