"""Reading prompt files (JSONL, Parquet, CSV) with errors that name the file, line and column."""

from __future__ import annotations

import csv
import difflib
import json
from pathlib import Path

from alambic.errors import DataError

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def read_table(path: str | Path, file_format: str = "auto") -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file {str(path)!r} does not exist", "check input.path (relative to where you run)")
    if file_format == "auto":
        file_format = SUFFIX_FORMATS.get(path.suffix.lower())
        if file_format is None:
            raise DataError(f"cannot tell the format of {str(path)!r} from its suffix",
                            "name it .jsonl, .parquet or .csv, or set input.format")
    try:
        return _read_format(path, file_format)
    except UnicodeDecodeError as err:
        from alambic.data.files import not_utf8

        raise not_utf8(path, err) from None


def _read_format(path: Path, file_format: str) -> list[dict]:
    if file_format == "jsonl":
        return _read_jsonl(path)
    if file_format == "parquet":
        import pyarrow.parquet as parquet

        try:
            return parquet.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"cannot read Parquet file {str(path)!r}: {err}",
                            "check that the file is Parquet") from None
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{str(path)!r} line {number} is not valid JSON: {err.msg}",
                                "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{str(path)!r} line {number} is a {type(record).__name__}, not a JSON object",
                                "each line must be one JSON object, e.g. {\"prompt\": \"...\"}")
            records.append(record)
    return records


def require_columns(records: list[dict], columns: list[str], source: str, config_key: str) -> None:
    """Every record must have every column; the error names the first gap and the closest column."""
    if not records:
        raise DataError(f"{source} holds no records", "give a file with at least one record")
    for index, record in enumerate(records):
        for column in columns:
            if column not in record:
                available = sorted(record)
                close = difflib.get_close_matches(column, available, n=1)
                suggestion = f"; did you mean {close[0]!r}?" if close else ""
                raise DataError(
                    f"{source}: record {index} has no column {column!r}{suggestion} (columns: {', '.join(available)})",
                    f"set {config_key} to the column that holds it",
                )
