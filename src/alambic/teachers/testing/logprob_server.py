"""A loopback OpenAI-compatible completions server that answers vLLM-style `prompt_logprobs`.

The scores are real: a Hugging Face causal LM (or any `scorer(ids) -> [n, V]
log-probs`) computes them; only the HTTP layer is ours. It follows vLLM's
answer shape: `prompt_logprobs` is a list with `null` for the first position
and, for every other one, `{token_id: {logprob, rank, decoded_token}}` holding
the top-k plus the actual prompt token; `logprobs.top_logprobs` keyed
"token_id:N" for the one generated token; 400 above `max_logprobs`; 404 for
another model; GET /v1/models with `max_model_len`; POST /tokenize.

Switches for the refusal and failure tests: `prompt_logprobs_supported=False`
ignores the field (a plain OpenAI server), `delay_s` answers after a fixed
delay, `fail_from = N` answers 503 to every completion request from the N-th on
(a server that goes down and stays down).

    python -m alambic.teachers.testing.logprob_server runs/tiny/teacher_run/final --port 8012
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable

import torch

from alambic.generate.testing.http11 import json_response, read_request

Scorer = Callable[[list[int]], torch.Tensor]  # ids [n] -> log-probs [n, V] (position t: next-token distribution)


def model_scorer(model, vocab_size: int | None = None) -> Scorer:
    """Log-probs of a frozen HF causal LM, one unpadded row at a time, in float32."""

    @torch.no_grad()
    def score(ids: list[int]) -> torch.Tensor:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        return torch.log_softmax(logits, dim=-1)

    return score


class LogprobServer:
    def __init__(self, scorer: Scorer, model_name: str = "teacher", tokenizer=None, max_logprobs: int = 20,
                 max_model_len: int = 1024, delay_s: float = 0.0, prompt_logprobs_supported: bool = True,
                 port: int = 0):
        self.scorer, self.model_name, self.tokenizer = scorer, model_name, tokenizer
        self.max_logprobs, self.max_model_len, self.delay_s = max_logprobs, max_model_len, delay_s
        self.prompt_logprobs_supported = prompt_logprobs_supported
        self.fail_from: int | None = None
        self.completion_requests = 0
        self.port = port
        self.log: list[tuple[float, int, int]] = []  # (time answered, rows, tokens) per completion request
        self._lock = threading.Lock()  # one forward pass at a time
        self._server = self._loop = self._thread = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve_connection(self, reader, writer) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                writer.write(await self._answer(request))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, request) -> bytes:
        if request.method == "GET" and request.path.endswith("/models"):
            entry = {"id": self.model_name, "object": "model", "root": self.model_name,
                     "max_model_len": self.max_model_len}
            return json_response(200, {"object": "list", "data": [entry]})
        try:
            body = request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        if request.method == "POST" and request.path.endswith("/tokenize") and self.tokenizer is not None:
            tokens = self.tokenizer.encode(body.get("prompt", ""), add_special_tokens=body.get("add_special_tokens", True))
            return json_response(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len})
        if request.method != "POST" or not request.path.endswith("/completions"):
            return _error(404, f"no route {request.path}")
        if body.get("model") != self.model_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        self.completion_requests += 1
        if self.fail_from is not None and self.completion_requests >= self.fail_from:
            return _error(503, "the server is down (injected)", "ServiceUnavailable")
        problem = self._check(body)
        if problem:
            return _error(400, problem, "BadRequestError")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        answer = await asyncio.get_running_loop().run_in_executor(None, self._complete, body)
        return json_response(200, answer)

    def _check(self, body: dict) -> str | None:
        for field in ("prompt_logprobs", "logprobs"):
            wanted = body.get(field)
            if wanted is not None and wanted > self.max_logprobs:
                return f"Requested {field.replace('_', ' ')} of {wanted}, which is greater than max allowed: {self.max_logprobs}"
        prompt = body.get("prompt")
        rows = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        if not all(isinstance(row, list) and row and all(isinstance(t, int) for t in row) for row in rows):
            return "this test server takes token-id prompts only"
        if any(len(row) + int(body.get("max_tokens") or 0) > self.max_model_len for row in rows):
            return f"This model's maximum context length is {self.max_model_len} tokens."
        return None

    def _complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        rows = prompt if isinstance(prompt[0], list) else [prompt]
        with self._lock:
            choices = [self._choice(index, row, body) for index, row in enumerate(rows)]
        self.log.append((time.monotonic(), len(rows), sum(len(r) for r in rows)))
        tokens = sum(len(r) for r in rows)
        return {"id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": tokens, "completion_tokens": len(rows), "total_tokens": tokens + len(rows)}}

    def _choice(self, index: int, row: list[int], body: dict) -> dict:
        logprobs = self.scorer(row)  # [n, V]
        k = body.get("prompt_logprobs")
        choice = {"index": index, "text": "", "finish_reason": "length", "stop_reason": None}
        if k is not None and self.prompt_logprobs_supported:
            choice["prompt_logprobs"] = [None] + [self._position(logprobs[t], row[t + 1], k) for t in range(len(row) - 1)]
        generated = int(logprobs[-1].argmax())
        top_n = body.get("logprobs")
        if top_n is not None:
            values, ids = logprobs[-1].topk(top_n)
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            name = (lambda i: f"token_id:{i}") if as_ids else self._text
            top = {name(int(i)): float(v) for v, i in zip(values, ids)}
            choice["logprobs"] = {"tokens": [name(generated)], "token_logprobs": [float(logprobs[-1, generated])],
                                  "top_logprobs": [top], "text_offset": [0]}
        return choice

    def _position(self, logprobs: torch.Tensor, actual: int, k: int) -> dict:
        values, ids = logprobs.topk(k)
        entry = {}
        for rank, (value, token) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entry[str(token)] = {"logprob": value, "rank": rank, "decoded_token": self._text(token)}
        if str(actual) not in entry:  # vLLM adds the prompt's own token with its vocabulary rank
            value = float(logprobs[actual])
            entry[str(actual)] = {"logprob": value, "rank": int((logprobs > value).sum()) + 1,
                                  "decoded_token": self._text(actual)}
        return entry

    def _text(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    # ----------------------------------------------------------- running in a thread (tests)

    def start_in_thread(self) -> "LogprobServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="logprob-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("logprob server did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    return json_response(status, {"object": "error", "message": message, "type": kind, "code": status})


def serve_model_folder(folder: str, port: int, name: str | None, max_logprobs: int, delay_s: float) -> LogprobServer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return LogprobServer(model_scorer(model, len(tokenizer)), name or folder, tokenizer, max_logprobs,
                         delay_s=delay_s, port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a Hugging Face causal LM with its tokenizer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default=None, help="served model name (default: the folder)")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    server = serve_model_folder(args.model, args.port, args.name, args.max_logprobs, args.delay)

    async def serve() -> None:
        await server.start()
        print(f"listening {server.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
