"""Config loading: every shipped YAML validates; overrides; error messages."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from alambic.compat import check_compatible
from alambic.config import DistillConfig, apply_overrides, config_model_for, load_config, read_yaml
from alambic.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_documents_its_launch_command(path):
    schema = config_model_for(path)
    config = load_config(path, [], schema)
    assert type(config) is schema
    if isinstance(config, DistillConfig):
        check_compatible(config)  # what `alambic validate` also checks
    # What a run writes to its folder (dump_config) reads back as the same config.
    assert schema.model_validate(config.model_dump(mode="json")) == config
    header = path.read_text().splitlines()[:12]
    assert any(line.startswith("#") and "alambic " in line for line in header), "no launch command in the header"


def test_a_config_declares_its_schema_in_a_comment(tmp_path):
    from alambic.models.init_student import InitStudentConfig

    declared = tmp_path / "declared.yaml"
    declared.write_text("# schema: alambic.models.init_student:InitStudentConfig\nteacher: {model: x}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("# a comment that is not a schema\nstudent: {model: x}\n")
    assert config_model_for(declared) is InitStudentConfig
    assert config_model_for(plain) is DistillConfig


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {model: x}\ndata: {train: t.jsonl}\n")
    config = load_config(path, ["train.lr=3e-4", "loss.temperature=2", "train.adam_betas=[0.8, 0.9]", "loss.top_k=8"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.loss.temperature == 2.0
    assert config.train.adam_betas == (0.8, 0.9)
    assert config.loss.top_k == 8


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_unknown_nested_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {model: x, dtpye: float32}\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "unknown key 'student.dtpye'" in str(info.value)
    assert "did you mean 'student.dtype'" in str(info.value)


def test_classification_needs_matching_format(tmp_path):
    with pytest.raises(ValidationError, match="needs data.format: classification"):
        DistillConfig.model_validate({"task": "sequence_classification", "student": {"model": "x"}, "data": {"train": "t"}})


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(path)
