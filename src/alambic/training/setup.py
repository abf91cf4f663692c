"""Build what a run needs from its config: student, teacher signal source, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

from alambic.config import DistillConfig
from alambic.errors import ModelError
from alambic.models import check_tokenizers_compatible, freeze, load_model, load_tokenizer
from alambic.teachers.live import LiveTeacher
from alambic.training.modes import configure_modes
from alambic.models.module import StudentModule


@dataclass
class RunModels:
    student: StudentModule
    teacher: object | None
    tokenizer: object
    teacher_name: str | None
    teacher_evaluable: bool  # a dense signal on any text (a cache only covers its own rows)
    config: DistillConfig
    # Mode hooks (training/modes): a rollout replaces or extends a batch before the loss;
    # extra terms add to the loss; after_step hooks run after each optimiser step.
    rollout: object = field(default=lambda batch, step: batch)
    extra_terms: list = field(default_factory=list)
    after_step: list = field(default_factory=list)
    after_train: list = field(default_factory=list)  # (student_module, run_dir) on the main process, after export
    teacher_model: object | None = None  # the live teacher's HF model, when there is one
    teacher_tokenizer: object | None = None
    vocab_size: int | None = None
    device: object = None

    def bind_teacher(self, train_data):
        """Sources tied to a dataset (an offline cache) check it is the same data."""
        bind = getattr(self.teacher, "bind", None)
        if bind is not None:
            bind(train_data, self.config)
        return self.teacher


def _student_model(config: DistillConfig, teacher_model):
    if config.student.from_teacher is not None:
        from alambic.models.student import layer_indices_for, select_layers

        init = config.student.from_teacher
        total = teacher_model.config.num_hidden_layers
        strategy = init.layers if isinstance(init.layers, list) else init.layers
        keep = init.num_layers or max(1, total // 2)
        indices = layer_indices_for(total, keep, strategy) if not isinstance(strategy, list) else strategy
        return select_layers(teacher_model, indices)
    return load_model(config.student, config.task, role="student")


def build_models(config: DistillConfig, device) -> RunModels:
    teacher_cfg = config.teacher
    record_teacher = None
    if teacher_cfg is None and config.data.logprobs_column is not None:  # the teacher's logprobs are in the data
        from alambic.teachers.record_logprobs import RecordLogprobTeacher, check_record_logprobs_config

        check_record_logprobs_config(config)  # before any model loads
        record_teacher = RecordLogprobTeacher(config.data.logprobs_column)
    teacher_model = teacher_tokenizer = None
    if teacher_cfg is not None and teacher_cfg.model is not None:
        teacher_tokenizer = load_tokenizer(teacher_cfg, role="teacher")
        teacher_model = freeze(load_model(teacher_cfg, config.task, role="teacher")).to(device)
    student_model = _student_model(config, teacher_model)
    for parameter in student_model.parameters():
        parameter.requires_grad_(True)
    student_model.train()
    tokenizer = teacher_tokenizer if config.student.model is None else load_tokenizer(config.student, role="student")
    vocab_size = None
    if config.task == "causal_lm":
        vocab_size = len(tokenizer)
        # Cross-tokenizer distillation (modes/cross_tokenizer.py) checks its own pair of tokenizers.
        if teacher_tokenizer is not None and config.cross_tokenizer is None:
            vocab_size = check_tokenizers_compatible(teacher_tokenizer, tokenizer, teacher_model, student_model)
    elif teacher_model is not None:
        _check_same_classes(teacher_model, student_model)
    teacher, evaluable, name = None, False, None
    if teacher_model is not None:
        teacher, evaluable, name = LiveTeacher(teacher_model, vocab_size), True, teacher_cfg.model
    elif teacher_cfg is not None and teacher_cfg.cache is not None:
        from alambic.teachers.cached import CachedTeacher

        teacher, name = CachedTeacher(teacher_cfg.cache, verify="all"), f"logit cache {teacher_cfg.cache}"
    elif record_teacher is not None:  # a top-k on the records' own tokens only: not evaluable on other text
        teacher, name = record_teacher, record_teacher.name
    student = StudentModule(student_model, vocab_size).to(device)
    setup = RunModels(student, teacher, tokenizer, name, evaluable, config)
    setup.teacher_model, setup.teacher_tokenizer = teacher_model, teacher_tokenizer
    setup.vocab_size, setup.device = vocab_size, device
    configure_modes(setup, config)  # modes may swap the teacher, add rollouts, terms, hooks
    setup.student.to(device)  # auxiliary modules added by modes follow the student
    return setup


def _check_same_classes(teacher_model, student_model) -> None:
    teacher_classes = teacher_model.config.num_labels
    student_classes = student_model.config.num_labels
    if teacher_classes != student_classes:
        raise ModelError(
            f"the teacher classifies into {teacher_classes} classes and the student into {student_classes}",
            "set student.num_labels to the teacher's number of classes",
        )
