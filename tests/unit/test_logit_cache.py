"""Offline teacher-logit cache: round trip, resume after kill -9, corruption and mismatch refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from alambic.cache.format import RecordLayout, decode_records, encode_records, largest_value_bits
from alambic.cache.identity import CacheIdentity, rows_hash
from alambic.cache.reader import LogitCache
from alambic.cache.writer import topk_signal, write_logit_cache
from alambic.errors import ConfigError, DataError
from alambic.losses.sparse import sparse_token_divergence
from alambic.teachers.base import SignalRequest
from alambic.teachers.cached import CachedTeacher

VOCAB = 97


class ToyTeacher(torch.nn.Module):
    """A seeded causal-enough LM (embedding + running mean + head): deterministic in any process."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, batch: dict) -> torch.Tensor:
        states = self.embed(batch["input_ids"]).cumsum(1)
        return self.head(states / torch.arange(1, states.shape[1] + 1)[None, :, None]) * 3


def toy_rows(count: int = 23, seed: int = 0) -> list[dict]:
    generator = np.random.default_rng(seed)
    return [{"input_ids": generator.integers(0, VOCAB, int(generator.integers(3, 30))).tolist()} for _ in range(count)]


def toy_identity(rows, k: int = 8, value_bits: int = 8, temperature: float = 1.0, shard_rows: int = 5) -> CacheIdentity:
    digest, tokens = rows_hash(rows)
    return CacheIdentity(
        teacher="toy", teacher_revision=None, teacher_weight_hash="w0", tokenizer_hash="t0", vocab_size=VOCAB,
        k=k, value_bits=value_bits, temperature=temperature, dataset_fingerprint="d0", rows_hash=digest,
        num_rows=len(rows), num_tokens=tokens, shard_rows=shard_rows,
    )


def build(folder: Path, rows, identity, **options) -> dict:
    teacher = ToyTeacher()
    return write_logit_cache(folder, rows, teacher, identity, batch_size=4, progress=False, **options)


# ----------------------------------------------------------------------------- format


def test_record_round_trip_is_lossless_for_ids_and_bounded_for_values():
    torch.manual_seed(0)
    layout = RecordLayout(vocab_size=1000, k=32, value_bits=4)
    ids, logprobs, tail = topk_signal(torch.randn(300, 1000) * 3, 32, 1.0)
    records = encode_records(layout, ids.numpy(), logprobs.numpy(), tail.numpy())
    assert records.shape == (300, layout.record_bytes)
    got_ids, got_logprobs, got_tail = decode_records(layout, records)
    order = np.argsort(ids.numpy(), axis=1)
    assert (got_ids == np.take_along_axis(ids.numpy(), order, axis=1)).all()
    expected = np.take_along_axis(logprobs.numpy(), order, axis=1)
    relative = expected - expected.max(axis=1, keepdims=True)
    half_step = -relative.min(axis=1, keepdims=True) / (2 * (2**4 - 1))
    # Quantisation error of x plus the renormalisation shift, which is at most the same again.
    assert (np.abs(got_logprobs - expected) <= 2 * half_step + 1e-3).all()
    np.testing.assert_allclose(got_tail, tail.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(got_logprobs).sum(1) + np.exp(got_tail), 1.0, atol=1e-5)
    # The top-1 sits on the grid's end point: still the largest (ties allowed at 4 bits).
    top = np.argmax(expected, axis=1)[:, None]
    assert (np.take_along_axis(got_logprobs, top, axis=1)[:, 0] == got_logprobs.max(axis=1)).all()


def test_full_vocabulary_records_have_no_tail():
    layout = RecordLayout(vocab_size=12, k=12, value_bits=16)
    ids, logprobs, tail = topk_signal(torch.randn(5, 12), 12, 2.0)
    got_ids, got_logprobs, got_tail = decode_records(layout, encode_records(layout, ids.numpy(), logprobs.numpy(), tail.numpy()))
    assert np.isneginf(got_tail).all()
    assert (got_ids == np.arange(12)).all()
    expected = np.take_along_axis(logprobs.numpy(), np.argsort(ids.numpy(), axis=1), axis=1)
    np.testing.assert_allclose(got_logprobs, expected, atol=2e-3)


