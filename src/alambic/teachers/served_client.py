"""HTTP to an OpenAI-compatible completions server that returns vLLM's `prompt_logprobs`.

One request scores a list of rows: the prompt is the rows' token ids (no text,
so no string round trip), `prompt_logprobs: k` asks for the top-k log-probs of
every prompt position, and `max_tokens: 1` with `logprobs: k` and
`return_tokens_as_token_ids` gives the distribution after the last token. The
answer becomes, per row, top-k ids [n, k], their log-probs [n, k] and the log
of the remaining mass [n] -- the logit cache's sparse signal, position t
holding the teacher's next-token distribution after token t.

Failures are classed as `alambic generate` classes them (generate/backends/base.py)
and retried with its backoff (generate/retry.py): exponential with full jitter,
never sooner than a Retry-After, which holds back every request of the process.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from alambic.errors import AlambicError
from alambic.generate.backends.base import (
    FatalTeacherError,
    RejectedRequestError,
    TransientTeacherError,
    UnreachableTeacherError,
)
from alambic.generate.retry import backoff_delay, parse_retry_after

TOKEN_ID_PREFIX = "token_id:"

try:  # an answer holds ~k + 1 JSON objects per token: orjson (extra `served`) parses it about twice as fast
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads


class TeacherServerDown(AlambicError):
    """The server kept failing for the whole retry budget: the run stops, its last checkpoint intact."""

    exit_code = 3


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the server while idle: reopen and send again (not an attempt)."""


class ClientStopped(Exception):
    """The client was closed while a request was waiting to be retried."""


@dataclass
class RowSignal:
    ids: np.ndarray  # [n, k] int64, -1 where the server gave nothing
    logprobs: np.ndarray  # [n, k] float32
    tail: np.ndarray  # [n] float32, log(1 - sum of the top-k probabilities)


@dataclass
class ClientStats:
    requests: int = 0
    attempts: int = 0
    rows: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    retry_wait_s: float = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "attempts": self.attempts, "rows": self.rows, "tokens": self.tokens,
                "errors_by_kind": dict(self.errors), "retry_wait_s": round(self.retry_wait_s, 3)}


