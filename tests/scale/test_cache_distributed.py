"""`alambic cache-logits` on 2 processes (torchrun, gloo): one cache, equal to the 1-process cache."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from alambic.cache.cli import cache_logits
from alambic.cache.reader import LogitCache
from helpers import REPO, kd_config, write_config

ARGS = ["--k", "16", "--shard-rows", "7", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def _decoded(folder):
    cache = LogitCache(folder, verify="all")
    return [cache.decode(cache.row_records(row)) for row in range(len(cache))]


def test_two_processes_write_one_cache_equal_to_one_process(tiny_setup, tmp_path):
    config = write_config(tmp_path / "c.yaml", kd_config(tiny_setup, tmp_path / "unused"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "alambic.cli", "cache-logits", str(config), "--out", str(tmp_path / "two"), *ARGS]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cached ") == 1  # one summary, from the main process
    one = cache_logits(str(config), [], 16, str(tmp_path / "one"), 7, 4, "auto", 250, False, False, "cpu", False)
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["complete"] and len(two["shards"]) == len(one["shards"]) == one["num_shards"] >= 3
    assert not (tmp_path / "two" / "parts").exists()  # journals merged into the one manifest
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
    for (ids_a, lp_a, tail_a), (ids_b, lp_b, tail_b) in zip(_decoded(tmp_path / "two"), _decoded(tmp_path / "one")):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(lp_a, lp_b)
        np.testing.assert_array_equal(tail_a, tail_b)

    # An interrupted 2-process run: the manifest lists shard 0 only, a process journaled shard 1,
    # shard 2's file was being written (torn). Resumed on 1 process, it completes to the same cache.
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "two", torn)
    manifest = json.loads((torn / "manifest.json").read_text())
    entries = manifest["shards"]
    manifest["shards"], manifest["complete"] = entries[:1], False
    (torn / "manifest.json").write_text(json.dumps(manifest))
    (torn / "parts").mkdir()
    (torn / "parts" / "rank-00001.json").write_text(json.dumps([entries[1]]))
    (torn / entries[2]["file"]).write_bytes(b"torn")
    resumed = cache_logits(str(config), [], 16, str(torn), 7, 4, "auto", 250, True, False, "cpu", False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in one["shards"]]