def test_storage_budget_at_llama3_vocabulary():
    vocab = 128256
    bits = largest_value_bits(vocab, 128, 250)
    assert bits is not None and RecordLayout(vocab, 128, bits).record_bytes <= 250
    # Ranked 17-bit ids alone would need 272 bytes: the set coding is what makes the budget.
    assert RecordLayout(vocab, 128, bits).record_bytes < 128 * 17 / 8
    assert RecordLayout(vocab, 8, 8).record_bytes < RecordLayout(vocab, 32, 8).record_bytes


# ----------------------------------------------------------------------------- writer + reader


def test_cache_round_trip_matches_the_teacher(tmp_path):
    rows = toy_rows()
    identity = toy_identity(rows, temperature=2.0)
    manifest = build(tmp_path / "cache", rows, identity)
    assert manifest["complete"] and len(manifest["shards"]) == identity.num_shards == 5

    teacher = CachedTeacher(tmp_path / "cache", verify="all")
    chosen = [4, 17, 0]
    batch_rows = [rows[i] for i in chosen]
    length = max(len(r["input_ids"]) for r in batch_rows)
    input_ids = torch.zeros(3, length, dtype=torch.long)
    attention_mask = torch.zeros(3, length, dtype=torch.long)
    for i, row in enumerate(batch_rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "row_index": torch.tensor(chosen)}
    signal = teacher(batch, SignalRequest())
    assert signal.topk_ids.shape == (3, length, 8) and signal.temperature == 2.0

    with torch.no_grad():
        logits = ToyTeacher()(batch)
    valid = attention_mask.bool()
    exact_ids, exact_logprobs, exact_tail = topk_signal(logits[valid], 8, 2.0)
    assert (signal.topk_ids[valid].sort(-1).values == exact_ids.sort(-1).values).all()
    torch.testing.assert_close(signal.tail_logmass[valid], exact_tail)
    student = torch.randn(3, length, VOCAB)
    from_cache = sparse_token_divergence(
        student[valid], signal.topk_ids[valid], signal.topk_logprobs[valid], signal.tail_logmass[valid], temperature=2.0
    )
    direct = sparse_token_divergence(student[valid], exact_ids, exact_logprobs, exact_tail, temperature=2.0)
    torch.testing.assert_close(from_cache, direct, atol=5e-3, rtol=1e-2)


