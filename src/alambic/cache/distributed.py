"""`alambic cache-logits` on several processes (torchrun / accelerate launch): ONE cache, one manifest.

Each process runs its own (replicated) copy of the teacher over its share of
the shards (shard i goes to process i mod N) and writes each shard file
atomically, exactly as one process would (same rows, same batches, so the
same bytes). Finished shards are recorded in the process's own journal
`parts/rank-<r>.json` (replaced atomically), so processes never write one file
together. At the end the main process checks every journaled shard (size,
sha256) and merges the journals into `manifest.json`.

A run killed at any moment (kill -9 of any process) leaves complete shard files,
journals that list only finished ones, and the manifest of the last merge;
`--resume` (on any number of processes) first merges the journals, then
computes only the shards still missing.

    torchrun --nproc_per_node 8 -m alambic.cli cache-logits CONFIG --k 64 --out runs/cache
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alambic.cache.format import MANIFEST_NAME, sha256_file, shard_name, write_manifest, write_shard
from alambic.durable import atomic_write_json
from alambic.errors import AlambicError, DataError

JOURNALS = "parts"


def merge_journals(folder: Path) -> None:
    """Add the shards journaled by the processes of an earlier run to the manifest (main process only)."""
    folder = Path(folder)
    journal_dir = folder / JOURNALS
    if not journal_dir.exists() or not (folder / MANIFEST_NAME).exists():
        shutil.rmtree(journal_dir, ignore_errors=True)
        return
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    known = {entry["index"] for entry in manifest["shards"]}
    for journal in sorted(journal_dir.glob("rank-*.json")):
        for entry in json.loads(journal.read_text()):
            path = folder / entry["file"]
            intact = path.exists() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]
            if entry["index"] not in known and intact:
                manifest["shards"].append(entry)
                known.add(entry["index"])
    manifest["shards"].sort(key=lambda entry: entry["index"])
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    write_manifest(folder, manifest)
    shutil.rmtree(journal_dir)


def _on_main(work):
    """Run `work` on the main process; an AlambicError there is raised on every process."""
    import torch.distributed as dist

    outcome = [None]
    if dist.get_rank() == 0:
        try:
            work()
        except AlambicError as err:
            outcome = [(type(err), err.message, err.hint)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        kind, message, hint = outcome[0]
        raise kind(message, hint)


def write_logit_cache_distributed(
    folder, rows, compute_logits, identity, *, batch_size, pad_token_id, resume, overwrite
) -> dict:
    """Collective: every process of the group calls it; returns the final manifest."""
    import torch.distributed as dist

    from alambic.cache.writer import encode_shard_rows, prepare_folder

    folder = Path(folder)
    rank, world = dist.get_rank(), dist.get_world_size()

    def prepare():
        if resume and not overwrite:
            merge_journals(folder)
        prepare_folder(folder, identity, resume, overwrite)
        shutil.rmtree(folder / JOURNALS, ignore_errors=True)
        (folder / JOURNALS).mkdir()

    _on_main(prepare)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    done = {entry["index"] for entry in manifest["shards"]}
    missing = [index for index in range(identity.num_shards) if index not in done]
    journal, mine = folder / JOURNALS / f"rank-{rank:05d}.json", []
    for index in missing[rank::world]:
        start, stop = identity.shard_bounds(index)
        shard_rows = [rows[i] for i in range(start, stop)]
        offsets, records = encode_shard_rows(shard_rows, compute_logits, identity, batch_size, pad_token_id)
        size, checksum = write_shard(folder / shard_name(index), offsets, records)
        mine.append({"index": index, "file": shard_name(index), "rows": [start, stop], "tokens": int(offsets[-1]),
                     "bytes": size, "sha256": checksum})
        atomic_write_json(journal, mine)
    dist.barrier()

    def finish():
        merge_journals(folder)
        merged = json.loads((folder / MANIFEST_NAME).read_text())
        if not merged["complete"]:
            raise DataError(f"the logit cache in {folder} is missing shards after every process finished",
                            "run the same command again with --resume")

    _on_main(finish)
    return json.loads((folder / MANIFEST_NAME).read_text())
