"""Models: loading teacher and student, building students from the teacher, vocab checks."""

from alambic.models.loading import (
    check_tokenizers_compatible,
    freeze,
    load_model,
    load_tokenizer,
    resolve_model_source,
)


def load_teacher(config):
    """(frozen teacher model, its tokenizer) for a DistillConfig with teacher.model set."""
    tokenizer = load_tokenizer(config.teacher, role="teacher")
    model = freeze(load_model(config.teacher, config.task, role="teacher"))
    return model, tokenizer


__all__ = [
    "check_tokenizers_compatible",
    "freeze",
    "load_model",
    "load_teacher",
    "load_tokenizer",
    "resolve_model_source",
]
