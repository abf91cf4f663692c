"""config.yaml and the --verbose config: keys spelled as configs spell them, credentials masked, old runs still match."""

from __future__ import annotations

import yaml

from alambic.config import DistillConfig, dump_config
from alambic.output import full_config_text
from alambic.training.run_dir import _comparable


def _config(served: bool = False, **rollout) -> DistillConfig:
    teacher = {"server": "http://user:s3cret@teacher.example:8000/v1", "server_model": "t", "top_k": 8} if served else {"model": "t"}
    return DistillConfig.model_validate({
        "teacher": teacher,
        "student": {"model": "student"},
        "data": {"train": "train.jsonl"},
        "rollout": rollout,
    })


def test_saved_config_spells_lambda_as_configs_do_and_loads_back():
    config = _config(policy="on_policy", **{"lambda": 0.5})
    text = dump_config(config)
    assert "lambda: 0.5" in text and "lambda_" not in text
    assert DistillConfig.model_validate(yaml.safe_load(text)) == config  # a saved config.yaml runs as it is


def test_printed_config_masks_url_credentials_like_the_saved_one():
    text = full_config_text(_config(served=True))
    assert "s3cret" not in text and "teacher.example:8000" in text
    assert text == dump_config(_config(served=True))


def test_a_run_saved_with_the_old_lambda_spelling_is_the_same_run():
    config = _config(policy="on_policy", **{"lambda": 0.5})
    old = yaml.safe_load(dump_config(config))
    old["rollout"]["lambda_"] = old["rollout"].pop("lambda")
    assert _comparable(old) == _comparable(yaml.safe_load(dump_config(config)))
    old["rollout"]["lambda_"] = 0.25
    assert _comparable(old) != _comparable(yaml.safe_load(dump_config(config)))
