"""Shared fixtures: the tiny LM setup (stdlib corpus, tokenizer, trained teacher) built once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """Corpus + byte-level BPE tokenizer + a 2-layer teacher trained briefly on stdlib source."""
    from alambic.testing import build_tiny_setup

    return build_tiny_setup(tmp_path_factory.mktemp("tiny"), teacher_steps=120)
