"""Checks of `alambic generate` that turn a silent bad run into a clear stop (exit 2).

- a base URL that is not an http(s) URL with a host is a config error, found before anything is written;
- a backend that drops the log-probabilities asked for is found on its first answer, before it is stored;
- a run in which every request failed is an error, never a success.
"""

from __future__ import annotations


from alambic.errors import AlambicError, ConfigError
from alambic.generate.url_check import check_base_url  # noqa: F401  (re-exported)

LOGPROB_BACKENDS = ("vLLM's server (vllm serve MODEL)", "the OpenAI API", "the local `hf` backend (teacher.backend: hf)")


def require_logprobs(replies, params: dict, backend_label: str) -> None:
    """Stop when logprobs were asked for and an answer came back without them (e.g. `transformers serve`)."""
    if not params.get("logprobs"):
        return
    for reply in replies:
        if reply.content and reply.logprobs is None:
            raise AlambicError(
                f"the teacher backend {backend_label} answered without the log-probabilities that "
                "sampling.logprobs: true asks for (it ignores `logprobs`)",
                "use a backend that returns them: " + ", ".join(LOGPROB_BACKENDS)
                + "; or set sampling.logprobs=false to store answers only (no soft targets)",
            )


def check_not_all_failed(stats, retry_failed: bool) -> None:
    """A run that asked for answers and got none is an error (exit 2), with the commonest reason."""
    needed = stats.requested
    answered_ever = stats.answered + stats.cached
    if needed == 0 or answered_ever > 0:
        return
    if stats.failed:
        kind, count = stats.failures.most_common(1)[0]
        raise AlambicError(
            f"every request failed ({stats.failed} of {needed}; most often {kind}: {count}); "
            "nothing was learned from the teacher. The errors are in teacher.jsonl and rejected.jsonl",
            "check teacher.model against the model the server serves (an http_400/404 usually means another "
            "model), teacher.base_url and the key; then rerun with --retry-failed",
        )
    if stats.skipped_failed and not retry_failed:
        raise AlambicError(
            f"every request failed in an earlier run ({stats.skipped_failed} of {needed}) and none was sent again",
            "fix the cause, then rerun with --retry-failed",
        )


def resolve_device(choice: str, torch) -> str:
    """'auto' -> cuda when available, else cpu; an unavailable cuda device is a config error."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(choice.split(":", 1)[1]) if ":" in choice and choice.split(":", 1)[1].isdigit() else 0
        if index >= available:
            have = "no CUDA device (this torch has no CUDA support or no GPU is visible)" if not available \
                else f"only {available} CUDA device(s)"
            raise ConfigError(f"teacher.device={choice} but this machine has {have}",
                              "set teacher.device=cpu, or auto to use a GPU when there is one")
    elif choice not in ("cpu", "mps"):
        raise ConfigError(f"teacher.device={choice!r} is not a device", "use cpu, cuda, cuda:N or auto")
    return choice
