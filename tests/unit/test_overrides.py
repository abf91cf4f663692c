"""Command-line overrides reach list elements; words YAML would read as booleans stay words;
a tracker that is not installed is a config error found by `validate`."""

import importlib.util

import pytest
import yaml

from alambic.config import DistillConfig, apply_overrides, load_config
from alambic.errors import ConfigError
from helpers import REPO


def test_indexed_keys_reach_list_elements():
    raw = {"stages": [{"name": "a", "overrides": {"train.lr": 1}}, {"name": "b"}], "teachers": [{"model": "x"}]}
    apply_overrides(raw, ["stages.1.overrides={train.max_steps: 3}", "stages.0.name=first", "teachers.0.weight=2",
                          "stages.-1.architecture={hidden_size: 8}"])
    assert raw["stages"][1] == {"name": "b", "overrides": {"train.max_steps": 3}, "architecture": {"hidden_size": 8}}
    assert raw["stages"][0]["name"] == "first" and raw["teachers"] == [{"model": "x", "weight": 2}]


@pytest.mark.parametrize("override, message", [
    ("stages.5.name=x", "index 5 is out of range (the list has 2 elements)"),
    ("stages.name=x", "is a list, so the next part must be an index"),
])
def test_bad_index_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides({"stages": [{}, {}]}, [override])


def test_progressive_stage_override_shortens_a_later_stage():
    from alambic.training.progressive import ProgressiveConfig, stage_configs

    config = load_config(REPO / "configs" / "progressive.yaml",
                         ["run.train.max_steps=3", "stages.1.overrides.train.max_steps=4"], ProgressiveConfig)
    first, second = stage_configs(config)
    assert (first.train.max_steps, second.train.max_steps) == (3, 4)
    # Without the indexed key the stage's own override (200 steps) wins over run.*, as documented.
    config = load_config(REPO / "configs" / "progressive.yaml", ["run.train.max_steps=3"], ProgressiveConfig)
    assert [stage.train.max_steps for stage in stage_configs(config)] == [3, 200]


def test_yaml_boolean_words_stay_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "m"}, "data": {"train": "t.jsonl"}}))
    config = load_config(path, ["train.mixed_precision=no", "train.progress=false", "data.packing=yes"], DistillConfig)
    assert config.train.mixed_precision == "no" and config.train.progress is False and config.data.packing is True


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_missing_tracker_is_a_config_error(tmp_path, capsys):
    from helpers import invoke

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "m"}, "data": {"train": "t.jsonl"},
                                    "train": {"trackers": ["tensorboard"], "output_dir": str(tmp_path / "run")}}))
    code, _, err = invoke(capsys, "validate", path)
    assert code == 2 and "tracker 'tensorboard' is not installed" in err and "alambic[trackers]" in err
    code, _, err = invoke(capsys, "distill", path)
    assert code == 2 and not (tmp_path / "run").exists()
