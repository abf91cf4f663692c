"""Build what a run needs from its config: student, teacher signal source, tokenizer, mode hooks.

The order is fixed and explicit: load the models; let the one mode that brings
its own teacher provide it (training/modes), else take the config's teacher
section (a live model, a logit cache, or logprobs stored in the data); then let
every mode add its terms, rollout and hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alambic.config import DistillConfig
from alambic.errors import ModelError
from alambic.models import check_tokenizers_compatible, freeze, load_model, load_tokenizer
from alambic.models.module import StudentModule
from alambic.teachers.live import LiveTeacher
from alambic.teachers.vocab_map import teacher_for_student
from alambic.training.modes import TeacherChoice, choose_teacher, configure_modes


@dataclass
class RunSetup:
    """Everything a run is assembled from before the loop starts: models, teacher source, mode hooks."""

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

    def use_teacher(self, choice: TeacherChoice) -> None:
        self.teacher, self.teacher_name, self.teacher_evaluable = choice.source, choice.name, choice.evaluable
        if choice.model is not None:
            self.teacher_model = choice.model
        if choice.tokenizer is not None:
            self.teacher_tokenizer = choice.tokenizer

    def bind_teacher(self, train_data):
        """Sources tied to a dataset (an offline cache) check it is the same data."""
        bind = getattr(self.teacher, "bind", None)
        if bind is not None:
            bind(train_data, self.config)
        return self.teacher


def _empty(device) -> bool:
    """A meta build device: shapes only, the weights come from the main process (FSDP, training/distributed.py)."""
    return getattr(device, "type", str(device)) == "meta"


def _student_model(config: DistillConfig, teacher_model, device=None):
    if config.student.from_teacher is not None:
        from alambic.models.student import layer_indices_for, select_layers

        init = config.student.from_teacher
        total = teacher_model.config.num_hidden_layers
        keep = init.num_layers or (None if init.every_k is not None else max(1, total // 2))
        return select_layers(teacher_model, layer_indices_for(total, keep, init.layers, init.every_k))
    return load_model(config.student, config.task, role="student", empty=_empty(device))


def _config_teacher(config: DistillConfig, teacher_model, vocab_size, tokenizer, teacher_tokenizer=None) -> TeacherChoice:
    """The teacher of the config's own sections, when no mode brings one."""
    teacher_cfg = config.teacher
    if teacher_model is not None:
        live = LiveTeacher(teacher_model, vocab_size)
        if config.task == "sequence_classification":  # a trimmed-vocabulary student: the teacher reads its own ids
            live = teacher_for_student(live, teacher_tokenizer, tokenizer, config.student.model)
        return TeacherChoice(live, teacher_cfg.model, True, teacher_model)
    if teacher_cfg is not None and teacher_cfg.cache is not None:
        from alambic.teachers.cached import open_cache  # a token top-k cache, or a classifier's class logits

        return TeacherChoice(open_cache(teacher_cfg.cache, config.task, verify="all"), f"logit cache {teacher_cfg.cache}", False)
    if teacher_cfg is not None and teacher_cfg.server is not None:  # never loaded here: asked over HTTP
        from alambic.teachers.served import ServedTeacher

        served = ServedTeacher(teacher_cfg, tokenizer, vocab_size or len(tokenizer), config.train.seed)
        return TeacherChoice(served, served.name, False)
    if config.data.logprobs_column is not None:  # the teacher's logprobs are in the data
        from alambic.teachers.record_logprobs import RecordLogprobTeacher

        # A top-k on the records' own tokens only: not evaluable on other text.
        record_teacher = RecordLogprobTeacher(config.data.logprobs_column)
        return TeacherChoice(record_teacher, record_teacher.name, False)
    return TeacherChoice(None, None, False)


def build_models(config: DistillConfig, device, mode_order=None) -> RunSetup:
    """`mode_order`: the order modes are applied in (tests only: the result does not depend on it)."""
    teacher_cfg = config.teacher
    teacher_model = teacher_tokenizer = None
    if teacher_cfg is not None and teacher_cfg.model is not None:
        teacher_tokenizer = load_tokenizer(teacher_cfg, role="teacher")
        teacher_model = freeze(load_model(teacher_cfg, config.task, role="teacher", empty=_empty(device))).to(device)
    student_model = _student_model(config, teacher_model, device)
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
    student = StudentModule(student_model, vocab_size).to(device)
    setup = RunSetup(student, None, tokenizer, None, False, config)
    setup.teacher_model, setup.teacher_tokenizer = teacher_model, teacher_tokenizer
    setup.vocab_size, setup.device = vocab_size, device
    setup.use_teacher(choose_teacher(setup, config, mode_order) or _config_teacher(config, teacher_model, vocab_size,
                                                                                   tokenizer, teacher_tokenizer))
    if hasattr(setup.teacher, "finish"):  # e.g. a served teacher completes its streamed cache, writes its statistics
        setup.after_train.append(setup.teacher.finish)
    configure_modes(setup, config, mode_order)  # terms, rollouts, hooks
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
