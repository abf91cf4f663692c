"""Checks that need the loaded models and data, run before the run folder is written.

Class ids must fit the student's classifier head: an id outside 0..C-1 would
otherwise surface mid-run as an IndexError from the loss. -100 (the ignore
index) is accepted: it marks a row without a label.
"""

from __future__ import annotations

from alambic.data.formats import IGNORE
from alambic.errors import DataError


def check_class_labels(config, student, *datasets) -> None:
    if config.task != "sequence_classification":
        return
    classes = getattr(getattr(getattr(student, "model", student), "config", None), "num_labels", None)
    if not classes:
        return
    for dataset in datasets:
        if dataset is None:
            continue
        for index, row in enumerate(dataset.rows):
            label = row.get("label")
            if label is None or label == IGNORE or 0 <= label < classes:
                continue
            raise DataError(
                f"{dataset.source}: row {index} has class id {label}, but the student classifies into {classes} "
                f"classes (ids 0..{classes - 1})",
                f"map labels to 0..{classes - 1}, or set student.num_labels to the number of classes",
            )
