"""Durable writes: the one place that knows how to put a file or a folder on disk atomically.

Every writer of a long job goes through here, so a run killed at any moment
leaves either the previous version of a file (or folder) or the new one, whole,
never a torn one:

- `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json`: a hidden
  temporary sibling is written, fsynced, renamed over the target, and the
  parent folder is fsynced so the rename itself survives a power cut.
- `atomic_dir(final)`: a context manager that yields a hidden temporary sibling
  folder to fill (e.g. with `save_pretrained`); on success every file in it is
  fsynced and it is renamed into place (an existing `final` is moved aside
  first and removed only after the new one is in place); on any exception the
  temporary folder is removed and `final` is left as it was.

    python -c "from alambic.durable import atomic_write_json; atomic_write_json('/tmp/x.json', {'a': 1})"
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

Chunk = bytes | bytearray | memoryview

# What a killed writer can leave behind: `folder.glob(TEMPORARY_GLOB)` finds it for clean-up.
TEMPORARY_GLOB = ".*.tmp-*"


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (creations, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: Chunk | Iterable[Chunk]) -> None:
    """Write `data` (bytes, or an iterable of byte chunks) to `path` whole or not at all."""
    path = Path(path)
    temporary = _temporary_sibling(path, "tmp")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with open(temporary, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole UTF-8 text file or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload, indent: int | None = 2, **dumps) -> None:
    """Write `payload` as JSON (newline-terminated) whole or nothing."""
    atomic_write_text(path, json.dumps(payload, indent=indent, **dumps) + "\n")


def _fsync_tree(folder: Path) -> None:
    for root, _folders, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


@contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final_path`; publish it as `final_path` if the block succeeds.

    An existing `final_path` is replaced only once the new folder is complete:
    it is renamed aside, the new folder renamed in, and the old one deleted.
    A crash between those two renames leaves the old folder whole under its
    hidden `.old-` name, never a mix of the two.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(final, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        _publish(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _publish(temporary: Path, final: Path) -> None:
    old = None
    if final.exists() or final.is_symlink():
        old = _temporary_sibling(final, "old")
        os.replace(final, old)
    try:
        os.replace(temporary, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
