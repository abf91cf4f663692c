"""An offline teacher: top-k distributions read from a logit cache, no model loaded.

The cache is tied to the exact token rows it was computed on; `bind` checks the
training data, tokenizer and loss temperature against the cache's manifest
before the first step, and every batch checks its row lengths.

    alambic cache-logits configs/tiny_kd.yaml --k 64 --out runs/cache
    alambic distill configs/tiny_kd.yaml teacher.model=null teacher.cache=runs/cache
"""

from __future__ import annotations

from pathlib import Path

import torch

from alambic.cache.identity import rows_hash, tokenizer_hash
from alambic.cache.reader import LogitCache
from alambic.errors import ConfigError, DataError
from alambic.losses.sparse import check_cache_temperature
from alambic.teachers.base import SignalRequest, TeacherSignal

REBUILD = "rebuild the cache for this data (alambic cache-logits CONFIG --out FOLDER)"


class CachedTeacher:
    """A `TeacherSource` whose signal is the cached sparse top-k teacher distribution."""

    def __init__(self, cache_dir: str | Path, *, expected_fingerprint: str | None = None, verify: str = "lazy"):
        self.cache = LogitCache(cache_dir, verify=verify)
        identity = self.cache.identity
        self.name = f"logit cache of {identity.teacher} ({cache_dir})"
        self.temperature = identity.temperature
        if expected_fingerprint is not None and expected_fingerprint != identity.dataset_fingerprint:
            raise DataError(
                f"the logit cache {cache_dir} was computed on dataset {identity.dataset_fingerprint}, "
                f"this run's training data is {expected_fingerprint}",
                REBUILD,
            )

    def bind(self, train_data, config=None, tokenizer=None) -> None:
        """Refuse a cache that does not belong to this run's data, tokenizer or temperature."""
        identity = self.cache.identity
        if config is not None:
            check_cache_temperature(identity.temperature, config.loss.temperature, f"the logit cache {self.cache.folder}")
        if len(train_data) != identity.num_rows:
            raise DataError(
                f"the logit cache {self.cache.folder} covers {identity.num_rows} training rows, "
                f"this run's training data has {len(train_data)}",
                f"use the same data settings as when the cache was made, or {REBUILD}",
            )
        if getattr(train_data, "fingerprint", None) != identity.dataset_fingerprint:
            # The fingerprint also names the tokenizer's folder; identical token rows are what matter.
            digest, _ = rows_hash(train_data)
            if digest != identity.rows_hash:
                raise DataError(
                    f"the logit cache {self.cache.folder} was computed on other token rows than this run's "
                    f"training data (dataset fingerprint {identity.dataset_fingerprint} vs "
                    f"{getattr(train_data, 'fingerprint', '?')})",
                    f"use the data, tokenizer and data.* settings the cache was made with, or {REBUILD}",
                )
        if tokenizer is None and config is not None and getattr(config.student, "model", None):
            from alambic.models import load_tokenizer

            tokenizer = load_tokenizer(config.student, role="student")
        if tokenizer is not None and tokenizer_hash(tokenizer) != identity.tokenizer_hash:
            raise ConfigError(
                f"the student's tokenizer differs from the tokenizer of the teacher whose logits are cached in "
                f"{self.cache.folder}: the cached token ids would mean other tokens",
                "use a student with the teacher's tokenizer",
            )

    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal:
        if request.hidden_states or request.attentions:
            raise ConfigError(
                "the offline logit cache holds only top-k log-probabilities, not hidden states or attentions",
                "use a live teacher (teacher.model) for representation-transfer losses",
            )
        if "row_index" not in batch:
            raise ValueError("a cached teacher needs batch['row_index'] (the dataset index of each row)")
        input_ids = batch["input_ids"]
        length = input_ids.shape[1]
        arrays = self.cache.read_rows(batch["row_index"].tolist(), length)
        lengths = batch["attention_mask"].sum(dim=1).cpu().numpy() if "attention_mask" in batch else None
        if lengths is not None and (arrays["lengths"] != lengths).any():
            row = int(batch["row_index"][(arrays["lengths"] != lengths).argmax()])
            raise DataError(
                f"row {row} has a different length in the logit cache {self.cache.folder} than in the training data",
                REBUILD,
            )
        device = input_ids.device
        return TeacherSignal(
            topk_ids=torch.from_numpy(arrays["topk_ids"]).to(device, non_blocking=True),
            topk_logprobs=torch.from_numpy(arrays["topk_logprobs"]).to(device, non_blocking=True),
            tail_logmass=torch.from_numpy(arrays["tail_logmass"]).to(device, non_blocking=True),
            temperature=self.temperature,
        )


def open_cache(folder, task: str = "causal_lm", verify: str = "lazy"):
    """The teacher source of a cache folder: a classifier's whole class logits, or a top-k token cache."""
    from alambic.cache.class_logits import ClassLogitTeacher, is_class_logit_cache

    if task == "sequence_classification" or is_class_logit_cache(folder):
        if task != "sequence_classification":
            raise ConfigError(f"{folder} caches a classifier's class logits; this run's task is {task}",
                              "point teacher.cache at a token logit cache made for this task")
        return ClassLogitTeacher(folder)
    return CachedTeacher(folder, verify=verify)