def test_threaded_decode_equals_single_thread(tmp_path, monkeypatch):
    import alambic.cache.reader as reader

    rows = toy_rows()
    build(tmp_path / "cache", rows, toy_identity(rows))
    monkeypatch.setattr(reader, "TOKENS_PER_DECODE_THREAD", 40)  # the toy batch is a few hundred tokens
    chosen = list(range(len(rows)))
    single = LogitCache(tmp_path / "cache", decode_threads=1).read_rows(chosen)
    threaded = LogitCache(tmp_path / "cache", decode_threads=3).read_rows(chosen)
    for name in single:
        np.testing.assert_array_equal(single[name], threaded[name])


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_logit_cache import ToyTeacher, toy_identity, toy_rows
    from alambic.cache.writer import write_logit_cache

    teacher, calls = ToyTeacher(), [0]

    def dies_in_third_shard(batch):
        calls[0] += 1
        if calls[0] == 6:  # shards hold 5 rows = 2 batches of 4: call 6 is inside shard 2
            os.kill(os.getpid(), signal.SIGKILL)
        return teacher(batch)

    rows = toy_rows()
    write_logit_cache({folder!r}, rows, dies_in_third_shard, toy_identity(rows), batch_size=4, progress=False)
    """
)


def test_resume_after_kill_gives_the_uninterrupted_cache(tmp_path):
    rows = toy_rows()
    identity = toy_identity(rows)
    reference = build(tmp_path / "reference", rows, identity)

    folder = tmp_path / "killed"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), folder=str(folder))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    interrupted = json.loads((folder / "manifest.json").read_text())
    assert [s["index"] for s in interrupted["shards"]] == [0, 1] and not interrupted["complete"]
    with pytest.raises(DataError, match="incomplete"):
        LogitCache(folder)
    with pytest.raises(DataError, match="--resume"):
        build(folder, rows, identity)

    # A shard written after the last manifest update must be redone, not trusted.
    (folder / "shard-00002.bin").write_bytes(b"half a shard")
    resumed = build(folder, rows, identity, resume=True)
    assert resumed["shards"] == reference["shards"]
    for entry in reference["shards"]:
        assert (folder / entry["file"]).read_bytes() == (tmp_path / "reference" / entry["file"]).read_bytes()
    assert not list(folder.glob(".*.tmp-*"))
    LogitCache(folder, verify="all")  # every checksum passes


def test_corrupted_shard_is_refused(tmp_path):
    rows = toy_rows()
    build(tmp_path / "cache", rows, toy_identity(rows))
    shard = tmp_path / "cache" / "shard-00003.bin"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # one flipped bit inside a record
    shard.write_bytes(bytes(data))
    cache = LogitCache(tmp_path / "cache")
    cache.row_records(0)  # other shards still read
    with pytest.raises(DataError, match="shard-00003.bin .*corrupted .*sha256") as caught:
        cache.row_records(16)
    assert "cache-logits" in caught.value.hint
    with pytest.raises(DataError, match="shard-00003.bin"):
        LogitCache(tmp_path / "cache", verify="all")

    shard.write_bytes(bytes(data[:-5]))  # truncated: refused at open, before any read
    with pytest.raises(DataError, match="shard-00003.bin .*corrupted.*bytes"):
        LogitCache(tmp_path / "cache")


def test_damaged_records_are_refused_even_without_checksums():
    layout = RecordLayout(vocab_size=VOCAB, k=8, value_bits=8)
    ids, logprobs, tail = topk_signal(torch.randn(4, VOCAB), 8, 1.0)
    records = encode_records(layout, ids.numpy(), logprobs.numpy(), tail.numpy())
    records[2, 6] ^= 0x01  # one bit of the id set's unary part: k ids become k +- 1
    with pytest.raises(ValueError, match="exactly k ids"):
        decode_records(layout, records)


def test_manifest_mismatch_is_refused(tmp_path):
    rows = toy_rows()
    identity = toy_identity(rows)
    folder = tmp_path / "cache"
    build(folder, rows, identity)
    with pytest.raises(DataError, match=r"k: cache has 8, this run has 16") as caught:
        build(folder, rows, replace(identity, k=16), resume=True)
    assert "--overwrite" in caught.value.hint
    with pytest.raises(DataError, match="teacher_weight_hash"):
        build(folder, rows, replace(identity, teacher_weight_hash="other"), resume=True)

    teacher = CachedTeacher(folder)
    other_rows = toy_rows(seed=1)

    class Data(list):
        fingerprint = "other"

    with pytest.raises(DataError, match="other token rows"):
        teacher.bind(Data(other_rows))
    with pytest.raises(DataError, match="23 training rows"):
        teacher.bind(Data(rows[:-1]))
    teacher.bind(Data(rows))  # same tokens, another fingerprint (e.g. tokenizer folder): accepted

    class Config:
        class loss:
            temperature = 2.0

        class student:
            model = None

    with pytest.raises(ConfigError, match="temperature 1.0"):
        teacher.bind(Data(rows), Config)
    with pytest.raises(DataError, match="computed on dataset d0"):
        CachedTeacher(folder, expected_fingerprint="d1")

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format version 99"):
        LogitCache(folder)


def test_row_length_mismatch_is_refused(tmp_path):
    rows = toy_rows()
    build(tmp_path / "cache", rows, toy_identity(rows))
    teacher = CachedTeacher(tmp_path / "cache")
    n = len(rows[2]["input_ids"])
    batch = {
        "input_ids": torch.zeros(1, n + 1, dtype=torch.long),
        "attention_mask": torch.ones(1, n + 1, dtype=torch.long),
        "row_index": torch.tensor([2]),
    }
    with pytest.raises(DataError, match="row 2 has a different length"):
        teacher(batch, SignalRequest())


def test_foreign_folder_is_not_overwritten(tmp_path):
    rows = toy_rows()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a logit cache"):
        build(tmp_path, rows, toy_identity(rows))
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_teacher_config(tmp_path_factory):
    from alambic.testing import save_model_with_tokenizer, tiny_llama, write_stdlib_corpus

    folder = tmp_path_factory.mktemp("tiny")
    paths = write_stdlib_corpus(folder / "data", n_train=2, n_heldout=1, chars_per_record=300, vocab_size=300)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    teacher = save_model_with_tokenizer(tiny_llama(vocab, hidden=32), paths["tokenizer"], folder / "teacher")
    config = folder / "config.yaml"
    config.write_text(
        f"teacher: {{model: {teacher}}}\nstudent: {{model: {teacher}}}\n"
        f"data: {{train: {paths['train']}, max_length: 64, limit: 12}}\nloss: {{temperature: 1.5}}\n"
    )
    return config, vocab


def test_cli_writes_a_cache_the_teacher_source_reads(tiny_teacher_config, tmp_path):
    from alambic.cache.cli import cache_logits
    from alambic.config import load_config
    from alambic.data import build_datasets, collate
    from alambic.models import load_tokenizer

    config_path, vocab = tiny_teacher_config
    manifest = cache_logits(str(config_path), [], 16, str(tmp_path / "c"), 5, 4, "auto", 250, False, False, "cpu", False)
    assert manifest["identity"]["k"] == 16 and manifest["identity"]["temperature"] == 1.5
    assert manifest["identity"]["vocab_size"] == vocab and manifest["identity"]["value_bits"] == 8

    # Refusals that need no teacher come before the (possibly huge) teacher is loaded.
    import alambic.models

    def no_teacher_please(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the folder was checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alambic.models, "load_model", no_teacher_please)
        with pytest.raises(DataError, match="already holds a logit cache"):
            cache_logits(str(config_path), [], 16, str(tmp_path / "c"), 5, 4, "auto", 250, False, False, "cpu", False)
        with pytest.raises(DataError, match="k: cache has 16, this run has 12"):
            cache_logits(str(config_path), [], 12, str(tmp_path / "c"), 5, 4, "auto", 250, True, False, "cpu", False)

    config = load_config(config_path, ["teacher.model=null", f"teacher.cache={tmp_path / 'c'}"])
    tokenizer = load_tokenizer(config.student)
    train, _ = build_datasets(config.data, tokenizer)
    teacher = CachedTeacher(tmp_path / "c")
    teacher.bind(train, config)
    batch = collate([train[i] for i in (3, 1)], tokenizer.pad_token_id, [3, 1])
    signal = teacher(batch, SignalRequest())
    assert torch.isfinite(signal.topk_logprobs).all() and signal.topk_ids.max() < vocab


def test_cli_bad_input_exits_with_code_2(tiny_teacher_config, tmp_path, monkeypatch, capsys):
    from alambic.cli import main

    config_path, _ = tiny_teacher_config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for flags, message in ((["--k", "100000"], "--k must be in 1.."), (["--value-bits", "many"], "--value-bits must be")):
        monkeypatch.setattr(sys, "argv", ["alambic", "cache-logits", str(config_path), *flags, "--out", str(tmp_path / "c")])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- quality (slow)


@pytest.mark.slow
def test_kd_from_a_k64_cache_is_within_1_percent_of_full_logit_kd(tiny_setup, tmp_path):
    import yaml
    from helpers import kd_config

    from alambic.cache.cli import cache_logits
    from alambic.config import ModelConfig, load_config
    from alambic.data import build_datasets
    from alambic.models import freeze, load_model, load_teacher
    from alambic.teachers.live import LiveTeacher
    from alambic.evaluate.heldout import evaluate
    from alambic.training.loop import run_distillation
    from alambic.models.module import StudentModule

    config = kd_config(tiny_setup, tmp_path / "full", max_steps=60, eval_every=60, lr=5e-3)
    config_path = tmp_path / "kd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cache_logits(str(config_path), [], 64, str(tmp_path / "cache"), 64, 8, "auto", 250, False, False, "cpu", False)
    full = run_distillation(load_config(config_path))
    cached = run_distillation(
        load_config(config_path, ["teacher.model=null", f"teacher.cache={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'cached'}"])
    )
    resolved = load_config(config_path)
    model, tokenizer = load_teacher(resolved)
    _, held_out = build_datasets(resolved.data, tokenizer)
    teacher = LiveTeacher(model, len(tokenizer))
    kl = {}
    for name, run in (("full", full), ("cached", cached)):
        student = StudentModule(freeze(load_model(ModelConfig(model=str(run.output_dir / "final")), "causal_lm", "student")), len(tokenizer))
        kl[name] = evaluate(student, teacher, held_out, "causal_lm", tokenizer.pad_token_id, 8, "cpu")["eval_kl"]
    initial = StudentModule(freeze(load_model(ModelConfig(model=str(tiny_setup["student_init"])), "causal_lm", "student")), len(tokenizer))
    kl_before = evaluate(initial, teacher, held_out, "causal_lm", tokenizer.pad_token_id, 8, "cpu")["eval_kl"]
    assert kl["full"] < 0.7 * kl_before  # both runs actually learned from their teacher signal
    assert kl["cached"] <= 1.01 * kl["full"], kl
