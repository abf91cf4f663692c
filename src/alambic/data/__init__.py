"""Data: reading files, formats (text, prompt/completion, chat, classification), packing, collation."""

from alambic.data.datasets import TokenizedDataset, build_datasets, collate, pack_rows, tokenize_records
from alambic.data.files import read_records
from alambic.data.formats import IGNORE

__all__ = ["IGNORE", "TokenizedDataset", "build_datasets", "collate", "pack_rows", "read_records", "tokenize_records"]
