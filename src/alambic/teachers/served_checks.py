"""The fields of a served teacher (`teacher.server`), checked when the config is validated.

What a served teacher cannot be combined with (loss.temperature other than 1,
packing, cosine, ...) is in the one compatibility table, alambic/compat.py.
"""

from __future__ import annotations

from urllib.parse import urlparse

def check_server_fields(teacher) -> None:
    """Raise ValueError (shown as a config error) for a teacher section that cannot describe a served teacher."""
    if teacher.server is None:
        raise ValueError("teacher.served configures a served teacher: set teacher.server too (or remove teacher.served)")
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
