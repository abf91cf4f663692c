"""Students built from the teacher: width pruning by importance, layer averaging, int8 quantization."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alambic.errors import ModelError
from alambic.models.averaging import average_layers, layer_groups
from alambic.models.pruning import activation_importance, plan_heads, plan_width, prune_width
from alambic.models.quantize import count_parameters, load_int8, quantize_int8, save_int8
from alambic.models.student import select_layers

VOCAB = 61


def llama(heads=4, kv_heads=4, layers=2, hidden=32, seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def batches(count=3, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (2, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, length // 2 :] = 0  # padding must not count towards importance
        result.append({"input_ids": ids, "attention_mask": mask})
    return result


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def prune(model, **keep):
    importance = activation_importance(model, batches())
    plan = plan_width(model, importance, **keep)
    return prune_width(model, plan), plan, importance


def test_keeping_every_layer_reproduces_the_teacher_exactly():
    teacher = llama()
    student = select_layers(teacher, [0, 1])
    batch = batches()[0]
    assert torch.equal(logits(student, batch), logits(teacher, batch))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_pruning_at_full_width_gives_the_same_outputs(kv_heads):
    teacher = llama(kv_heads=kv_heads)
    student, _, _ = prune(teacher, heads_keep=1.0, mlp_keep=1.0, hidden_keep=1.0)
    batch = batches()[0]
    assert torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-5)


def test_a_silent_head_ranks_lowest_and_is_pruned_first():
    teacher = llama()
    head_dim = 32 // 4
    with torch.no_grad():  # head 2 of layer 1 attends to zero values: its output is exactly 0
        teacher.model.layers[1].self_attn.v_proj.weight[2 * head_dim : 3 * head_dim] = 0
    student, plan, importance = prune(teacher, heads_keep=3)
    assert importance.heads[1, 2] == 0 and (importance.heads[1, [0, 1, 3]] > 0).all()
    assert plan.query_heads[1] == [0, 1, 3]
    # Dropping a head whose output is zero changes nothing.
    before, after = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    assert torch.equal(after.o_proj.weight, before.o_proj.weight[:, [*range(0, 16), *range(24, 32)]])


def test_a_dead_mlp_channel_ranks_lowest_and_is_pruned_first():
    teacher = llama()
    with torch.no_grad():  # act(gate) * up = 0 for channel 5 of layer 0 and channel 9 of layer 1
        teacher.model.layers[0].mlp.up_proj.weight[5] = 0
        teacher.model.layers[1].mlp.up_proj.weight[9] = 0
    student, plan, importance = prune(teacher, mlp_keep=63)
    assert importance.mlp[0].argmin() == 5 and importance.mlp[1].argmin() == 9
    assert plan.mlp_channels == [[c for c in range(64) if c != 5], [c for c in range(64) if c != 9]]
    # Dropping channels whose activation is always zero changes nothing.
    batch = batches()[0]
    assert torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-5)


def test_a_dead_hidden_channel_is_pruned_first():
    teacher = llama()
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if "norm" in name:
                parameter[7] = 0  # every normalised view of channel 7 is zero
    _, plan, importance = prune(teacher, hidden_keep=31)
    assert importance.hidden.argmin() == 7 and 7 not in plan.hidden_channels


def test_pruned_model_has_the_planned_shapes_and_round_trips(tmp_path):
    teacher = llama(heads=4, kv_heads=2)
    student, _, _ = prune(teacher, heads_keep=2, mlp_keep=0.5, hidden_keep=24)
    config = student.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 2)
    assert (config.intermediate_size, config.hidden_size, config.head_dim) == (32, 24, 8)
    attention = student.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 24) and attention.o_proj.weight.shape == (24, 16)
    assert student.model.embed_tokens.weight.shape == (VOCAB, 24) and student.lm_head.weight.shape == (VOCAB, 24)
    batch = batches()[0]
    student.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, batch), logits(student, batch))
    assert logits(student, batch).shape == (2, 12, VOCAB)


def test_gqa_within_groups_keeps_the_best_query_of_each_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.3])  # 2 KV groups of 3 query heads
    assert plan_heads(scores, 2, 2, "within_groups") == ([1, 4], [0, 1])
    assert plan_heads(scores, 2, 4, "within_groups") == ([1, 2, 4, 5], [0, 1])
    # whole groups: group 0 sums to 1.5, group 1 to 1.3
    assert plan_heads(scores, 2, 3, "whole_groups") == ([0, 1, 2], [0])
    with pytest.raises(ModelError, match="multiple of 2"):
        plan_heads(scores, 2, 3, "within_groups")


def test_unprunable_models_are_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    with pytest.raises(ModelError, match="Llama-style"):
        activation_importance(gpt2, batches())
    teacher = llama()
    importance = activation_importance(teacher, batches())
    with pytest.raises(ModelError, match="cannot keep 9"):
        plan_width(teacher, importance, heads_keep=9)


def test_averaging_two_identical_layers_gives_that_layer():
    teacher = llama(layers=3)
    teacher.model.layers[1].load_state_dict(teacher.model.layers[0].state_dict())
    averaged = average_layers(teacher, [[0, 1], [2]])
    selected = select_layers(teacher, [0, 2])
    batch = batches()[0]
    assert torch.allclose(logits(averaged, batch), logits(selected, batch), atol=1e-6)
    assert averaged.config.num_hidden_layers == 2


def test_averaging_is_the_mean_of_the_group():
    teacher = llama(layers=2)
    averaged = average_layers(teacher, [[0, 1]])
    expected = (teacher.model.layers[0].mlp.up_proj.weight + teacher.model.layers[1].mlp.up_proj.weight) / 2
    assert torch.allclose(averaged.model.layers[0].mlp.up_proj.weight, expected)


def test_layer_groups_are_contiguous_and_cover_the_teacher():
    groups = layer_groups(7, num_layers=3)
    assert [i for group in groups for i in group] == list(range(7))
    assert sorted(len(group) for group in groups) == [2, 2, 3]
    assert layer_groups(5, every_k=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ModelError):
        layer_groups(4, num_layers=5)


def test_int8_student_is_close_to_the_float_one_and_round_trips(tmp_path):
    model = llama()
    quantized, names = quantize_int8(model)
    assert "lm_head" in names and len(names) == 2 * 7 + 1
    assert count_parameters(quantized) == count_parameters(model)
    batch = batches()[0]
    reference, approximate = logits(model, batch), logits(quantized, batch)
    assert (approximate - reference).abs().max() < 0.02 * reference.abs().max()
    assert not torch.equal(approximate, reference)  # it really is quantized
    save_int8(quantized, names, tmp_path)
    assert torch.equal(logits(load_int8(tmp_path), batch), approximate)
    float_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" in n or "lm_head" in n)
    int8_bytes = sum(b.numel() for n, b in quantized.named_buffers() if n.endswith("weight_int8"))
    assert int8_bytes * 4 == float_bytes
