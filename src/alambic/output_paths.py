"""Check an output path before any work starts: a command that can't write its result fails first.

Every command that writes a folder or file calls `check_output_folder` /
`check_output_file` right after its config is read, so a path that is a file,
lies under a file, or sits on a read-only place gives a clear exit-2 message
and nothing is computed or written.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from alambic.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and not current.is_symlink():
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_writable_folder(folder: Path, path: Path, key: str) -> None:
    """The permission bits do not bind root and a read-only mount ignores them: try it."""
    try:
        probe = tempfile.mkdtemp(prefix=".alambic-probe-", dir=folder)
        os.rmdir(probe)
    except OSError as err:
        raise ConfigError(
            f"{key} {str(path)!r} cannot be written: {str(folder)!r} is not writable ({err.strerror})",
            f"choose a {key} in a folder you can write",
        ) from None


def check_output_folder(path: str | Path, key: str) -> Path:
    """`path` is, or can become, a writable folder; `key` names the setting (e.g. train.output_dir)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{key} {str(path)!r} is a file, not a folder",
            f"choose another {key} (a folder, existing or not), or move the file away",
        )
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(
            f"{key} {str(path)!r} lies under {str(existing)!r}, which is a file",
            f"choose a {key} whose parent folders are folders",
        )
    _check_writable_folder(existing, path, key)
    return path


def check_output_file(path: str | Path, key: str) -> Path:
    """`path` is, or can become, a writable file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key} {str(path)!r} is a folder, not a file", f"give {key} a file name")
    check_output_folder(path.parent, f"the folder of {key}")
    return path


def make_folder(path: str | Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last), for `remove_created` on failure."""
    path = Path(path)
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    """Undo `make_folder` after a failure: remove the folders it made, if they are still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_output_dir(final_path: str | Path):
    """`durable.atomic_dir`, and the parent folders it had to create are removed again on failure."""
    from alambic.durable import atomic_dir

    created = make_folder(Path(final_path).parent)
    try:
        with atomic_dir(final_path) as temporary:
            yield temporary
    except BaseException:
        remove_created(created)
        raise
