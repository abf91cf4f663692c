"""vLLM's in-process engine as the teacher (optional extra: `pip install 'alambic[vllm]'`).

Imported only when `teacher.backend: vllm` is chosen. A batch of requests goes
to `LLM.chat` in one call with one SamplingParams per request, so each sample
keeps its own seed.
"""

from __future__ import annotations

import asyncio

from alambic.errors import ConfigError
from alambic.generate.backends.base import TeacherReply, TeacherRequest
from alambic.generate.config import TeacherBackendConfig


class VLLMTeacher:
    name = "vllm"

    def __init__(self, config: TeacherBackendConfig):
        try:
            import vllm
        except ImportError:
            raise ConfigError("teacher.backend 'vllm' needs the vllm package",
                              "pip install 'alambic[vllm]' on a machine with a supported GPU") from None
        self.vllm = vllm
        self.config = config
        self.batch_size = config.batch_size
        self.max_in_flight = 1  # the engine batches internally; one call at a time keeps it simple and safe
        self.engine = vllm.LLM(model=config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)

    async def complete(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]:
        return await asyncio.to_thread(self._generate, batch, params)

    def _generate(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]:
        sampling = [
            self.vllm.SamplingParams(
                n=1, temperature=params["temperature"], top_p=params["top_p"], max_tokens=params["max_tokens"],
                stop=params["stop"] or None, seed=request.seed,
                logprobs=(params["top_logprobs"] or 1) if params["logprobs"] else None,
            )
            for request in batch
        ]
        outputs = self.engine.chat([list(r.messages) for r in batch], sampling_params=sampling, use_tqdm=False)
        replies = []
        for output in outputs:
            completion = output.outputs[0]
            replies.append(TeacherReply(
                content=completion.text,
                finish_reason=completion.finish_reason,
                prompt_tokens=len(output.prompt_token_ids or []),
                completion_tokens=len(completion.token_ids),
                logprobs=_logprobs(completion) if params["logprobs"] else None,
                model=self.config.model,
            ))
        return replies

    async def aclose(self) -> None:
        return None


def _logprobs(completion) -> list[dict] | None:
    if not completion.logprobs:
        return None
    entries = []
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
        chosen = alternatives[token_id]
        ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)
        entries.append({
            "token": chosen.decoded_token, "token_id": token_id, "logprob": chosen.logprob,
            "top": [{"token": alt.decoded_token, "token_id": tid, "logprob": alt.logprob} for tid, alt in ranked],
        })
    return entries
