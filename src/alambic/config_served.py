"""Settings of a served teacher (`teacher.server`): how requests are sent, retried and prefetched.

    teacher:
      server: http://127.0.0.1:8000/v1     # an OpenAI-compatible server with vLLM's prompt_logprobs
      server_model: Qwen/Qwen2.5-7B-Instruct  # the name the server must list (identity check)
      top_k: 20                             # <= the server's --max-logprobs
      served: {prefetch: 4, max_in_flight: 4, timeout_s: 60}

See `alambic.teachers.served` and docs/served-teacher.md.
"""

from __future__ import annotations

from pydantic import Field

from alambic.config_base import Strict
from alambic.generate.config import RetryConfig  # the retry policy of `alambic generate`, read by generate/retry.py


class ServedTeacherOptions(Strict):
    prefetch: int = Field(
        4, ge=0, description="micro-batches requested ahead of the current step (0: only the current step's)"
    )
    max_in_flight: int = Field(4, ge=1, description="HTTP requests at once from this process")
    rows_per_request: int | None = Field(None, ge=1, description="rows per request (default: one micro-batch)")
    timeout_s: float = Field(120.0, gt=0.0, description="per attempt")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    retry: RetryConfig = RetryConfig()
    check_tokens: int = Field(
        256, ge=0, description="token ids whose text is compared with the server's at start (0: skip)"
    )
    stream_cache: str | None = Field(
        None, description="write what the server returns into this logit-cache folder (single process only)"
    )
    stream_cache_value_bits: int = Field(8, ge=1, le=16, description="bits per stored log-probability")
    stream_cache_shard_rows: int = Field(256, ge=1)
    complete_stream_cache: bool = Field(
        True, description="at the end of training, request the rows not yet streamed so the cache is complete"
    )
