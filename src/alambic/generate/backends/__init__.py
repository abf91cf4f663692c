"""Teacher backends: `openai` (any OpenAI-compatible server), `hf` (local transformers), `vllm` (optional)."""

from __future__ import annotations

from alambic.generate.backends.base import TeacherBackend, TeacherReply, TeacherRequest
from alambic.generate.config import TeacherBackendConfig


def make_backend(config: TeacherBackendConfig, api_key: str | None) -> TeacherBackend:
    """Build the chosen backend; heavy libraries are imported only for the one chosen."""
    if config.backend == "openai":
        from alambic.generate.backends.openai_backend import OpenAITeacher

        return OpenAITeacher(config, api_key)
    if config.backend == "hf":
        from alambic.generate.backends.hf_backend import HFTeacher

        return HFTeacher(config)
    from alambic.generate.backends.vllm_backend import VLLMTeacher

    return VLLMTeacher(config)


__all__ = ["TeacherBackend", "TeacherReply", "TeacherRequest", "make_backend"]
