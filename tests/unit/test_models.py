"""Tokenizer compatibility and model loading rules."""

import pytest

from alambic.data.stdlib_corpus import build_tokenizer
from alambic.errors import ModelError
from alambic.models import check_tokenizers_compatible, resolve_model_source
from alambic.testing import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["import os\nprint(os.getcwd())\n" * 10], vocab_size=280)


def test_padding_rows_in_the_embedding_are_allowed(tokenizer):
    teacher = tiny_llama(len(tokenizer) + 24, hidden=32, layers=1, heads=2)  # vocab padded to a multiple
    student = tiny_llama(len(tokenizer), hidden=32, layers=1, heads=2)
    assert check_tokenizers_compatible(tokenizer, tokenizer, teacher, student) == len(tokenizer)


def test_output_layer_smaller_than_the_tokenizer_is_refused(tokenizer):
    student = tiny_llama(len(tokenizer) - 5, hidden=32, layers=1, heads=2)
    with pytest.raises(ModelError, match="output layer has"):
        check_tokenizers_compatible(tokenizer, tokenizer, None, student)


def test_same_size_but_different_ids_is_refused(tokenizer):
    other = build_tokenizer(["something else entirely, with other merges\n" * 10], vocab_size=len(tokenizer))
    if len(other) != len(tokenizer):
        pytest.skip("tokenizer sizes differ; the size check covers this case")
    with pytest.raises(ModelError, match="different ids"):
        check_tokenizers_compatible(tokenizer, other)


def test_path_like_names_that_do_not_exist_are_reported_as_folders():
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source("./models/missing", "teacher")
    assert resolve_model_source("org/model", "teacher") == "org/model"  # hub id: left to the hub loader
