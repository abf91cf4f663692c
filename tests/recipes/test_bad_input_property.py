"""Property: whatever is done to a valid config, override or data file, a command exits 0 or 2,
never with a traceback, and a failed run leaves no folder behind.

Mutations: values of the wrong type or range (non-finite numbers included), missing and extra
keys, random overrides, files re-encoded (latin-1, UTF-16) or truncated at a random byte.
Bounded (derandomized, a few dozen examples, no example database) so the suite stays fast:
configs are checked with in-process `alambic validate` (no model loads); data mutations run a
1-step in-process `alambic distill` on the tiny models.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import REPO, invoke, kd_config, write_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
BOUNDED = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(tree, prefix=()):
    """Every key path of a nested mapping."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _mutate(raw: dict, data) -> dict:
    raw = copy.deepcopy(raw)
    paths = list(_paths(raw)) or [("x",)]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        node = raw
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):  # an earlier mutation replaced a parent section
            continue
        action = data.draw(st.sampled_from(["set", "delete", "extra"]), label="action")
        if action == "set":
            node[path[-1]] = data.draw(values, label="value")
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[data.draw(st.text(min_size=1, max_size=8), label="extra key")] = data.draw(values, label="v")
    return raw


def _encode(text: str, data) -> bytes:
    how = data.draw(st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16", "truncated"]), label="encoding")
    if how == "truncated":
        raw = text.encode("utf-8")
        return raw[: data.draw(st.integers(0, len(raw)), label="cut")]
    return text.encode(how, errors="replace")


def _schema_header(path: Path) -> str:
    return "".join(line + "\n" for line in path.read_text().splitlines()[:20] if line.startswith("# schema:"))


@BOUNDED
@given(data=st.data())
def test_mutated_configs_and_overrides_never_traceback(capsys, data):
    source = data.draw(st.sampled_from(CONFIGS), label="config")
    raw = yaml.safe_load(source.read_text()) or {}
    text = _schema_header(source) + yaml.safe_dump(_mutate(raw, data), allow_unicode=True)
    overrides = data.draw(st.lists(st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from(["train.lr", "loss.temperature", "loss.alpha", "train.adam_betas", "data.max_length",
                         "sampling.n", "teacher.base_url", "output.dir", "", "a..b", "train"]),
        st.sampled_from(["1", "-1", "0", ".inf", ".nan", "[1.5,0.9]", "x", "{a: 1}", "", "null", "1e400"]),
    ), max_size=2), label="overrides")
    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "config.yaml"
        path.write_bytes(_encode(text, data))
        code, out, err = invoke(capsys, "validate", path, *overrides)
        assert code in (0, 2), err
        assert "Traceback" not in out + err
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    finally:
        shutil.rmtree(folder)


def _mutate_records(lines: list[str], data) -> str:
    records = [json.loads(line) for line in lines]
    for _ in range(data.draw(st.integers(1, 3), label="record mutations")):
        index = data.draw(st.integers(0, len(records) - 1), label="record")
        if not isinstance(records[index], dict):
            continue
        action = data.draw(st.sampled_from(["value", "drop", "rename", "garbage", "not-object"]), label="how")
        if action == "value":
            records[index]["text"] = data.draw(values, label="text")
        elif action == "drop":
            records[index].pop("text", None)
        elif action == "rename":
            records[index] = {"content": records[index].get("text")}
        elif action == "garbage":
            records[index] = data.draw(st.text(max_size=10), label="garbage line")
        else:
            records[index] = data.draw(st.lists(st.integers(), max_size=2), label="array")
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@settings(BOUNDED, max_examples=6, phases=[Phase.explicit, Phase.generate])  # each example trains: no shrinking
@given(data=st.data())
def test_mutated_data_files_exit_0_or_2_and_never_half_write(capsys, tiny_setup, data):
    lines = Path(tiny_setup["train"]).read_text().splitlines()[:6]
    folder = Path(tempfile.mkdtemp())
    try:
        train = folder / "train.jsonl"
        train.write_bytes(_encode(_mutate_records(lines, data), data))
        mapping = kd_config(tiny_setup, folder / "run", max_steps=1, batch_size=2)
        mapping["data"].update({"train": str(train), "eval": None, "max_length": 32})
        code, out, err = invoke(capsys, "distill", write_config(folder / "c.yaml", mapping))
        assert code in (0, 2), err
        assert "Traceback" not in out + err
        if code == 2:
            assert not (folder / "run").exists(), "a refused run left a folder"
        else:
            assert (folder / "run" / "final" / "model.safetensors").exists()
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_is_a_valid_seed(capsys, config):
    """The property's seeds are valid: a mutation, not the seed, is what a refusal is about."""
    code, _, err = invoke(capsys, "validate", config)
    assert code == 0, err
