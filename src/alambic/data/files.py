"""Read records from JSONL, Parquet, CSV, or a `datasets` folder saved to disk.

Every reader returns a list of dicts and reports problems with the file (and
line, for JSONL) so a user can fix the data instead of guessing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from alambic.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    records = []
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {line_number} is not valid JSON ({err.msg} at column {err.colno})",
                    "each line of a JSONL file must be one JSON object; fix or remove that line",
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}: line {line_number} is a JSON {type(record).__name__}, not an object",
                    'write one object per line, e.g. {"text": "..."}',
                )
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def read_parquet(path: Path, limit: int | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({err})", "check that the file is a valid Parquet file") from None
    records = table.to_pylist()
    return records[:limit] if limit else records


def read_csv(path: Path, limit: int | None = None) -> list[dict]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        records = []
        for row in reader:
            records.append(dict(row))
            if limit is not None and len(records) >= limit:
                break
    return records


def read_saved_dataset(path: Path, limit: int | None = None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as err:
        raise DataError(
            f"{path}: is a folder but not a dataset saved with `save_to_disk` ({err})",
            "point data.train at a .jsonl/.parquet/.csv file or a folder written by Dataset.save_to_disk",
        ) from None
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records from a data file or saved dataset folder; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist", "check data.train / data.eval in the config")
    if path.is_dir():
        return read_saved_dataset(path, limit)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}",
            "use .jsonl, .parquet, .csv, or a folder saved with datasets' save_to_disk",
        )
    reader = {"jsonl": read_jsonl, "parquet": read_parquet, "csv": read_csv}[kind]
    try:
        return reader(path, limit)
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    except IsADirectoryError:
        raise DataError(f"data file {str(path)!r} is a folder", "point the config at a data file") from None


def not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    """The error for a data file that is not UTF-8 text (latin-1, binary, UTF-16)."""
    return DataError(
        f"{path}: is not UTF-8 text (undecodable byte {err.object[err.start:err.start + 1]!r} at offset {err.start})",
        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
    )
