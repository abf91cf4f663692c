"""Layer-selection students: exact copies of the teacher's chosen layers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from alambic.errors import ModelError
from alambic.models.student import find_layer_list, layer_indices_for, select_layers


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=89, n_embd=32, n_layer=4, n_head=4, n_positions=64)).eval()


BUILDERS = [tiny_bert, tiny_llama, tiny_gpt2]


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_keeping_every_layer_reproduces_the_teacher_exactly(build):
    teacher = build()
    student = select_layers(teacher, range(4))
    input_ids = torch.randint(0, 80, (2, 12))
    assert torch.equal(_logits(student, input_ids), _logits(teacher, input_ids))
    assert student is not teacher


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_two_layer_student_holds_copies_of_the_chosen_teacher_layers(build):
    teacher = build()
    student = select_layers(teacher, [1, 3])
    _, _, teacher_layers = find_layer_list(teacher)
    _, _, student_layers = find_layer_list(student)
    assert len(student_layers) == 2 and student.config.num_hidden_layers == 2
    for student_layer, teacher_index in zip(student_layers, [1, 3]):
        teacher_state = teacher_layers[teacher_index].state_dict()
        for key, value in student_layer.state_dict().items():
            assert torch.equal(value, teacher_state[key]), key
    # A copy, not a view: training the student leaves the teacher as it was.
    first_param = next(student_layers[0].parameters())
    with torch.no_grad():
        first_param.add_(1.0)
    assert not torch.equal(first_param, next(teacher_layers[1].parameters()))
    assert len(find_layer_list(teacher)[2]) == 4


def test_student_equals_teacher_run_through_the_same_layers_only():
    teacher = tiny_bert()
    student = select_layers(teacher, [0, 2])
    input_ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        hidden = teacher.bert.embeddings(input_ids=input_ids)
        for index in (0, 2):
            output = teacher.bert.encoder.layer[index](hidden)
            hidden = output[0] if isinstance(output, tuple) else output
        expected = teacher.classifier(teacher.bert.pooler(hidden))
    assert torch.allclose(_logits(student, input_ids), expected, atol=1e-6)


def test_decoder_student_generates_with_a_renumbered_cache(tmp_path):
    student = select_layers(tiny_llama(), [1, 3])
    indices = [layer.self_attn.layer_idx for layer in student.model.layers]
    assert indices == [0, 1]
    prompt = torch.randint(0, 80, (1, 5))
    with torch.no_grad():
        generated = student.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    student.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    assert torch.equal(_logits(reloaded, prompt), _logits(student, prompt))


@pytest.mark.parametrize(
    ("total", "keep", "strategy", "expected"),
    [
        (6, 2, "uniform", [2, 5]),
        (12, 3, "uniform", [3, 7, 11]),
        (6, 6, "uniform", [0, 1, 2, 3, 4, 5]),
        (6, 3, "every_k", [0, 2, 4]),
        (12, 4, "every_k", [0, 3, 6, 9]),
        (6, None, [0, 5], [0, 5]),
    ],
)
def test_layer_index_strategies(total, keep, strategy, expected):
    assert layer_indices_for(total, keep, strategy) == expected


@pytest.mark.parametrize("bad", [[0, 4], [2, 1], [1, 1], []])
def test_bad_layer_lists_are_user_errors(bad):
    with pytest.raises(ModelError):
        layer_indices_for(4, None, bad)
    with pytest.raises(ModelError):
        select_layers(tiny_bert(), bad)


def test_keep_more_layers_than_the_teacher_has_is_an_error():
    with pytest.raises(ModelError, match="cannot keep 7"):
        layer_indices_for(6, 7)


@pytest.mark.parametrize("from_teacher, expected", [
    ({"layers": "every_k", "every_k": 1}, [0, 1, 2, 3]),  # every_k is used, not replaced by a default
    ({"layers": "every_k", "every_k": 3}, [0, 3]),
    ({"layers": "every_k"}, [0, 2]),  # default k: layers // (layers // 2)
    ({"layers": "uniform", "num_layers": 1}, [3]),
    ({"layers": [0, 2]}, [0, 2]),
])
def test_student_from_teacher_uses_every_setting(from_teacher, expected):
    from alambic.config import DistillConfig
    from alambic.training.setup import _student_model

    config = DistillConfig.model_validate({"teacher": {"model": "t"}, "student": {"from_teacher": from_teacher},
                                           "data": {"train": "x.jsonl"}})
    student = _student_model(config, tiny_llama())
    assert student.config.alambic_selected_layers == expected
