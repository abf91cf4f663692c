"""Tokenized datasets, packing, the train/eval split, and collation.

Rows are plain dicts of token lists, held in memory and indexed by position, so
the loop can resume at any sample without replaying a data pipeline and every
rank of a DDP run can compute the token counts of a global batch by itself.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

from alambic.config import DataConfig
from alambic.data.files import read_records
from alambic.data.formats import ENCODERS, IGNORE
from alambic.data.soft_targets import collate_soft_targets, report_soft_targets
from alambic.data.transfer import read_unlabelled, texts_hash
from alambic.errors import DataError


@dataclass
class TokenizedDataset:
    rows: list[dict]
    fingerprint: str
    source: str
    records_hash: str = ""  # the texts of the rows, in order, whatever the tokenizer (class-logit caches)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def loss_tokens(self, index: int) -> int:
        """Positions of row `index` that carry a loss (next-token labels, or 1 per classified row)."""
        row = self.rows[index]
        if "label" in row:
            return 1
        return sum(1 for label in row["labels"][1:] if label != IGNORE)


def pack_rows(rows: list[dict], block_length: int) -> list[dict]:
    """Concatenate documents into blocks of `block_length` tokens.

    position_ids restart at 0 for each document; the loop passes them without
    an attention mask so transformers builds a block-diagonal causal mask and no
    token attends across a document boundary. The first token of each document
    gets no label: predicting it from the previous document would be noise.
    """
    stream_ids, stream_labels, stream_positions = [], [], []
    for row in rows:
        stream_ids.extend(row["input_ids"])
        stream_labels.extend([IGNORE, *row["labels"][1:]])
        stream_positions.extend(range(len(row["input_ids"])))
    return [
        {
            "input_ids": stream_ids[start : start + block_length],
            "labels": stream_labels[start : start + block_length],
            "position_ids": stream_positions[start : start + block_length],
        }
        for start in range(0, len(stream_ids), block_length)
    ]


def _fingerprint(records: list[dict], data_cfg: DataConfig, tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(data_cfg.model_dump(mode="json", exclude={"train", "eval", "unlabelled"}),
                             sort_keys=True).encode())
    digest.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    digest.update(str(len(tokenizer)).encode())
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def tokenize_records(records: list[dict], tokenizer, data_cfg: DataConfig, source: str) -> list[dict]:
    encode = ENCODERS[data_cfg.format]
    rows, soft_statuses = [], []
    for index, record in enumerate(records):
        row = encode(record, tokenizer, data_cfg, source, index)
        if "soft_targets" in row:
            soft_statuses.append(row.pop("soft_targets"))
        if data_cfg.weight_column is not None:
            row["weight"] = float(record.get(data_cfg.weight_column, 1.0))
        rows.append(row)
    if soft_statuses:
        report_soft_targets(soft_statuses, source, data_cfg.logprobs_column)
    if data_cfg.packing:
        if data_cfg.format == "classification":
            raise DataError("data.packing does not apply to classification", "set data.packing: false")
        rows = pack_rows(rows, data_cfg.max_length)
    # Rows with no token to learn from would only dilute the batch.
    keep = [r for r in rows if "label" in r or any(label != IGNORE for label in r["labels"][1:])]
    return keep


def build_datasets(data_cfg: DataConfig, tokenizer, task: str = "causal_lm", seed: int = 0):
    """(train, eval or None) TokenizedDatasets from the config's files."""
    records = read_records(data_cfg.train, data_cfg.limit)
    if not records:
        raise DataError(f"dataset {data_cfg.train!r} is empty", "point data.train at a file with records")
    eval_records = None
    if data_cfg.eval is not None:
        eval_records = read_records(data_cfg.eval, data_cfg.limit)
        if not eval_records:
            raise DataError(f"eval dataset {data_cfg.eval!r} is empty", "point data.eval at a file with records")
    elif data_cfg.eval_fraction > 0:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(round(len(records) * data_cfg.eval_fraction)))
        eval_records = [records[i] for i in sorted(order[:n_eval])]
        records = [records[i] for i in sorted(order[n_eval:])]
    train_rows = tokenize_records(records, tokenizer, data_cfg, data_cfg.train)
    if not train_rows:
        raise DataError(
            f"dataset {data_cfg.train!r} is empty after tokenization and filtering "
            "(no record has a token that carries a loss)",
            "check the columns and data.format; with prompt_completion, completions must be non-empty",
        )
    # A transfer set: the labelled pool (repeated) then the unlabelled pool (data/transfer.py says how they mix).
    unlabelled_records, unlabelled_rows = read_unlabelled(data_cfg, tokenizer, tokenize_records, read_records)
    train_rows = [dict(row) for _ in range(data_cfg.labelled_repeat) for row in train_rows] + unlabelled_rows
    fingerprint = _fingerprint(records + [{"__unlabelled__": r} for r in unlabelled_records], data_cfg, tokenizer)
    train = TokenizedDataset(train_rows, fingerprint, data_cfg.train,
                             texts_hash(records * data_cfg.labelled_repeat + unlabelled_records, data_cfg))
    evaluation = None
    if eval_records is not None:
        eval_source = data_cfg.eval or f"{data_cfg.train} (held-out {data_cfg.eval_fraction:.0%})"
        eval_rows = tokenize_records(eval_records, tokenizer, data_cfg, eval_source)
        if not eval_rows:
            raise DataError(f"eval dataset {eval_source!r} is empty after tokenization and filtering")
        evaluation = TokenizedDataset(eval_rows, _fingerprint(eval_records, data_cfg, tokenizer), eval_source)
    return train, evaluation


def collate(rows: list[dict], pad_token_id: int, row_indices: list[int] | None = None) -> dict:
    """Right-pad a list of rows into tensors; padding never carries a label."""
    batch_size = len(rows)
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    else:
        labels = torch.full((batch_size, length), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = torch.tensor(row["labels"], dtype=torch.long)
        batch["labels"] = labels
    if "position_ids" in rows[0]:
        positions = torch.zeros((batch_size, length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["position_ids"])
            positions[i, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
            positions[i, n:] = torch.arange(length - n)  # padding forms its own "document"
        batch["position_ids"] = positions
    if any("hard" in r for r in rows):  # causal LM rows of an unlabelled pool: no CE term
        batch["has_label"] = torch.tensor([bool(r.get("hard", True)) for r in rows], dtype=torch.bool)
    if "weight" in rows[0]:
        batch["weight"] = torch.tensor([r.get("weight", 1.0) for r in rows], dtype=torch.float32)
    if any("topk_ids" in r for r in rows):  # teacher logprobs stored in the records (data.logprobs_column)
        batch.update(collate_soft_targets(rows, length))
    if row_indices is not None:
        batch["row_index"] = torch.tensor(row_indices, dtype=torch.long)
    return batch
