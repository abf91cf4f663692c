"""What a served teacher (`teacher.server`) cannot be combined with, checked before anything loads.

Field checks run when the config is validated; `served_config_problems` lists
the run-level conflicts (the compatibility table calls it), each as
(setting, why, how to fix).
"""

from __future__ import annotations

from urllib.parse import urlparse

SERVER_TEMPERATURE = 1.0  # vLLM's prompt_logprobs are log_softmax of the raw logits


def check_server_fields(teacher) -> None:
    """Raise ValueError (shown as a config error) for a teacher section that cannot describe a served teacher."""
    parsed = urlparse(teacher.server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"teacher.server must be an http(s) URL such as http://127.0.0.1:8000/v1, got {teacher.server!r}"
        )
    if teacher.model is not None or teacher.cache is not None:
        raise ValueError(
            "teacher.server cannot be combined with teacher.model or teacher.cache: a served teacher never loads "
            "in the training job (name the served model with teacher.server_model)"
        )
    if teacher.server_model is None:
        raise ValueError("teacher.server needs teacher.server_model: the model name the server must list")
    if teacher.top_k is None:
        raise ValueError("teacher.server needs teacher.top_k: log-probabilities per position (<= --max-logprobs)")


def served_config_problems(config) -> list[tuple[str, str, str]]:
    """(setting, why it conflicts with a served teacher, fix) for every conflict in a run config."""
    problems = []
    if any(t.server is not None for t in config.teachers):
        problems.append(("teachers", "ensemble members are loaded models or caches; a served member is not supported",
                         "use one served teacher (teacher.server) or live/cached ensemble members"))
    teacher = config.teacher
    if teacher is None or teacher.server is None:
        return problems
    if config.task != "causal_lm":
        problems.append(("task", "a served teacher returns next-token log-probabilities", "set task: causal_lm"))
    if abs(config.loss.temperature - SERVER_TEMPERATURE) > 1e-9:
        problems.append((
            "loss.temperature",
            f"the server returns log-probabilities at temperature 1 and a top-k cannot be re-tempered "
            f"(loss.temperature is {config.loss.temperature})",
            "set loss.temperature: 1",
        ))
    if config.loss.objective == "cosine":
        problems.append(("loss.objective", "cosine needs raw logits; a server returns top-k log-probabilities",
                         "use forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd"))
    if config.data.packing:
        problems.append(("data.packing", "the server scores each row from position 0; packed rows restart "
                         "positions mid-row", "set data.packing: false"))
    if config.representation is not None:
        problems.append(("representation", "a server returns no hidden states or attentions",
                         "use a live teacher (teacher.model) for representation transfer"))
    if config.cross_tokenizer is not None:
        problems.append(("cross_tokenizer", "a served teacher's ids must be the student's tokenizer's ids",
                         "use a live teacher (teacher.model) for cross-tokenizer distillation"))
    if config.rollout.policy in ("sequence_level", "minillm"):
        problems.append(("rollout.policy", f"{config.rollout.policy!r} samples from the teacher model, which a "
                         "served teacher does not load", "use policy off_policy or on_policy (GKD)"))
    return problems


def check_served_config(config) -> None:
    """Raise a ConfigError listing every conflict (what, where, how to fix)."""
    from alambic.errors import ConfigError

    problems = served_config_problems(config)
    if problems:
        lines = [f"  - {setting}: {why} (fix: {fix})" for setting, why, fix in problems]
        raise ConfigError("the served teacher (teacher.server) cannot run with these settings:\n" + "\n".join(lines),
                          "change the settings listed above")