class PromptLogprobClient:
    """Thread-safe: each thread keeps its own keep-alive connection."""

    def __init__(self, base_url: str, model: str, top_k: int, *, timeout_s: float, retry, api_key: str | None = None,
                 seed: int = 0):
        parsed = urlparse(base_url.rstrip("/"))
        self.url = base_url.rstrip("/")
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname, parsed.port or (443 if self.https else 80)
        self.prefix = parsed.path  # e.g. /v1
        self.model, self.top_k = model, top_k
        self.timeout_s, self.retry = timeout_s, retry
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pause_until = 0.0
        self.stopped = threading.Event()

    # ------------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            connection = kind(self.host, self.port, timeout=self.timeout_s)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._local.connection = None

    def request(self, method: str, path: str, payload=None) -> tuple[int, dict, bytes]:
        """One attempt: (status, lower-cased headers, body); connection problems raise the generate error classes.

        A kept-alive connection the server closed while idle (uvicorn, under vLLM, after 5 s) fails
        on first use: that is not an attempt, so it is reopened and the request sent again at once.
        """
        body = None if payload is None else json.dumps(payload).encode()
        try:
            return self._send(method, path, body, reused=getattr(self._local, "connection", None) is not None)
        except _StaleConnection:
            return self._send(method, path, body, reused=False)

    def _send(self, method: str, path: str, body: bytes | None, reused: bool) -> tuple[int, dict, bytes]:
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=self._headers)
            return self._finish(connection.getresponse())
        except (ConnectionRefusedError, socket.gaierror) as err:
            self._drop_connection()
            raise UnreachableTeacherError(f"cannot connect to {self.url} ({type(err).__name__})", self.url) from None
        except (socket.timeout, TimeoutError):
            self._drop_connection()
            raise TransientTeacherError("timeout", f"no answer within {self.timeout_s:g} s") from None
        except http.client.IncompleteRead:
            self._drop_connection()
            raise TransientTeacherError("truncated", "the answer was cut off before its end") from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
            self._drop_connection()
            if reused:
                raise _StaleConnection() from None
            raise TransientTeacherError("connection", f"connection broke off ({type(err).__name__})") from None
        except (http.client.HTTPException, OSError) as err:
            self._drop_connection()
            raise TransientTeacherError("connection", f"connection broke off ({type(err).__name__})") from None

    def _finish(self, response) -> tuple[int, dict, bytes]:
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if headers.get("connection", "").lower() == "close":
            self._drop_connection()
        return response.status, headers, data

    def get_json(self, path: str):
        status, headers, data = self.request("GET", self.prefix + path)
        return status, _json_or_none(data)

    # ------------------------------------------------------------------ scoring

    def payload(self, rows: list[list[int]]) -> dict:
        k = self.top_k
        return {"model": self.model, "prompt": rows, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k,
                "logprobs": k, "return_tokens_as_token_ids": True, "add_special_tokens": False, "echo": False}

    def score_once(self, rows: list[list[int]]) -> tuple[list[RowSignal], dict]:
        """One attempt at scoring `rows`; returns the signals and the raw JSON answer."""
        status, headers, data = self.request("POST", self.prefix + "/completions", self.payload(rows))
        check_status(status, headers, data, self.url, self.model)
        answer = _json_or_none(data)
        if answer is None:
            raise TransientTeacherError("invalid_response", "the answer is not JSON")
        return parse_completion(answer, rows, self.top_k), answer

    def score(self, rows: list[list[int]]) -> list[RowSignal]:
        """Score with retries; TeacherServerDown once the retry budget is spent."""
        with self._lock:
            self.stats.requests += 1
        failed_since = None
        for attempt in range(1, self.retry.max_attempts + 1):
            self._respect_pause()
            with self._lock:
                self.stats.attempts += 1
            try:
                signals, _ = self.score_once(rows)
            except TransientTeacherError as err:
                failed_since = failed_since or time.monotonic()
                with self._lock:
                    self.stats.errors[err.kind] += 1
                    if err.retry_after is not None:
                        wait = min(err.retry_after, self.retry.max_retry_after_s)
                        self._pause_until = max(self._pause_until, time.monotonic() + wait)
                if attempt == self.retry.max_attempts:
                    raise self._down(err, time.monotonic() - failed_since) from None
                self._sleep(backoff_delay(attempt, err.retry_after, self.retry, self._rng))
                continue
            except (RejectedRequestError, FatalTeacherError) as err:
                raise TeacherServerDown(f"the teacher server at {self.url} refused a request: {err}",
                                        "check the server's log; the run stopped before this step") from None
            with self._lock:
                self.stats.rows += len(rows)
                self.stats.tokens += sum(len(row) for row in rows)
            return signals
        raise AssertionError("unreachable")

    def _down(self, err: TransientTeacherError, seconds: float) -> TeacherServerDown:
        return TeacherServerDown(
            f"the teacher server at {self.url} failed {self.retry.max_attempts} attempts over {seconds:.1f} s "
            f"(last: {err.kind}: {err})",
            "start or fix the server, then continue with `alambic distill CONFIG --resume` "
            "(the last checkpoint is intact)",
        )

    def _respect_pause(self) -> None:
        # A Retry-After from one request holds back all of them: the limit is the server's, not the request's.
        while (remaining := self._pause_until - time.monotonic()) > 0:
            self._sleep(remaining)

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            self.stats.retry_wait_s += seconds
        if self.stopped.wait(seconds):
            raise ClientStopped()

    def close(self) -> None:
        self.stopped.set()


def _json_or_none(data: bytes):
    try:
        return _loads(data)
    except (ValueError, UnicodeDecodeError):  # orjson's JSONDecodeError is a ValueError too
        return None


def error_message(data: bytes) -> str:
    body = _json_or_none(data)
    if isinstance(body, dict):
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        message = error.get("message") or error.get("detail")
        if message:
            return str(message)[:400]
    return data[:200].decode("utf-8", "replace")


def check_status(status: int, headers: dict, data: bytes, url: str, model: str) -> None:
    if status == 200:
        return
    detail = error_message(data)
    if status in (408, 409, 429) or status >= 500:
        kind = "rate_limited" if status == 429 else "timeout" if status == 408 else "server_error"
        raise TransientTeacherError(kind, f"HTTP {status}: {detail}", parse_retry_after(headers))
    if status in (401, 403):
        raise FatalTeacherError(f"the server at {url} refused the API key (HTTP {status}): {detail}",
                                "check the key in the variable named by teacher.served.api_key_env")
    if status == 404:
        raise FatalTeacherError(f"the server at {url} answered 404 for model {model!r}: {detail}",
                                "check teacher.server (it usually ends in /v1) and teacher.server_model")
    raise RejectedRequestError(f"http_{status}", f"HTTP {status}: {detail}")


