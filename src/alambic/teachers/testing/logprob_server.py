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
    python -m alambic.teachers.testing.logprob_server runs/tiny/teacher_run/final --table --delay 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Callable

import torch

from alambic.generate.testing.http11 import RunsInThread, encode_response, json_response

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


class TableScorer:
    """A bigram table of log-probs: the next-token distribution depends on the previous token only.

    It costs no model time, and its JSON answers are assembled from per-token pieces prepared once,
    so a fixed delay alone sets the answer time (the benchmark's server-bound reference).
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(vocab_size, vocab_size, generator=generator) * 3, dim=-1)
        order = self.table.argsort(dim=-1, descending=True)
        self.ranks = torch.empty_like(order)
        self.ranks.scatter_(1, order, torch.arange(1, vocab_size + 1).expand(vocab_size, -1).contiguous())
        self._pieces: dict = {}

    def __call__(self, ids: list[int]) -> torch.Tensor:
        return self.table[torch.tensor(ids)]

    def pieces(self, k: int, text) -> tuple[list[str], list[set[int]], list[str]]:
        """Per previous token: the opened JSON object of its top-k, their ids, and the 'token_id:' top-k object."""
        if k not in self._pieces:
            values, ids = self.table.topk(k, dim=-1)
            opened, members, generated = [], [], []
            for top_values, top_ids in zip(values.tolist(), ids.tolist()):
                opened.append("{" + ", ".join(_entry_json(t, v, r, text(t)) for r, (v, t) in
                                              enumerate(zip(top_values, top_ids), start=1)))
                members.append(set(top_ids))
                generated.append(json.dumps({f"token_id:{t}": v for v, t in zip(top_values, top_ids)}))
            self._pieces[k] = (opened, members, generated)
        return self._pieces[k]

    def choice_json(self, index: int, row: list[int], k: int, text) -> str:
        opened, members, generated = self.pieces(k, text)
        positions = ["null"]
        for previous, token in zip(row[:-1], row[1:]):
            extra = "" if token in members[previous] else ", " + _entry_json(
                token, float(self.table[previous, token]), int(self.ranks[previous, token]), text(token))
            positions.append(opened[previous] + extra + "}")
        logprobs = f'{{"top_logprobs": [{generated[row[-1]]}]}}'
        return (f'{{"index": {index}, "text": "", "finish_reason": "length", "prompt_logprobs": '
                f'[{", ".join(positions)}], "logprobs": {logprobs}}}')


def _entry_json(token: int, value: float, rank: int, text) -> str:
    return f'"{token}": {{"logprob": {value!r}, "rank": {rank}, "decoded_token": {json.dumps(text)}}}'


def table_scorer(vocab_size: int, seed: int = 0) -> TableScorer:
    return TableScorer(vocab_size, seed)


class LogprobServer(RunsInThread):
    thread_name = "logprob-server"

    def __init__(self, scorer: Scorer, model_name: str = "teacher", tokenizer=None, max_logprobs: int = 20,
                 max_model_len: int = 1024, delay_s: float = 0.0, prompt_logprobs_supported: bool = True,
                 port: int = 0):
        self.scorer, self.model_name, self.tokenizer = scorer, model_name, tokenizer
        self.max_logprobs, self.max_model_len, self.delay_s = max_logprobs, max_model_len, delay_s
        self.prompt_logprobs_supported = prompt_logprobs_supported
        self.fail_from: int | None = None
        self._texts: list[str] | None = None
        self.completion_requests = 0
        self.port = port
        self.log: list[tuple[float, int, int]] = []  # (time answered, rows, tokens) per completion request
        self._lock = threading.Lock()  # one forward pass at a time
        self._server = self._loop = self._thread = None

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
        return await asyncio.get_running_loop().run_in_executor(None, self._complete_bytes, body)

    def _complete_bytes(self, body: dict) -> bytes:
        fast = isinstance(self.scorer, TableScorer) and self.prompt_logprobs_supported and body.get("prompt_logprobs") \
            and body.get("logprobs") == body.get("prompt_logprobs") and body.get("return_tokens_as_token_ids")
        if not fast:
            return json_response(200, self._complete(body))
        prompt = body["prompt"]
        rows = prompt if isinstance(prompt[0], list) else [prompt]
        choices = [self.scorer.choice_json(i, row, body["prompt_logprobs"], self._text) for i, row in enumerate(rows)]
        self.log.append((time.monotonic(), len(rows), sum(len(r) for r in rows)))
        text = (f'{{"id": "cmpl-{time.monotonic_ns()}", "object": "text_completion", "model": '
                f'{json.dumps(self.model_name)}, "choices": [{", ".join(choices)}]}}')
        return encode_response(200, text.encode())

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
            choice["prompt_logprobs"] = [None] + self._positions(logprobs, row, k)
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

    def _positions(self, logprobs: torch.Tensor, row: list[int], k: int) -> list[dict]:
        """vLLM's prompt_logprobs entries for positions 1..n-1 (scored from positions 0..n-2)."""
        scored = logprobs[:-1]
        values, ids = scored.topk(k, dim=-1)
        actual = torch.tensor(row[1:])
        actual_values = scored.gather(-1, actual[:, None])[:, 0]
        actual_ranks = (scored > actual_values[:, None]).sum(-1) + 1
        entries = []
        for top_values, top_ids, token, value, rank in zip(values.tolist(), ids.tolist(), row[1:],
                                                           actual_values.tolist(), actual_ranks.tolist()):
            entry = {str(t): {"logprob": v, "rank": r, "decoded_token": self._text(t)}
                     for r, (v, t) in enumerate(zip(top_values, top_ids), start=1)}
            if str(token) not in entry:  # vLLM adds the prompt's own token with its vocabulary rank
                entry[str(token)] = {"logprob": value, "rank": rank, "decoded_token": self._text(token)}
            entries.append(entry)
        return entries

    def _text(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        if self._texts is None:
            self._texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._texts[token] if token < len(self._texts) else ""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    return json_response(status, {"object": "error", "message": message, "type": kind, "code": status})


def serve_model_folder(folder: str, port: int, name: str | None, max_logprobs: int, delay_s: float,
                       table: bool = False) -> LogprobServer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if table:
        scorer = table_scorer(len(tokenizer))
    else:
        scorer = model_scorer(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), len(tokenizer))
    return LogprobServer(scorer, name or folder, tokenizer, max_logprobs, delay_s=delay_s, port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a Hugging Face causal LM with its tokenizer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default=None, help="served model name (default: the folder)")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--table", action="store_true", help="answer from a random bigram table, not the model")
    args = parser.parse_args()
    server = serve_model_folder(args.model, args.port, args.name, args.max_logprobs, args.delay, args.table)

    async def serve() -> None:
        await server.start()
        print(f"listening {server.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
