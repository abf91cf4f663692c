"""A rich progress bar for training: step, loss, tokens/s, ETA."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, description: str = "distill",
                 task: str = "causal_lm"):
        self.enabled = enabled
        self.run_task = task
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total_steps, completed=start_step, loss=float("nan"), rate="", extra="")

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        extra = progress_extra(record, self.run_task)
        tokens_per_s = record.get("tokens_per_s") or 0.0
        rate = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s > 0 else ""  # no "0 tok/s" where nothing counts tokens
        self.progress.update(self.task, completed=step, loss=record["loss"], rate=rate, extra=extra)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def progress_extra(record: dict, task: str) -> str:
    """The held-out figure of the progress line: accuracy for classifiers, KL or CE for language models."""
    if task == "sequence_classification" and "eval_accuracy" in record:  # what a classifier is judged by
        extra = f"eval accuracy {record['eval_accuracy']:.1%}"
        if "eval_agreement" in record:
            extra += f", agrees w/ teacher {record['eval_agreement']:.1%}"
        return extra
    if "eval_kl" in record:
        return f"eval KL {record['eval_kl']:.4f}"
    if "eval_ce" in record:
        return f"eval CE {record['eval_ce']:.4f}"
    return ""
