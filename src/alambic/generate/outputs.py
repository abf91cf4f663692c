"""Writing result tables (JSONL or Parquet) atomically: a reader never sees half a file."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from alambic.durable import atomic_write_bytes


def write_table(path: Path, rows: list[dict], file_format: str) -> Path:
    """Write `rows` to `path` with the format's suffix; returns the final path."""
    target = path.with_suffix(".parquet" if file_format == "parquet" else ".jsonl")
    if file_format == "parquet":
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        buffer = io.BytesIO()
        table = arrow.Table.from_pylist(rows) if rows else arrow.table({})
        parquet.write_table(table, buffer)
        atomic_write_bytes(target, buffer.getvalue())
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_bytes(target, text.encode("utf-8"))
    return target


def write_json(path: Path, payload: dict) -> Path:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def to_student_format(record: dict, student_format: str) -> dict:
    """prompt/completion columns as they are, or folded into a two-turn `messages` list."""
    if student_format == "prompt_completion":
        return record
    rest = {key: value for key, value in record.items() if key not in ("prompt", "completion")}
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return {"messages": messages, **rest}


def remove_stale(path: Path) -> None:
    """Drop the other format's file so a folder never holds two disagreeing outputs."""
    for suffix in (".jsonl", ".parquet"):
        candidate = path.with_suffix(suffix)
        if candidate.exists():
            os.remove(candidate)
