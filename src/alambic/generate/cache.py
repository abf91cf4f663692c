"""The durable request cache: every teacher answer is appended and fsynced the moment it arrives.

One JSON line per finished request (`status` ok or failed), keyed by a hash of
(teacher identity, messages, sampling parameters, sample index). A run killed
at any moment loses at most the answers still in flight: an answer is
acknowledged to the runner only after its line is on disk, and a restart never
sends a request whose `ok` line is there. A torn last line (kill during the
write) is cut off on open; it was never acknowledged.

The folder holds a manifest with the teacher and sampling it was written with;
opening it with different ones is refused, so answers from two teachers never
end up in one dataset.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

from alambic.durable import atomic_write_bytes, fsync_dir
from alambic.errors import ConfigError, DataError
from alambic.folder_lock import FolderLock

CACHE_FORMAT = 1
RECORDS_FILE = "requests.jsonl"
MANIFEST_FILE = "manifest.json"


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def fingerprint_of(identity: dict, params: dict) -> str:
    return hashlib.sha256(canonical_json({"teacher": identity, "sampling": params}).encode()).hexdigest()


def request_key(fingerprint: str, messages, sample_index: int) -> str:
    """The cache key: the fingerprint already covers backend, model and sampling parameters."""
    payload = canonical_json({"fingerprint": fingerprint, "messages": list(messages), "sample": sample_index})
    return hashlib.sha256(payload.encode()).hexdigest()


def _holds_an_answer(records_path: Path) -> bool:
    """Whether the cache file has at least one `ok` line (a torn or unreadable line counts as none)."""
    if not records_path.exists():
        return False
    with open(records_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                if json.loads(line).get("status") == "ok":
                    return True
            except (json.JSONDecodeError, AttributeError):
                continue
    return False


class RequestCache:
    """Append-only JSONL of finished requests, with group commit for concurrent writers."""

    def __init__(self, folder: str | Path, identity: dict, params: dict, replace_foreign: bool = False):
        self.folder = Path(folder)
        self.identity = identity
        self.params = params
        self.fingerprint = fingerprint_of(identity, params)
        self.records: dict[str, dict] = {}
        self._descriptor: int | None = None
        self._lock_handle = None
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future] = []
        self._flusher: asyncio.Task | None = None
        self._write_failure: DataError | None = None
        try:
            self._open(replace_foreign)
        except BaseException:
            self.close()  # a refused cache must not keep the folder locked
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, replace_foreign: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        manifest_path = self.folder / MANIFEST_FILE
        records_path = self.folder / RECORDS_FILE
        if manifest_path.exists() or records_path.exists():
            stored = self._read_manifest(manifest_path)
            if stored.get("fingerprint") != self.fingerprint:
                # A cache without a single answer (a run that failed: server down, model missing) pins nothing.
                if not replace_foreign and _holds_an_answer(records_path):
                    raise ConfigError(self._mismatch_message(stored), self._mismatch_hint())
                self._move_aside()
        if not manifest_path.exists():
            manifest = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "teacher": self.identity,
                        "sampling": self.params, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
        self._load(records_path)
        self._descriptor = os.open(records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fsync_dir(self.folder)

    def _take_lock(self) -> None:
        # flock dies with the process, so a kill -9 never leaves a stale lock behind.
        self._lock_handle = FolderLock(
            self.folder, "lock", f"another `alambic generate` is writing the cache in {str(self.folder)!r}",
            "wait for it to finish or stop it; two runs must not share one output.dir",
        ).acquire()

    def _read_manifest(self, path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _mismatch_message(self, stored: dict) -> str:
        if not stored:
            return (f"the request cache in {str(self.folder)!r} has no readable manifest; "
                    "it was not written by this config")
        changed = [f"teacher.{k}" for k in sorted(set(stored.get("teacher", {})) | set(self.identity))
                   if stored.get("teacher", {}).get(k) != self.identity.get(k)]
        changed += [f"sampling.{k}" for k in sorted(set(stored.get("sampling", {})) | set(self.params))
                    if stored.get("sampling", {}).get(k) != self.params.get(k)]
        what = ", ".join(changed) or "its fingerprint"
        return f"the request cache in {str(self.folder)!r} was written by a different config (changed: {what})"

    def _mismatch_hint(self) -> str:
        return "use a new output.dir, restore the old settings, or pass --new-cache to move the old cache aside"

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        archive, number = self.folder / f"replaced-{stamp}", 1
        while archive.exists():  # two replacements within one second
            archive, number = self.folder / f"replaced-{stamp}-{number}", number + 1
        archive.mkdir()
        for name in (MANIFEST_FILE, RECORDS_FILE):
            if (self.folder / name).exists():
                os.replace(self.folder / name, archive / name)
        fsync_dir(self.folder)

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        data = path.read_bytes()
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data):
            # The tail was being written when the process died; it was never acknowledged.
            os.truncate(path, complete_end)
        for number, line in enumerate(data[:complete_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(
                    f"request cache {str(path)!r} line {number} is corrupt",
                    "move the file away to start over, or delete that line (its request will be sent again)",
                ) from None
            self._remember(record)

    def _remember(self, record: dict) -> None:
        previous = self.records.get(record["key"])
        # An answer is never replaced by a later failure of the same request.
        if previous is None or previous["status"] != "ok" or record["status"] == "ok":
            self.records[record["key"]] = record

    # ------------------------------------------------------------------ queries

    def answered(self, key: str) -> bool:
        record = self.records.get(key)
        return record is not None and record["status"] == "ok"

    def failed(self, key: str) -> bool:
        record = self.records.get(key)
        return record is not None and record["status"] == "failed"

    # ------------------------------------------------------------------ writing

    def append_nowait(self, record: dict) -> asyncio.Future:
        """Queue `record`; the future resolves once it is on disk (records queued together share one fsync)."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(lambda done: None if done.cancelled() or done.exception() else self._remember(record))
        self._pending.append(line)
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_pending())
        return waiter

    async def append(self, record: dict) -> None:
        """Return once `record` is on disk."""
        await self.append_nowait(record)

    async def _flush_pending(self) -> None:
        while self._pending:
            lines, waiters = self._pending, self._waiters
            self._pending, self._waiters = [], []
            if self._write_failure is None:
                try:
                    await asyncio.to_thread(self._write_durably, b"".join(lines))
                except OSError as err:
                    # A partial write may have left a torn line: nothing more may be appended after it.
                    self._write_failure = DataError(
                        f"cannot write the request cache in {str(self.folder)!r}: {err.strerror}",
                        "free disk space or fix permissions, then run again; stored answers are kept",
                    )
            for waiter in waiters:
                if waiter.done():
                    continue
                if self._write_failure is not None:
                    waiter.set_exception(self._write_failure)
                else:
                    waiter.set_result(None)

    def _write_durably(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._descriptor, view)
            view = view[written:]
        os.fsync(self._descriptor)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._lock_handle is not None:
            self._lock_handle.release()
            self._lock_handle = None
