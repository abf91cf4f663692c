"""One run per output folder, and a clean folder to start from.

`hold_run_folder` takes the folder's exclusive lock before the folder is
inspected and keeps it until the run ends, so a second `alambic distill` on the
same folder (with or without --overwrite or --resume) is refused with exit 2,
naming the holder, and never resumes from, prunes, or deletes what the first is
writing. A run that fails before writing anything leaves the folder as it found
it (a folder it had to create is removed again).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from alambic.folder_lock import RUN_LOCK_NAME, FolderLock
from alambic.output_paths import check_output_folder, make_folder, remove_created

LOCK_NAME = RUN_LOCK_NAME


def is_main_launch_rank() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job (or a single process) holds the lock."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def hold_run_folder(output_dir: str | Path):
    folder = check_output_folder(output_dir, "train.output_dir")
    if not is_main_launch_rank():
        yield None
        return
    created = make_folder(folder)
    lock = FolderLock(
        folder, LOCK_NAME, f"output folder {str(folder)!r} is in use by another alambic run",
        "wait for that run to finish (or stop it), or choose another train.output_dir",
    )
    try:
        lock.acquire()
    except BaseException:
        remove_created(created)
        raise
    failed = False
    try:
        yield lock
    except BaseException:
        failed = True
        raise
    finally:
        lock.release(remove_file=failed)  # only a lock file this run created
        if failed:
            remove_created(created)  # only folders it created that are still empty


def _entries(folder: Path) -> list[Path]:
    """What the folder holds besides the lock file."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []


def folder_is_empty(folder: Path, ignore: tuple[str, ...] = ()) -> bool:
    """Nothing in it but the lock (and the `ignore` names)."""
    return not folder.exists() or all(p.name in ignore for p in _entries(folder))


def clear_folder(folder: Path) -> None:
    """--overwrite: delete the folder's contents but keep the lock this run holds."""
    for entry in _entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """What a killed earlier run left mid-write: `.NAME.tmp-*` files and folders (durable.py) and
    `.NAME.old-*` folders (the previous version, renamed aside while the new one went in).

    Only called while holding the folder's lock, so no live writer owns them. An `.old-` whose
    NAME is missing was killed between the two renames: it is the last complete version and
    goes back under its name.
    """
    removed = []
    for parent in (folder, folder / "checkpoints"):
        if not parent.is_dir():
            continue
        for entry in sorted(parent.iterdir()):
            name = entry.name
            if not name.startswith("."):
                continue
            if ".old-" in name:
                original = parent / name[1:name.rindex(".old-")]
                if not original.exists():
                    os.replace(entry, original)
                    continue
            elif ".tmp-" not in name:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
