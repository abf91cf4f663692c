"""A rich progress bar for training: step, loss, tokens/s, ETA."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, description: str = "distill"):
        self.enabled = enabled
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
        extra = ""
        if "eval_kl" in record:
            extra = f"eval KL {record['eval_kl']:.4f}"
        elif "eval_ce" in record:
            extra = f"eval CE {record['eval_ce']:.4f}"
        tokens_per_s = record.get("tokens_per_s") or 0.0
        rate = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s > 0 else ""  # no "0 tok/s" where nothing counts tokens
        self.progress.update(self.task, completed=step, loss=record["loss"], rate=rate, extra=extra)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
