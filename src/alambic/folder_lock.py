"""One writer per folder: an exclusive lock that names its holder and dies with it.

`alambic distill` holds its run folder's lock for the whole run, `alambic
generate` its request cache's. The lock is `flock` on a small file in the
folder: the kernel releases it when the holding process exits for any reason
(kill -9 included), so a lock left by a dead process is never "stale" - the
next run simply takes it. The file's content (pid, host, start time, command)
is only information, shown to whoever is refused.

flock is per host: two machines sharing a network file system are not kept
apart by it (see docs/reliability.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from alambic.errors import ConfigError

RUN_LOCK_NAME = ".alambic-lock"  # the lock file `alambic distill` keeps in its run folder


def _holder_info() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["alambic", *sys.argv[1:2]]),
    }


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']} ({info.get('command', '?')})"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


class FolderLock:
    """`with FolderLock(folder, "lock", message, hint):` - or acquire() / release()."""

    def __init__(self, folder: str | Path, file_name: str, message: str, hint: str):
        self.path = Path(folder) / file_name
        self.message = message
        self.hint = hint
        self._handle = None
        self.created_file = False

    def acquire(self) -> "FolderLock":
        self.created_file = not self.path.exists()
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            raise ConfigError(f"{self.message}: it is locked by {holder}", self.hint) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder_info()) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self, remove_file: bool = False) -> None:
        """Give the lock up; `remove_file` deletes the lock file first (only if this run created it)."""
        if self._handle is None:
            return
        if remove_file and self.created_file:
            self.path.unlink(missing_ok=True)
        self._handle.close()  # closing the descriptor releases the flock
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
