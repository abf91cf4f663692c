"""Send teacher requests with a bounded number in flight, retry what is worth retrying, store everything.

Each request ends in exactly one cache line: `ok` with the answer, or `failed`
with the error of its last attempt. Only a server that cannot be connected to
at all ends the run early (every remaining request would fail the same way);
what was stored until then stays stored.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from alambic.errors import AlambicError
from alambic.generate.backends.base import (
    RejectedRequestError,
    TeacherReply,
    TeacherRequest,
    TransientTeacherError,
    UnreachableTeacherError,
)
from alambic.generate.cache import RequestCache
from alambic.generate.checks import require_logprobs
from alambic.generate.config import RetryConfig
from alambic.generate.progress import GenerationProgress
from alambic.generate.retry import backoff_delay


class Redactor:
    """Removes secrets (the API key) from any text before it is stored or shown."""

    def __init__(self, *secrets: str | None):
        self.secrets = [secret for secret in secrets if secret and len(secret) >= 4]

    def __call__(self, text: str) -> str:
        from alambic.redact import redact_text

        text = redact_text(text)  # user:password inside any URL
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


@dataclass
class RunStats:
    requested: int = 0
    cached: int = 0
    skipped_failed: int = 0
    sent: int = 0
    answered: int = 0
    failed: int = 0
    attempt_errors: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requested": self.requested, "from_cache": self.cached, "failed_earlier_not_retried": self.skipped_failed,
            "sent": self.sent, "answered": self.answered, "failed": self.failed,
            "errors_by_kind": dict(self.attempt_errors), "failures_by_kind": dict(self.failures),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
        }


def _backend_label(backend) -> str:
    name = getattr(backend, "name", type(backend).__name__)
    where = getattr(backend, "url", None) or getattr(getattr(backend, "config", None), "model", None)
    where = re.sub(r"//[^/@]*@", "//***@", str(where)) if where else where  # no credentials in messages
    return f"{name!r} ({where})" if where else repr(name)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RequestRunner:
    def __init__(self, backend, cache: RequestCache, params: dict, retry: RetryConfig,
                 redact: Redactor, show_progress: bool = True, seed: int = 0):
        self.backend = backend
        self.cache = cache
        self.params = params
        self.retry = retry
        self.redact = redact
        self.show_progress = show_progress
        self.rng = random.Random(seed)
        self.stats = RunStats()
        self._pause_until = 0.0
        self._progress: GenerationProgress | None = None
        self._writes: set[asyncio.Future] = set()
        self._write_error: BaseException | None = None

    def pending(self, requests: list[TeacherRequest], retry_failed: bool) -> list[TeacherRequest]:
        """Requests still to send: not answered, and not failed before unless `retry_failed`; each key once."""
        todo, seen = [], set()
        for request in requests:
            if request.key in seen:
                continue
            seen.add(request.key)
            if self.cache.answered(request.key):
                self.stats.cached += 1
            elif self.cache.failed(request.key) and not retry_failed:
                self.stats.skipped_failed += 1
            else:
                todo.append(request)
        self.stats.requested += len(seen)
        return todo

    async def run(self, requests: list[TeacherRequest], retry_failed: bool = False, label: str = "teacher") -> RunStats:
        todo = self.pending(requests, retry_failed)
        started = time.monotonic()
        queue = deque(todo)
        worker_count = min(self.backend.max_in_flight, max(1, -(-len(todo) // self.backend.batch_size)))
        total = len(todo) + self.stats.cached + self.stats.skipped_failed
        with GenerationProgress(self.show_progress and bool(todo), total, total - len(todo), label) as progress:
            self._progress = progress
            workers = [asyncio.ensure_future(self._worker(queue)) for _ in range(worker_count if todo else 0)]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                # Answers already received are stored even when the run stops early.
                await asyncio.gather(*list(self._writes), return_exceptions=True)
                self.stats.seconds += time.monotonic() - started
        if self._write_error is not None:
            raise self._write_error
        return self.stats

    async def _worker(self, queue: deque) -> None:
        while queue and self._write_error is None:
            batch = [queue.popleft() for _ in range(min(self.backend.batch_size, len(queue)))]
            await self._process(batch)

    async def _process(self, batch: list[TeacherRequest]) -> None:
        first_failure = None
        for attempt in range(1, self.retry.max_attempts + 1):
            await self._respect_pause()
            self.stats.sent += len(batch) if attempt == 1 else 0
            started = time.monotonic()
            try:
                replies = await self.backend.complete(batch, self.params)
            except RejectedRequestError as err:
                self.stats.attempt_errors[err.kind] += len(batch)
                self._store_failures(batch, err.kind, str(err), attempt)
                return
            except TransientTeacherError as err:
                self.stats.attempt_errors[err.kind] += len(batch)
                first_failure = first_failure or time.monotonic()
                if err.retry_after is not None:
                    wait = min(err.retry_after, self.retry.max_retry_after_s)
                    self._pause_until = max(self._pause_until, time.monotonic() + wait)
                if attempt == self.retry.max_attempts:
                    if isinstance(err, UnreachableTeacherError):
                        raise self._unreachable(err, time.monotonic() - first_failure) from None
                    self._store_failures(batch, err.kind, str(err), attempt)
                    return
                await asyncio.sleep(backoff_delay(attempt, err.retry_after, self.retry, self.rng))
                continue
            require_logprobs(replies, self.params, _backend_label(self.backend))  # before it is stored
            self._store_replies(batch, replies, attempt, time.monotonic() - started)
            return

    async def _respect_pause(self) -> None:
        # A Retry-After from one request holds back all of them: the limit is the server's, not the request's.
        while (remaining := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)

    def _store_replies(self, batch, replies: list[TeacherReply], attempts: int, latency: float) -> None:
        stamp = utc_now()
        records = [
            {"key": request.key, "status": "ok", "sample_index": request.sample_index, "seed": request.seed,
             "messages": list(request.messages), "content": reply.content, "finish_reason": reply.finish_reason,
             "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
             "logprobs": reply.logprobs, "model": reply.model, "attempts": attempts, "time": stamp,
             "latency_s": round(latency, 4)}
            for request, reply in zip(batch, replies, strict=True)
        ]
        prompt_tokens = sum(reply.prompt_tokens or 0 for reply in replies)
        completion_tokens = sum(reply.completion_tokens or 0 for reply in replies)

        def stored() -> None:
            self.stats.answered += len(batch)
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self._progress.advance(len(batch), completion_tokens)

        self._store(records, stored)

    def _store_failures(self, batch, kind: str, message: str, attempts: int) -> None:
        stamp = utc_now()
        error = {"kind": kind, "message": self.redact(message)}
        records = [{"key": request.key, "status": "failed", "sample_index": request.sample_index,
                    "seed": request.seed, "messages": list(request.messages), "error": error,
                    "attempts": attempts, "time": stamp} for request in batch]

        def stored() -> None:
            self.stats.failed += len(batch)
            self.stats.failures[kind] += len(batch)
            self._progress.advance(len(batch), 0)

        self._store(records, stored)

    def _store(self, records: list[dict], on_stored) -> None:
        """Queue records for the cache; `on_stored` runs once they are on disk.

        The worker moves on without waiting for the fsync: an answer not yet on
        disk counts as in flight (a crash re-sends it), and the run does not end
        before every queued record is stored.
        """
        written = asyncio.gather(*(self.cache.append_nowait(record) for record in records))
        self._writes.add(written)

        def finished(done: asyncio.Future) -> None:
            self._writes.discard(done)
            if done.cancelled():
                return
            if done.exception() is not None:
                self._write_error = self._write_error or done.exception()
                return
            on_stored()

        written.add_done_callback(finished)

    def _unreachable(self, err: UnreachableTeacherError, seconds: float) -> AlambicError:
        return AlambicError(
            f"cannot reach the teacher at {err.url}: {self.retry.max_attempts} attempts over {seconds:.1f} s "
            f"could not connect ({self.redact(str(err))})",
            f"start the server or fix teacher.base_url; the {self.stats.answered} answers received in this run "
            f"are stored in {self.cache.folder} and will not be requested again",
        )
