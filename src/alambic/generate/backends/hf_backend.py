"""A local transformers model as the teacher: batched, left-padded chat generation.

Generation runs in a worker thread so the event loop keeps writing the cache,
one batch at a time (one model, one device). Requests of a batch share one
random stream: the batch's first request seeds it, so a rerun of the same
batch gives the same samples.
"""

from __future__ import annotations

import asyncio

from pathlib import Path

from alambic.errors import ModelError
from alambic.generate.backends.base import TeacherReply, TeacherRequest
from alambic.generate.checks import resolve_device
from alambic.generate.config import TeacherBackendConfig
from alambic.models.loading import _hub_error, _is_offline, check_weight_files, resolve_model_source


class HFTeacher:
    name = "hf"

    def __init__(self, config: TeacherBackendConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.config = config
        self.batch_size = config.batch_size
        self.max_in_flight = 1  # concurrent generate calls on one model only compete for the same device
        device = resolve_device(config.device, torch)  # before loading: a wrong device fails at once
        source = resolve_model_source(config.model, "teacher")
        if Path(source).is_dir():
            check_weight_files(Path(source), "teacher")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code,
                                                           local_files_only=_is_offline())
            dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
            self.model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=config.trust_remote_code, use_safetensors=True,
                local_files_only=_is_offline(),
            )
        except (OSError, ValueError) as err:
            if source == config.model and not Path(source).exists():
                raise _hub_error(config.model, "teacher", err) from None
            raise ModelError(f"cannot load the teacher {config.model!r}: {str(err).splitlines()[0]}",
                             "give a local folder with config.json, safetensors weights and a tokenizer") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError(f"the tokenizer of {config.model!r} has no chat template",
                             "use a chat model, or add a chat_template to its tokenizer_config.json")
        self.model.to(device).eval()
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    async def complete(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]:
        return await asyncio.to_thread(self._generate, batch, params)

    def _generate(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]:
        torch = self.torch
        texts = [self.tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
                 for r in batch]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = params["temperature"] > 0
        generator_seed = batch[0].seed if batch[0].seed is not None else int(batch[0].key[:8], 16)
        torch.manual_seed(generator_seed)
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=params["max_tokens"], do_sample=sampling,
                temperature=params["temperature"] if sampling else None, top_p=params["top_p"] if sampling else None,
                stop_strings=params["stop"] or None, tokenizer=self.tokenizer if params["stop"] else None,
                pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True,
                output_logits=bool(params["logprobs"]),
            )
        prompt_length = inputs["input_ids"].shape[1]
        replies = []
        for row in range(len(batch)):
            generated = output.sequences[row, prompt_length:].tolist()
            length, finish = self._trim(generated, params)
            logprobs = self._logprobs(output.logits, row, generated[:length], params) if params["logprobs"] else None
            replies.append(TeacherReply(
                content=self.tokenizer.decode(generated[:length], skip_special_tokens=True).strip(),
                finish_reason=finish,
                prompt_tokens=int(inputs["attention_mask"][row].sum()),
                completion_tokens=length,
                logprobs=logprobs,
                model=self.config.model,
            ))
        return replies

    def _trim(self, generated: list[int], params: dict) -> tuple[int, str]:
        """Tokens up to and including the first end-of-sequence; why generation stopped."""
        stop_ids = self.model.generation_config.eos_token_id
        stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids is not None else [])
        stop_ids.add(self.tokenizer.eos_token_id)
        for position, token in enumerate(generated):
            if token in stop_ids:
                return position, "stop"
        if len(generated) < params["max_tokens"]:
            return len(generated), "stop"  # a stop string ended it
        return len(generated), "length"

    def _logprobs(self, step_logits, row: int, tokens: list[int], params: dict) -> list[dict]:
        """Log-probabilities of the raw model distribution (temperature 1), chosen token and top-k."""
        torch = self.torch
        top_k = params["top_logprobs"]
        entries = []
        for step, token in enumerate(tokens):
            logprobs = torch.log_softmax(step_logits[step][row].float(), dim=-1)
            top = torch.topk(logprobs, top_k) if top_k else None
            entries.append({
                "token": self.tokenizer.convert_ids_to_tokens(token),
                "token_id": token,
                "logprob": float(logprobs[token]),
                "top": [] if top is None else [
                    {"token": self.tokenizer.convert_ids_to_tokens(int(i)), "token_id": int(i), "logprob": float(v)}
                    for v, i in zip(top.values, top.indices)
                ],
            })
        return entries

    async def aclose(self) -> None:
        return None
