"""The compatibility table (alambic.compat): every incompatible pair exits 2 with the table's message,
through `alambic validate` and `alambic distill`, before any model, tokenizer or data file is opened
(every path in these configs points at a file that does not exist)."""

import copy

import pytest

from alambic.compat import FEATURES, INCOMPATIBLE, check_compatible, violations
from alambic.config import DistillConfig
from alambic.errors import ConfigError
from helpers import expect_exit_2

MISSING = "/nonexistent/alambic-compat"
BASE = {
    "teacher": {"model": f"{MISSING}/teacher"},
    "student": {"model": f"{MISSING}/student"},
    "data": {"train": f"{MISSING}/train.jsonl"},
}
_SELF = {"self_distill": {"teacher": "ema"}}
_NO_TEACHER = {"teacher": None}

# A config patch turning each feature on (None deletes a key). A new FEATURES entry needs one here.
EXAMPLES = {
    "classification": {"task": "sequence_classification", "data": {"format": "classification"}},
    "packing": {"data": {"packing": True}},
    "not_prompt_completion": {"data": {"format": "messages"}},
    "top_k": {"loss": {"top_k": 5}},
    "logit_softcap": {"loss": {"logit_softcap": 30.0}},
    "alpha_one": {"loss": {"alpha": 1.0}},
    "cosine": {"loss": {"objective": "cosine"}},
    "temperature_not_1": {"loss": {"temperature": 2.0}},
    "not_reverse_kl_t1": {"loss": {"objective": "forward_kl"}},
    "teacher": {"teacher": {"model": f"{MISSING}/teacher"}},
    "teacher_cache": {"teacher": {"cache": f"{MISSING}/cache"}},
    "cached_teacher": {"teacher": {"model": None, "cache": f"{MISSING}/cache"}},
    "no_teacher_model": _NO_TEACHER,
    "no_live_teacher_model": _NO_TEACHER,
    "no_teacher_signal": _NO_TEACHER,
    "record_logprobs": {"teacher": None, "data": {"logprobs_column": "logprobs", "format": "prompt_completion"}},
    "student_from_teacher": {"student": {"model": None, "from_teacher": {"num_layers": 1}}},
    "teachers": {"teachers": [{"model": f"{MISSING}/a", "name": "a"}, {"model": f"{MISSING}/b", "name": "b"}]},
    "ensemble": {"ensemble": {"method": "confidence"}},
    "no_teachers": {"teachers": []},
    "ensemble_route": {"ensemble": {"method": "route", "route_column": "domain"}},
    "cached_member": {"teachers": [{"cache": f"{MISSING}/cache", "name": "c"}, {"model": f"{MISSING}/m", "name": "m"}]},
    "self_distill": {"self_distill": {"teacher": "none", "early_exit_layers": [0]}},
    "self_distill_teacher": _SELF,
    "co_distill": {"co_distill": {"peers": [f"{MISSING}/peer"]}},
    "cross_tokenizer": {"cross_tokenizer": {"method": "uld"}},
    "representation": {"representation": {"output_cosine": 1.0}},
    "rollout": {"rollout": {"policy": "on_policy", "lambda": 0.5}},
    "on_policy": {"rollout": {"policy": "on_policy", "lambda": 0.5}},
    "sequence_level": {"rollout": {"policy": "sequence_level"}},
    "minillm": {"rollout": {"policy": "minillm"}, "loss": {"objective": "reverse_kl", "temperature": 1.0}},
    "vllm": {"rollout": {"engine": "vllm"}},
    "fsdp": {"train": {"strategy": "fsdp"}},
    "fp16": {"train": {"mixed_precision": "fp16"}},
    "ddp": {"train": {"strategy": "ddp"}},
    "teacher_offload": {"train": {"strategy": "fsdp", "fsdp": {"teacher_offload": True}}},
    "unsharded_teacher": {"train": {"fsdp": {"shard_teacher": False}}},
    "cpu_run": {"train": {"cpu": True}},
    "served_teacher": {"teacher": {"model": None, "server": "http://127.0.0.1:9/v1", "server_model": "m", "top_k": 5}},
    "served_member": {"teachers": [{"server": "http://127.0.0.1:9/v1", "server_model": "m", "top_k": 5, "name": "s"},
                                   {"model": f"{MISSING}/m", "name": "m"}]},
    "interchange": {"interchange": {"layer_map": {0: 0}}},
    "quantization": {"quantization": {"bits": 4}},
    "unlabelled_pool": {"data": {"unlabelled": f"{MISSING}/transfer.jsonl"}},
    "hard_targets": {"loss": {"teacher_targets": "hard"}},
}


def _merge(into: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _config_with(*features: str) -> dict:
    mapping = copy.deepcopy(BASE)
    for name in features:
        _merge(mapping, EXAMPLES[name])
    return mapping


def _row_id(row) -> str:
    return f"{row.a}+{row.b}"


def test_every_feature_has_an_example_that_turns_it_on():
    assert set(EXAMPLES) == set(FEATURES), "add an example config patch for each feature of alambic.compat"
    for name in FEATURES:
        config = DistillConfig.model_validate(_config_with(name))
        assert FEATURES[name].present(config), name


def test_the_base_config_is_compatible():
    config = DistillConfig.model_validate(BASE)
    assert violations(config) == []
    check_compatible(config)  # no error


@pytest.mark.parametrize("row", INCOMPATIBLE, ids=_row_id)
def test_validate_refuses_each_incompatible_pair(row, capsys, tmp_path):
    mapping = _config_with(row.a, row.b)
    config = DistillConfig.model_validate(mapping)
    assert row in violations(config)
    err = expect_exit_2(capsys, tmp_path, mapping, command="validate")
    assert " ".join(row.message(config).split()) in err
    assert " ".join(row.fix.split()) in err


def test_distill_refuses_before_loading_anything(capsys, tmp_path):
    row = next(r for r in INCOMPATIBLE if (r.a, r.b) == ("co_distill", "teacher"))
    mapping = _config_with(row.a, row.b)
    mapping["train"] = {"output_dir": str(tmp_path / "run")}
    err = expect_exit_2(capsys, tmp_path, mapping, row.message(DistillConfig.model_validate(mapping)), fix=True)
    assert "does not exist" not in err  # the missing model paths were never looked at


def test_messages_name_the_values_of_this_config():
    config = DistillConfig.model_validate(_config_with("minillm", "temperature_not_1"))
    with pytest.raises(ConfigError) as raised:
        check_compatible(config)
    assert "loss.objective is 'reverse_kl' at temperature 2.0" in raised.value.message


def test_several_violations_are_listed_together():
    config = DistillConfig.model_validate(_config_with("cross_tokenizer", "top_k", "packing"))
    with pytest.raises(ConfigError) as raised:
        check_compatible(config)
    assert "2 pairs of settings in this config cannot be combined" in raised.value.message
    for name in ("loss.top_k", "data.packing", "cross_tokenizer"):
        assert name in raised.value.message
