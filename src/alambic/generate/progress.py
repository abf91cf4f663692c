"""The live progress line: requests done, requests/s, tokens/s and the ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class GenerationProgress:
    """Counts requests finished in this run; answers found in the cache count as done from the start."""

    def __init__(self, enabled: bool, total: int, already_done: int, description: str = "teacher",
                 console: Console | None = None):
        self.enabled = enabled
        self.started = time.monotonic()
        self.requests = 0
        self.tokens = 0
        self._progress: Progress | None = None
        self._task = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[requests_per_s]:.1f} req/s"),
                TextColumn("{task.fields[tokens_per_s]:.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console or Console(stderr=True),
                refresh_per_second=4,
            )
            self._task = self._progress.add_task(description, total=total, completed=already_done,
                                                 requests_per_s=0.0, tokens_per_s=0.0)

    def __enter__(self) -> "GenerationProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, requests: int, tokens: int) -> None:
        self.requests += requests
        self.tokens += tokens
        if self._progress is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        self._progress.update(self._task, advance=requests, requests_per_s=self.requests / elapsed,
                              tokens_per_s=self.tokens / elapsed)
