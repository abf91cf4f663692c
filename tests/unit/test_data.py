"""Data formats, masks, packing and collation on a tiny tokenizer built in code."""

import json

import pytest
import torch

from alambic.config import DataConfig
from alambic.data import IGNORE, build_datasets, collate, pack_rows, read_records
from alambic.data.stdlib_corpus import build_tokenizer
from alambic.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, the answer is 42"], vocab_size=300)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_prompt_completion_masks_the_prompt(tokenizer, tmp_path):
    train = _write(tmp_path / "pc.jsonl", [{"prompt": "hello world", "completion": " the answer is 42"}])
    rows, _ = build_datasets(DataConfig(train=train, format="prompt_completion"), tokenizer)
    row = rows[0]
    prompt_len = 1 + len(tokenizer("hello world", add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert rows.loss_tokens(0) == len(row["input_ids"]) - prompt_len
    with_prompt, _ = build_datasets(DataConfig(train=train, format="prompt_completion", train_on_prompt=True), tokenizer)
    assert with_prompt[0]["labels"] == with_prompt[0]["input_ids"]


def test_chat_messages_loss_only_on_assistant_tokens(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the answer is 42"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "42"},
    ]
    train = _write(tmp_path / "chat.jsonl", [{"messages": messages}])
    rows, _ = build_datasets(DataConfig(train=train, format="messages"), tokenizer)
    row = rows[0]
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    text = tokenizer.decode(labelled)
    assert "the answer is 42" in text and "42" in text
    assert "hello world" not in text and "be brief" not in text and "again" not in text


def test_packing_restarts_positions_and_never_labels_a_document_start(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
            {"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]}]
    blocks = pack_rows(rows, block_length=4)
    assert [b["input_ids"] for b in blocks] == [[5, 6, 7, 8], [9, 10, 11, 12], [13]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 0], [1, 0, 1, 2], [3]]
    assert blocks[0]["labels"] == [IGNORE, 6, 7, IGNORE]
    assert blocks[1]["labels"] == [9, IGNORE, 11, 12]


def test_packed_attention_is_block_diagonal():
    """A token's output must not change when an earlier, different document changes."""
    from alambic.testing import tiny_llama
    from alambic.models.module import StudentModule

    model = StudentModule(tiny_llama(50, hidden=32, layers=1, heads=2)).eval()
    rows_a = pack_rows([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}], 6)
    rows_b = pack_rows([{"input_ids": [9, 9, 9], "labels": [9, 9, 9]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}], 6)
    outputs = []
    for rows in (rows_a, rows_b):
        batch = collate(rows, pad_token_id=0)
        with torch.no_grad():
            outputs.append(model(batch["input_ids"], None, batch["position_ids"])["logits"][0, 3:])
    torch.testing.assert_close(outputs[0], outputs[1])


def test_collate_pads_right_and_padding_has_no_label():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [IGNORE]}], 0, [7, 9])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE] * 3]
    assert batch["row_index"].tolist() == [7, 9]


def test_readers_parquet_csv_and_saved_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    records = [{"text": "a"}, {"text": "b"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text\na\nb\n")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "d.csv", "saved"):
        assert read_records(tmp_path / path) == records
    with pytest.raises(DataError, match="unknown data format"):
        read_records(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("a") else None


def test_eval_fraction_splits_disjointly_and_deterministically(tokenizer, tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"text": f"hello {i} world"} for i in range(20)])
    config = DataConfig(train=train, eval_fraction=0.25)
    first_train, first_eval = build_datasets(config, tokenizer, seed=3)
    second_train, second_eval = build_datasets(config, tokenizer, seed=3)
    assert len(first_eval) == 5 and len(first_train) == 15
    assert [r["input_ids"] for r in first_eval] == [r["input_ids"] for r in second_eval]
    train_texts = {tuple(r["input_ids"]) for r in first_train}
    assert not any(tuple(r["input_ids"]) in train_texts for r in first_eval)
