"""Representation-transfer losses against hand-computed values; layer maps and projection rules."""

import math

import pytest
import torch

from alambic.errors import ConfigError
from alambic.losses.representation import (
    attention_mse,
    hidden_cosine,
    hidden_mse,
    masked_mean_pool,
    sample_relation_mse,
    similarity_matrix,
    token_relation_mse,
)
from alambic.training.modes.representation import position_weights, projection_wanted, resolve_layer_map


def test_hidden_mse_is_the_mean_squared_difference_per_position():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # position 0: (0 + 4) / 2; position 1: (9 + 16) / 2
    assert torch.equal(hidden_mse(student, teacher), torch.tensor([[2.0, 12.5]]))


def test_hidden_cosine_is_zero_for_parallel_one_for_orthogonal_two_for_opposite():
    student = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[3.0, 3.0], [0.0, 5.0], [-2.0, -4.0]])
    torch.testing.assert_close(hidden_cosine(student, teacher), torch.tensor([0.0, 1.0, 2.0]))


def test_attention_mse_pairs_heads_when_counts_match():
    student = torch.zeros(1, 2, 2, 2)
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, 0, 0] = torch.tensor([1.0, 0.0])  # head 0, query 0
    teacher[0, 1, 1] = torch.tensor([0.5, 0.5])  # head 1, query 1
    # query 0: mean over heads and keys of squares = (1 + 0 + 0 + 0) / 4; query 1: (0 + 0 + 0.25 + 0.25) / 4
    torch.testing.assert_close(attention_mse(student, teacher), torch.tensor([[0.25, 0.125]]))


def test_attention_mse_averages_heads_when_counts_differ():
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]]])  # 3 heads, 1 query, 2 keys; mean 0.5, 0.5
    teacher = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # 2 heads; mean 1, 0
    torch.testing.assert_close(attention_mse(student, teacher), torch.tensor([[0.25]]))


def test_attention_mse_ignores_masked_keys():
    student = torch.tensor([[[[0.0, 0.0, 9.0]]]])
    teacher = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    key_mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(attention_mse(student, teacher, key_mask), torch.tensor([[0.5]]))


def test_token_relation_compares_similarity_rows_and_ignores_width_and_scale():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # orthogonal tokens: similarity = identity
    teacher = torch.tensor([[[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])  # parallel tokens, other width: all ones
    torch.testing.assert_close(token_relation_mse(student, teacher), torch.tensor([[0.5, 0.5]]))
    assert token_relation_mse(student, 3.0 * student).abs().max() < 1e-6


def test_sample_relation_uses_the_batch_similarity_matrix():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cos = 1 / math.sqrt(2)
    # off-diagonal entries differ by cos - 0, diagonals agree: mean over 4 entries
    torch.testing.assert_close(sample_relation_mse(student, teacher), torch.tensor(2 * cos**2 / 4))
    torch.testing.assert_close(similarity_matrix(student), torch.tensor([[1.0, cos], [cos, 1.0]]))


def test_masked_mean_pool_skips_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_uniform_and_last_layer_maps():
    assert resolve_layer_map("uniform", 2, 6, "k") == {0: 2, 1: 5}  # TinyBERT: last layer of each half
    assert resolve_layer_map("uniform", 3, 3, "k") == {0: 0, 1: 1, 2: 2}
    assert resolve_layer_map("last", 2, 6, "k") == {1: 5}
    assert resolve_layer_map({0: 3}, 2, 6, "k") == {0: 3}


@pytest.mark.parametrize("mapping, role, layer", [({0: 6}, "teacher", 6), ({2: 1}, "student", 2), ({-1: 0}, "student", -1)])
def test_a_layer_map_naming_a_missing_layer_is_a_clear_error(mapping, role, layer):
    with pytest.raises(ConfigError) as info:
        resolve_layer_map(mapping, 2, 6, "representation.hidden.layer_map")
    message = str(info.value)
    assert f"the {role} has no layer {layer}" in message and "representation.hidden.layer_map" in message
    assert info.value.hint


def test_projection_rules():
    assert projection_wanted("auto", 32, 64, "k") is True
    assert projection_wanted("auto", 64, 64, "k") is False
    assert projection_wanted("required", 32, 64, "k") is True
    assert projection_wanted("never", 64, 64, "k") is False
    with pytest.raises(ConfigError, match=r"'never' but the student's hidden width \(32\) differs"):
        projection_wanted("never", 32, 64, "representation.hidden.projection")
    with pytest.raises(ConfigError, match="'required' but the student and the teacher have the same hidden width"):
        projection_wanted("required", 64, 64, "representation.hidden.projection")


def test_position_weights_sum_to_the_loop_normaliser():
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]]),
    }
    causal = position_weights(batch, "causal_lm")
    # position t carries the loss of the label at t + 1
    assert causal.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    classifier = position_weights({"attention_mask": batch["attention_mask"]}, "sequence_classification")
    torch.testing.assert_close(classifier.sum(1), torch.ones(2))
    assert classifier[0, 3] == 0