# ----------------------------------------------------------------------------- answers


def parse_completion(answer, rows: list[list[int]], k: int) -> list[RowSignal]:
    """The sparse signal of each row from a completions answer; malformed answers are transient errors."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != len(rows):
        raise TransientTeacherError("invalid_response", f"expected {len(rows)} choices, got "
                                    f"{len(choices) if isinstance(choices, list) else 'none'}")
    try:
        ordered = sorted(choices, key=lambda choice: choice.get("index", 0))
        return [_row_signal(choice, len(row), k) for choice, row in zip(ordered, rows)]
    except MissingPromptLogprobs:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise TransientTeacherError("invalid_response", f"malformed prompt_logprobs ({type(err).__name__}: {err})") \
            from None


class MissingPromptLogprobs(TransientTeacherError):
    """The answer has no prompt_logprobs: the server does not support them (or dropped the field)."""

    def __init__(self):
        super().__init__("no_prompt_logprobs", "the answer holds no prompt_logprobs")


class TooFewLogprobs(TransientTeacherError):
    def __init__(self, got: int, k: int):
        super().__init__("too_few_logprobs", f"a position holds {got} log-probabilities, top_k is {k}")
        self.got = got


def _row_signal(choice: dict, length: int, k: int) -> RowSignal:
    prompt_logprobs = choice.get("prompt_logprobs")
    if not prompt_logprobs:
        raise MissingPromptLogprobs()
    if len(prompt_logprobs) != length:
        raise ValueError(f"prompt_logprobs covers {len(prompt_logprobs)} positions, the row has {length}")
    ids = np.full((length, k), -1, dtype=np.int64)
    logprobs = np.zeros((length, k), dtype=np.float32)
    if length > 1:
        pairs = [top_entries(entry, k) for entry in prompt_logprobs[1:]]
        ids[: length - 1] = [pair[0] for pair in pairs]
        logprobs[: length - 1] = [pair[1] for pair in pairs]
    last = _last_position(choice, k)
    if last is not None:
        ids[length - 1], logprobs[length - 1] = last
    np.maximum(logprobs, -1e30, out=logprobs)  # -inf (a masked token) would turn sums into NaN
    return RowSignal(ids, logprobs, tail_logmass(ids, logprobs))


def top_entries(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens of one prompt position ({id: {logprob, rank, ...}}), in any order.

    vLLM sends the top-k plus the prompt's own token when it is not among them: drop the extra
    entries by rank (ties share a rank), then by log-prob.
    """
    if len(entry) < k:
        raise TooFewLogprobs(len(entry), k)
    tokens = list(entry)
    values = [value["logprob"] for value in entry.values()]
    if len(tokens) > k:
        ranks = [value.get("rank") for value in entry.values()]
        if None in ranks:
            ranks = [0] * len(tokens)
        keep = sorted(range(len(tokens)), key=lambda i: (ranks[i], -values[i]))[:k]
        tokens, values = [tokens[i] for i in keep], [values[i] for i in keep]
    return [int(token) for token in tokens], values


def _last_position(choice: dict, k: int):
    """The distribution after the last prompt token: the generated token's top log-probs, keyed 'token_id:N'."""
    logprobs = choice.get("logprobs") or {}
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not top or not isinstance(top[0], dict) or len(top[0]) < k:
        return None
    items = []
    for key, value in top[0].items():
        if not str(key).startswith(TOKEN_ID_PREFIX):
            return None
        items.append((int(str(key)[len(TOKEN_ID_PREFIX):]), float(value)))
    items.sort(key=lambda item: -item[1])
    return [token for token, _ in items[:k]], [value for _, value in items[:k]]


def tail_logmass(ids: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum p_topk) per position (float64 inside); -inf when the top-k hold all the mass."""
    values = np.where(ids >= 0, logprobs.astype(np.float64), -np.inf)
    top = np.logaddexp.reduce(values, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log(-np.expm1(np.minimum(top, 0.0)))
    missing = (ids < 0).all(axis=1)  # no distribution at all: all mass in the tail
    tail[missing] = 0.0
    return tail.astype(np.float32)
