"""The one interface every teacher backend follows, and the errors it may raise.

The runner decides what to do with a failure from its class alone:
`TransientTeacherError` is retried with backoff, `UnreachableTeacherError` too
but ends the run once the retry budget is spent (every other request would
fail the same way), `RejectedRequestError` is recorded as failed at once (the
request itself is bad), and `FatalTeacherError` stops the run immediately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from alambic.errors import AlambicError


@dataclass(frozen=True)
class TeacherRequest:
    key: str
    messages: tuple
    sample_index: int
    seed: int | None = None


@dataclass
class TeacherReply:
    content: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[dict] | None = None
    model: str | None = None
    extra: dict = field(default_factory=dict)


class TransientTeacherError(Exception):
    """Worth retrying: rate limits, 5xx, timeouts, broken or malformed responses."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class UnreachableTeacherError(TransientTeacherError):
    """No connection could be opened to the server."""

    def __init__(self, message: str, url: str):
        super().__init__("unreachable", message)
        self.url = url


class RejectedRequestError(Exception):
    """The server refused this request for what it contains (400, 422): retrying would not help."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class FatalTeacherError(AlambicError):
    """Every request would fail the same way (bad key, unknown model): stop the run."""


class TeacherBackend(Protocol):
    """Answers a batch of chat requests; `batch_size` is 1 for API servers."""

    name: str
    batch_size: int
    max_in_flight: int

    async def complete(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]: ...

    async def aclose(self) -> None: ...
