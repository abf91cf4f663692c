"""Multi-teacher distillation (`teachers:` + `ensemble:`): the teacher source becomes an ensemble.

Every teacher (a live `model` or an offline `cache`) must share the student's
tokenizer; how they are combined is `alambic.teachers.ensemble`.

    alambic distill configs/multi_teacher.yaml
"""

from __future__ import annotations

from alambic.config_modes import EnsembleConfig
from alambic.data.files import read_records
from alambic.data.formats import ENCODERS
from alambic.errors import ConfigError, DataError
from alambic.models import check_tokenizers_compatible, freeze, load_model, load_tokenizer
from alambic.teachers.ensemble import EnsembleTeacher, Member, RouteTable
from alambic.teachers.live import LiveTeacher
from alambic.training.modes.base import TeacherChoice


def teacher_names(teachers) -> list[str]:
    names = [t.name or t.model or t.cache for t in teachers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"teachers: several teachers are called {duplicates[0]!r}",
            "give each teacher a distinct `name` (routing and logs refer to teachers by name)",
        )
    return names


def _live_member(teacher_cfg, index: int, setup, config):
    role = f"teachers[{index}]"
    tokenizer = load_tokenizer(teacher_cfg, role=role)
    model = freeze(load_model(teacher_cfg, config.task, role=role)).to(setup.device)
    if config.task == "causal_lm":
        check_tokenizers_compatible(tokenizer, setup.tokenizer, model, setup.student.model)
    elif model.config.num_labels != setup.student.model.config.num_labels:
        raise ConfigError(
            f"{role} classifies into {model.config.num_labels} classes and the student into "
            f"{setup.student.model.config.num_labels}",
            "every teacher must predict the student's classes",
        )
    return LiveTeacher(model, setup.vocab_size, name=teacher_cfg.model)


def _cached_member(teacher_cfg):
    from alambic.teachers.cached import CachedTeacher

    return CachedTeacher(teacher_cfg.cache)  # bind() checks its tokenizer and rows against the run


def build_route_table(config, tokenizer, names: list[str], column: str) -> RouteTable:
    """Read the data files once more and key each record's token ids to the teacher its column names."""
    data_cfg = config.data
    encode = ENCODERS[data_cfg.format]
    routes: dict[tuple[int, ...], int] = {}
    for source in [data_cfg.train] + ([data_cfg.eval] if data_cfg.eval else []):
        for index, record in enumerate(read_records(source, data_cfg.limit)):
            if column not in record:
                raise DataError(
                    f"{source}: record {index} has no column {column!r} (ensemble.route_column)",
                    f"add the column, naming one of the teachers: {', '.join(names)}",
                )
            name = str(record[column])
            if name not in names:
                raise DataError(
                    f"{source}: record {index} routes to teacher {name!r}, which is not in teachers:",
                    f"use one of the teachers' names: {', '.join(names)}",
                )
            key = tuple(encode(record, tokenizer, data_cfg, source, index)["input_ids"])
            if routes.setdefault(key, names.index(name)) != names.index(name):
                raise DataError(
                    f"{source}: record {index} has the same tokens as an earlier record but routes to another teacher",
                    "remove the duplicate record or give both the same teacher",
                )
    return RouteTable(routes, column)


def teacher(setup, config) -> TeacherChoice | None:
    """The teachers of the `teachers:` list, combined as `ensemble:` says."""
    if not config.teachers:
        return None
    if sum(t.weight for t in config.teachers) <= 0:
        raise ConfigError("every teacher has weight 0", "give at least one teacher a positive weight")
    ensemble = config.ensemble or EnsembleConfig()
    names = teacher_names(config.teachers)
    members = [
        Member(name, _live_member(t, k, setup, config) if t.model is not None else _cached_member(t), t.weight)
        for k, (name, t) in enumerate(zip(names, config.teachers))
    ]
    routes = None
    if ensemble.method == "route":
        routes = build_route_table(config, setup.tokenizer, names, ensemble.route_column)
    source = EnsembleTeacher(members, ensemble.method, ensemble.mix, config.loss.temperature, setup.vocab_size, routes)
    # Held-out KL needs a dense signal on any text; a logit cache only covers its own rows.
    return TeacherChoice(source, source.name, evaluable=all(t.model is not None for t in config.teachers))
