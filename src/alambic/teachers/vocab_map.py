"""A live teacher for a student whose vocabulary was trimmed from the teacher's (init-student's `vocab:`).

The trimmed tokenizer encodes text to the same tokens as the teacher's, under new
ids; init-student saves the teacher id of every student id (`vocab_map.json`). The
batch's student ids are translated back before the teacher runs, so the teacher
reads exactly the tokens its own tokenizer would have produced.

A classifier student with any other tokenizer cannot take a live teacher (the
batch holds the student's ids only): it is refused with the way out, a
class-logit cache made with the teacher's own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alambic.errors import ModelError
from alambic.models.vocab_trim import VOCAB_MAP

class TranslatedTeacher:
    """Runs `inner` on the teacher ids of the batch's student ids."""

    def __init__(self, inner, teacher_ids: list[int]):
        self.inner = inner
        self.lookup = torch.tensor(teacher_ids, dtype=torch.long)
        self.name = getattr(inner, "name", "teacher")

    def __call__(self, batch: dict, request):
        lookup = self.lookup.to(batch["input_ids"].device)
        translated = dict(batch)
        translated["input_ids"] = lookup[batch["input_ids"]]
        return self.inner(translated, request)


def _same_vocabulary(teacher_tokenizer, student_tokenizer) -> bool:
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def teacher_for_student(teacher, teacher_tokenizer, student_tokenizer, student_folder: str | None):
    """The live classifier teacher as the student's batches need it (translated ids), or a clear refusal."""
    if teacher is None or teacher_tokenizer is None or _same_vocabulary(teacher_tokenizer, student_tokenizer):
        return teacher
    path = Path(student_folder or "") / VOCAB_MAP
    if student_folder and path.exists():
        mapping = json.loads(path.read_text())
        if mapping.get("teacher_vocab_size") != len(teacher_tokenizer):
            raise ModelError(f"{path} maps to a vocabulary of {mapping.get('teacher_vocab_size')} tokens, the teacher "
                             f"has {len(teacher_tokenizer)}", "use the teacher the student was built from")
        return TranslatedTeacher(teacher, mapping["teacher_ids"])
    raise ModelError(
        "the student's tokenizer differs from the teacher's and the student folder has no vocab_map.json, so the "
        "teacher cannot read the student's batches",
        "label the data once with the teacher (alambic cache-logits CONFIG --out DIR) and train with "
        "teacher.cache=DIR, or build the student with alambic init-student (which writes vocab_map.json)",
    )
