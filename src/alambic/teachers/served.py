"""A served teacher: top-k log-probabilities from an inference server, never loaded in the training job.

    teacher: {server: http://127.0.0.1:8000/v1, server_model: MODEL, top_k: 20}

The source sends each micro-batch's token ids to an OpenAI-compatible
completions endpoint with vLLM's `prompt_logprobs` (alambic.teachers.served_client)
and hands the loss the logit cache's sparse signal (top-k ids, log-probs, tail
mass), so every loss path that takes a cache -- the fused sparse loss included --
takes a served teacher, off-policy or on-policy (GKD: the student's samples are
scored by the server).

Pipelining: once per step the loop calls `prefetch(batches, upcoming, step)`;
the requests of this step's micro-batches and of up to `served.prefetch` upcoming
ones go out at once to `served.max_in_flight` worker threads, so the server
computes while the student does. `__call__` waits only for an answer not yet
back (that wait is measured: `served_teacher.json` in the run folder). A
request that fails is retried (generate's backoff and Retry-After); one that
keeps failing stops the run with TeacherServerDown (exit 3) before the step's
optimiser update, so the last checkpoint is intact and `--resume` continues.

Each process of a DDP run has its own source and sends its own rows: per
optimiser step, `grad_accum * ceil(batch_size / rows_per_request)` requests per
process, at most `max_in_flight` at a time, so a server sees up to
`world_size * max_in_flight` requests at once.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from alambic.errors import ConfigError
from alambic.teachers.base import SignalRequest, TeacherSignal
from alambic.teachers.served_client import ClientStopped, PromptLogprobClient, RowSignal, TeacherServerDown

STATS_FILE = "served_teacher.json"


class ServedTeacher:
    """A `TeacherSource` whose signal comes from a server: any rows, on-policy samples included."""

    def __init__(self, teacher_cfg, tokenizer, vocab_size: int, seed: int = 0):
        from alambic.config_served import ServedTeacherOptions

        options = teacher_cfg.served or ServedTeacherOptions()
        api_key = None
        if options.api_key_env is not None:
            from alambic.generate.backends.openai_backend import read_api_key

            api_key = read_api_key(options.api_key_env)
        self.client = PromptLogprobClient(teacher_cfg.server, teacher_cfg.server_model, teacher_cfg.top_k,
                                          timeout_s=options.timeout_s, retry=options.retry, api_key=api_key, seed=seed)
        self.options, self.tokenizer, self.vocab_size = options, tokenizer, vocab_size
        self.top_k, self.temperature = teacher_cfg.top_k, 1.0
        self.name = f"served teacher {teacher_cfg.server_model} at {self.client.url}"
        self.pending: OrderedDict[bytes, tuple[int, list[Future]]] = OrderedDict()
        self.train_data, self.max_steps, self.stream = None, None, None
        self.wait_s, self.calls, self.first_call, self.last_return = 0.0, 0, None, None
        self._jobs: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._failure: BaseException | None = None  # the first request that failed for good

    # ------------------------------------------------------------------ before training

    def bind(self, train_data, config=None, tokenizer=None) -> None:
        """Check the server (reachable, model, prompt logprobs, top_k, tokenizer) before anything is written."""
        from alambic.teachers.served_identity import check_server

        if config is not None:
            self.max_steps = config.train.max_steps
        self.train_data = train_data
        sample = [list(train_data[0]["input_ids"])] if len(train_data) else []
        max_length = config.data.max_length if config is not None else 0
        check_server(self.client, self.tokenizer, self.vocab_size, sample, max_length, self.options.check_tokens)
        if self.options.stream_cache is not None:
            self._open_stream(train_data)

    def _open_stream(self, train_data) -> None:
        import os

        from alambic.teachers.served_cache import StreamCacheWriter

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("teacher.served.stream_cache writes one cache folder from one process, "
                              "this run has several", "stream the cache in a single-process run, or drop it")
        self.stream = StreamCacheWriter(self.options.stream_cache, train_data, self.tokenizer, self.client.model,
                                        self.top_k, self.vocab_size, self.options.stream_cache_value_bits,
                                        self.options.stream_cache_shard_rows)

    # ------------------------------------------------------------------ requests

    def _start_workers(self) -> None:
        while len(self._workers) < self.options.max_in_flight:
            worker = threading.Thread(target=self._work, daemon=True, name=f"served-teacher-{len(self._workers)}")
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        while True:
            rows, future = self._jobs.get()
            if future is None:  # closed
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.client.score(rows))
            except ClientStopped:
                future.set_exception(TeacherServerDown("the served teacher was closed", None))
            except BaseException as err:  # noqa: BLE001 - handed to the loop, which raises it
                self._failure = self._failure or err
                self.client.close()  # the server is down: stop every other retry too
                future.set_exception(err)

    def _submit(self, rows: list[list[int]], step: int) -> bytes:
        key = batch_key(rows)
        if key not in self.pending:
            self._start_workers()
            size = self.options.rows_per_request or max(1, len(rows))
            futures = []
            for start in range(0, len(rows), size):
                future: Future = Future()
                self._jobs.put((rows[start : start + size], future))
                futures.append(future)
            self.pending[key] = (step, futures)
        return key

    def prefetch(self, batches: list[dict], upcoming, step: int) -> None:
        """Send this step's micro-batches and up to `prefetch` upcoming ones (`upcoming(s)`: row indices per micro-batch)."""
        for key in [k for k, (s, _) in self.pending.items() if s < step]:  # never used (e.g. replaced by a rollout)
            for future in self.pending.pop(key)[1]:
                future.cancel()
        for batch in batches:
            self._submit(batch_rows(batch), step)
        budget, ahead = self.options.prefetch, step + 1
        while budget > 0 and self.train_data is not None and (self.max_steps is None or ahead <= self.max_steps):
            for indices in upcoming(ahead)[:budget]:
                self._submit([list(self.train_data[i]["input_ids"]) for i in indices], ahead)
                budget -= 1
            ahead += 1

    # ------------------------------------------------------------------ the signal

    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal:
        if request.hidden_states or request.attentions:
            raise ConfigError("a served teacher returns top-k log-probabilities, not hidden states or attentions",
                              "use a live teacher (teacher.model) for representation-transfer losses")
        rows = batch_rows(batch)
        key = batch_key(rows)
        if key not in self.pending:
            self._submit(rows, -1)
        _, futures = self.pending.pop(key)
        started = time.perf_counter()
        self.first_call = self.first_call or started
        try:
            signals = [signal for future in futures for signal in future.result()]
        except TeacherServerDown as err:
            self.close()
            raise (self._failure or err) from None
        self.wait_s += time.perf_counter() - started
        self.calls += 1
        if self.stream is not None and "row_index" in batch:
            for row, ids, signal in zip(batch["row_index"].tolist(), rows, signals):
                if self.stream.wants(row, ids):
                    self.stream.add(row, signal.ids, signal.logprobs, signal.tail)
        result = pad_signals(signals, batch["input_ids"].shape[1], self.top_k, batch["input_ids"].device)
        self.last_return = time.perf_counter()
        return result

    # ------------------------------------------------------------------ after training

    def finish(self, student=None, run_dir=None) -> None:
        """Complete the streamed cache (requesting the rows not seen) and write the request statistics."""
        if self.stream is not None and self.options.complete_stream_cache:
            missing = self.stream.missing_rows()
            size = self.options.rows_per_request or 8
            for start in range(0, len(missing), size):
                chunk = missing[start : start + size]
                signals = self.client.score([list(self.train_data[r]["input_ids"]) for r in chunk])
                for row, signal in zip(chunk, signals):
                    self.stream.add(row, signal.ids, signal.logprobs, signal.tail)
        if run_dir is not None:
            from alambic.durable import atomic_write_json

            atomic_write_json(Path(run_dir) / STATS_FILE, self.summary(), indent=1)
        self.close()

    def summary(self) -> dict:
        from alambic.redact import redact_text

        span = (self.last_return - self.first_call) if self.first_call and self.last_return else 0.0
        return {
            "server": redact_text(self.client.url), "model": self.client.model, "top_k": self.top_k, "calls": self.calls,
            "wait_s": round(self.wait_s, 4), "span_s": round(span, 4),
            "wait_fraction": round(self.wait_s / span, 4) if span > 0 else None,
            "stream_cache": None if self.stream is None else {"folder": str(self.stream.folder),
                                                              "complete": self.stream.complete},
            **self.client.stats.as_dict(),
        }

    def close(self) -> None:
        self.client.close()
        for _, futures in self.pending.values():
            for future in futures:
                future.cancel()
        self.pending.clear()
        for _ in self._workers:
            self._jobs.put((None, None))
        self._workers = []


def batch_rows(batch: dict) -> list[list[int]]:
    """Each row's token ids without padding."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def batch_key(rows: list[list[int]]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        array = np.asarray(row, dtype="<i8")
        digest.update(np.int64(array.size).tobytes())
        digest.update(array.tobytes())
    return digest.digest()


def pad_signals(signals: list[RowSignal], length: int, k: int, device) -> TeacherSignal:
    """[B, L, k] tensors; positions past a row's end hold what the cache reader puts there (uniform, no tail)."""
    ids = np.broadcast_to(np.arange(k, dtype=np.int64), (len(signals), length, k)).copy()
    logprobs = np.full((len(signals), length, k), -np.log(k), dtype=np.float32)
    tail = np.full((len(signals), length), -np.inf, dtype=np.float32)
    for i, signal in enumerate(signals):
        n = signal.ids.shape[0]
        ids[i, :n], logprobs[i, :n], tail[i, :n] = signal.ids, signal.logprobs, signal.tail
    return TeacherSignal(
        topk_ids=torch.from_numpy(ids).to(device), topk_logprobs=torch.from_numpy(logprobs).to(device),
        tail_logmass=torch.from_numpy(tail).to(device), temperature=1.0,
    )
