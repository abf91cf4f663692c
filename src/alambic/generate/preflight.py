"""What `alambic generate` checks about its teacher before writing anything (no model is loaded).

Kept apart from generate/checks.py, which the config imports: this one reads model folders and the
hub cache (alambic.models.loading), which would close an import cycle through the config.
"""

from __future__ import annotations

from pathlib import Path

from alambic.generate.checks import resolve_device


def preflight(config) -> None:
    """What can be checked about the teacher before anything is written (no model is loaded)."""
    teacher = config.teacher
    if teacher.backend == "hf":
        import torch

        from alambic.models.loading import _hub_error, _is_offline, resolve_model_source

        resolve_device(teacher.device, torch)
        source = resolve_model_source(teacher.model, "teacher")  # a missing local folder, named as such
        if source == teacher.model and not Path(source).exists() and _is_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(source, "config.json"), str):
                raise _hub_error(source, "teacher", OSError("not in the local cache"))
