"""alambic.durable: whole-or-nothing files and folders."""

import json

import pytest

from alambic.durable import TEMPORARY_GLOB, atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_files_replace_whole(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "b.bin", [b"ab", memoryview(b"cd")])
    assert (tmp_path / "b.bin").read_bytes() == b"abcd"
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_failed_file_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def chunks():
        yield b"new"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, chunks())
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_atomic_dir_publishes_and_replaces(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as temporary:
        assert temporary != final and temporary.parent == tmp_path and not final.exists()
        (temporary / "one.txt").write_text("1")
        (temporary / "sub").mkdir()
        (temporary / "sub" / "x").write_text("x")
    assert (final / "one.txt").read_text() == "1" and (final / "sub" / "x").read_text() == "x"
    with atomic_dir(final) as temporary:
        (temporary / "two.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["two.txt"]  # replaced whole, nothing merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_atomic_dir_failure_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(final) as temporary:
            (temporary / "half.txt").write_text("half")
            raise ValueError("failed mid-save")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
