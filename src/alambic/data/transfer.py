"""Transfer sets: a labelled pool and an unlabelled pool mixed in one training set.

`data.train` is the labelled pool (a classification row may still lack its label:
a missing, null or empty label makes it unlabelled). `data.unlabelled` is a second
file whose rows never count as labelled, whatever columns they hold: the teacher
labels them (soft or hard targets) and the hard-label CE never sees them.

Sampling: the training set is the labelled pool repeated `data.labelled_repeat`
times followed by the unlabelled pool; every epoch is one seeded shuffle of that
whole list (training/batches.py). A batch therefore holds labelled and unlabelled
rows in proportion to the pools' sizes (times the repeat): with 200 labelled rows,
`labelled_repeat: 4` and 1,800 unlabelled rows, about 800 / 2,600 = 31% of each
batch is labelled.

Without a teacher an unlabelled row has nothing to learn from: such rows are
dropped before training (a note says how many).

    alambic distill configs/classify_transfer.yaml
"""

from __future__ import annotations

from alambic.errors import DataError

IGNORE = -100


def label_or_ignore(record: dict, column: str):
    """The record's label, or IGNORE when it has none (missing, null or empty)."""
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return IGNORE
    return value


def mark_unlabelled(rows: list[dict], data_cfg) -> list[dict]:
    """Rows of the unlabelled pool: classification labels become IGNORE, LM rows lose their CE term."""
    for row in rows:
        if "label" in row:
            row["label"] = IGNORE
        else:
            row["hard"] = False
    return rows


def read_unlabelled(data_cfg, tokenizer, tokenize_records, read_records) -> tuple[list[dict], list[dict]]:
    """(records, tokenized rows) of data.unlabelled, or empty lists when there is none."""
    if data_cfg.unlabelled is None:
        return [], []
    if data_cfg.packing:
        raise DataError("data.unlabelled cannot be packed: packed blocks mix labelled and unlabelled rows",
                        "set data.packing: false")
    records = read_records(data_cfg.unlabelled, data_cfg.limit)
    if not records:
        raise DataError(f"unlabelled dataset {data_cfg.unlabelled!r} is empty",
                        "point data.unlabelled at a file with records, or remove it")
    if data_cfg.format == "classification":
        records = [{k: v for k, v in r.items() if k != data_cfg.label_column} for r in records]
    rows = tokenize_records(records, tokenizer, data_cfg, data_cfg.unlabelled)
    return records, mark_unlabelled(rows, data_cfg)


def has_gold(row: dict) -> bool:
    return row.get("label", 0) != IGNORE and row.get("hard", True)


def drop_unlabelled_without_teacher(train_data, teacher, announce=print):
    """Without any teacher signal, rows with no gold label carry no loss: drop them (and say so)."""
    if teacher is not None:
        return train_data
    kept = [row for row in train_data.rows if has_gold(row)]
    dropped = len(train_data.rows) - len(kept)
    if dropped == 0:
        return train_data
    if not kept:
        raise DataError(
            f"no training row of {train_data.source!r} has a label and the run has no teacher",
            "add a teacher section (it labels the rows), or give labelled rows",
        )
    announce(f"note: {dropped} of {len(train_data.rows)} training rows have no label and there is no teacher: "
             "they are left out")
    train_data.rows = kept
    return train_data


def pool_counts(rows: list[dict]) -> dict[str, int]:
    labelled = sum(1 for row in rows if has_gold(row))
    return {"labelled": labelled, "unlabelled": len(rows) - labelled}


def texts_hash(records: list[dict], data_cfg) -> str:
    """sha256 of the input text of every record, in order (the rows a classification logit cache covers)."""
    import hashlib
    import json

    column = data_cfg.text_column
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.get(column), default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:32]
