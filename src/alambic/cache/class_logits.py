"""A classification teacher's logits, stored whole: one row of C class logits per training row.

Class logits are small (C floats per row, 20 bytes for 5 classes), so no top-k or
quantisation: `class_logits.safetensors` holds a float32 [rows, classes] tensor and
`manifest.json` says what it belongs to. The folder is written with
`durable.atomic_dir`: a killed run leaves no cache at all, and running the command
again redoes the (short) pass.

A cache is tied to the training *records* (texts, in order, labelled pool repeats and
unlabelled pool included), not to token ids: a student with a trimmed or remapped
vocabulary (init-student's vocabulary trimming) reads the same rows through other ids
and still learns from the cache.

    alambic cache-logits configs/classify_transfer.yaml --out runs/classify-cache
    alambic distill configs/classify_transfer.yaml teacher.model=null teacher.cache=runs/classify-cache
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alambic.errors import ConfigError, DataError

KIND = "class_logits"
MANIFEST = "manifest.json"
TENSORS = "class_logits.safetensors"
REBUILD = "rebuild the cache for this data (alambic cache-logits CONFIG --out FOLDER)"


def is_class_logit_cache(folder: str | Path) -> bool:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False


def _refuse_existing(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        what = "a classification logit cache" if is_class_logit_cache(folder) else "files that are not a cache"
        raise ConfigError(f"--out {str(folder)!r} already holds {what}", "pass --overwrite or choose another folder")


@torch.no_grad()
def compute_class_logits(model, train_data, pad_token_id: int, batch_size: int, device, progress: bool) -> torch.Tensor:
    """[rows, classes] float32 logits of `model` on every row of `train_data`, in order.

    Identical rows (a labelled pool repeated by data.labelled_repeat) run through the teacher once.
    """
    from alambic.data import collate

    first: dict[tuple, int] = {}
    slot = [first.setdefault(tuple(train_data[i]["input_ids"]), len(first)) for i in range(len(train_data))]
    unique = [None] * len(first)
    for index, position in enumerate(slot):
        if unique[position] is None:
            unique[position] = train_data[index]
    chunks = []
    starts = range(0, len(unique), batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description="teacher logits", transient=True)
    for start in starts:
        batch = collate(unique[start : start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        chunks.append(logits.float().cpu())
    return torch.cat(chunks)[torch.tensor(slot, dtype=torch.long)]


def write_class_logit_cache(folder: str | Path, logits: torch.Tensor, identity: dict, overwrite: bool = False) -> dict:
    from safetensors.torch import save_file

    from alambic.durable import atomic_dir, atomic_write_json

    folder = Path(folder)
    _refuse_existing(folder, overwrite)
    manifest = {"kind": KIND, "num_rows": int(logits.shape[0]), "num_classes": int(logits.shape[1]), **identity}
    with atomic_dir(folder) as temporary:
        save_file({"logits": logits.contiguous()}, str(temporary / TENSORS))
        atomic_write_json(temporary / MANIFEST, manifest)
    return manifest


def records_identity(train_data) -> str:
    digest = getattr(train_data, "records_hash", "")
    if not digest:
        raise DataError("this training set carries no records hash (built outside build_datasets)")
    return digest


class ClassLogitTeacher:
    """A `TeacherSource` reading a classification logit cache by dataset row: no model is loaded."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        if not is_class_logit_cache(self.folder):
            raise ConfigError(f"{str(self.folder)!r} is not a classification logit cache (no {MANIFEST} of kind {KIND})",
                              "make one with alambic cache-logits CONFIG --out FOLDER")
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.logits = load_file(str(self.folder / TENSORS))["logits"]
        if tuple(self.logits.shape) != (self.manifest["num_rows"], self.manifest["num_classes"]):
            raise DataError(f"the classification logit cache {self.folder} is damaged (shape "
                            f"{tuple(self.logits.shape)} vs its manifest)", REBUILD)
        self.name = f"class-logit cache of {self.manifest.get('teacher')} ({self.folder})"

    def bind(self, train_data, config=None, tokenizer=None) -> None:
        """Refuse a cache computed on other records (or another number of rows, or truncation)."""
        rows = self.manifest["num_rows"]
        if len(train_data) != rows:
            raise DataError(f"the classification logit cache {self.folder} covers {rows} training rows, this run's "
                            f"training data has {len(train_data)}", f"use the data settings the cache was made with, or {REBUILD}")
        if records_identity(train_data) != self.manifest["records_hash"]:
            raise DataError(f"the classification logit cache {self.folder} was computed on other training records",
                            f"use the data files and data.* settings the cache was made with, or {REBUILD}")
        if config is not None and config.data.max_length != self.manifest.get("max_length"):
            raise DataError(f"the cache {self.folder} saw rows cut at {self.manifest.get('max_length')} tokens, this "
                            f"run cuts at data.max_length={config.data.max_length}", f"set the same max_length, or {REBUILD}")
        classes = getattr(getattr(config, "student", None), "num_labels", None)
        if classes is not None and classes != self.manifest["num_classes"]:
            raise ConfigError(f"the cache holds {self.manifest['num_classes']} classes, student.num_labels is {classes}",
                              "set student.num_labels to the teacher's number of classes")

    def __call__(self, batch: dict, request):
        from alambic.teachers.base import TeacherSignal

        if request.hidden_states or request.attentions:
            raise ConfigError("a logit cache holds no hidden states or attentions",
                              "use a live teacher (teacher.model) for representation-transfer losses")
        if "row_index" not in batch:
            raise ValueError("a cached teacher needs batch['row_index'] (the dataset index of each row)")
        logits = self.logits[batch["row_index"].cpu()]
        return TeacherSignal(logits=logits.to(batch["input_ids"].device))


def cache_class_logits(config, out: str | None, batch_size: int, overwrite: bool, device: str | None,
                       progress: bool) -> dict:
    """`alambic cache-logits` for task: sequence_classification; returns the manifest."""
    from alambic.cache.identity import weight_hash
    from alambic.data import build_datasets
    from alambic.models import freeze, load_model, load_tokenizer

    if config.teacher is None or config.teacher.model is None:
        raise ConfigError("cache-logits runs the teacher: set teacher.model in the config", "e.g. teacher.model=org/model")
    folder = Path(out or config.teacher.cache or "")
    if not str(out or config.teacher.cache or ""):
        raise ConfigError("where should the cache go? pass --out FOLDER (or set teacher.cache)")
    _refuse_existing(folder, overwrite)  # before loading the teacher
    tokenizer = load_tokenizer(config.teacher, role="teacher")
    train, _ = build_datasets(config.data, tokenizer, task=config.task, seed=config.train.seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = freeze(load_model(config.teacher, config.task, role="teacher")).to(device).eval()
    logits = compute_class_logits(model, train, tokenizer.pad_token_id, batch_size, device, progress)
    identity = {"teacher": config.teacher.model, "teacher_weight_hash": weight_hash(model),
                "records_hash": records_identity(train), "max_length": config.data.max_length,
                "class_names": [model.config.id2label.get(i, str(i)) for i in range(logits.shape[1])]}
    return write_class_logit_cache(folder, logits, identity, overwrite)
