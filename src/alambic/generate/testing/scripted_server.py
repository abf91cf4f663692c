"""A loopback OpenAI-compatible chat server that answers by rule after a fixed delay.

It is the "server-bound" reference of the throughput benchmark (its answer time
is known exactly) and a deterministic teacher for recipe tests. It is not a
model: `responder(messages, body)` decides the answer text.

    python -m alambic.generate.testing.scripted_server --delay 0.1 --port 8011
    python -m alambic.generate.testing.scripted_server --responder sentiment --delay 0 --port 8011
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable

from alambic.generate.testing.http11 import RunsInThread, json_response

Responder = Callable[[list, dict], str]


class ScriptedError(Exception):
    """Raised by a responder to answer with an HTTP error instead of a completion."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def echo_responder(messages: list, body: dict) -> str:
    return f"echo: {messages[-1]['content']}"


POSITIVE_WORDS = ("joy", "loved", "stunning", "funny", "warm", "moving", "clever", "best", "heart", "beautiful",
                  "delightful", "wonderful", "pleasure", "smart", "satisfying", "gorgeous", "great", "good")


def sentiment_responder(messages: list, body: dict) -> str:
    """A keyword rule standing in for a labelling model (offline rehearsals of the label recipes)."""
    text = messages[-1]["content"].lower()
    return "positive" if any(word in text for word in POSITIVE_WORDS) else "negative"


def rationale_responder(messages: list, body: dict) -> str:
    """The step-by-step answer format ("Rationale: ... Answer: ...") from the same keyword rule."""
    label = sentiment_responder(messages, body)
    cue = "praise" if label == "positive" else "complaints"
    return f"Rationale: The review is mostly {cue}. Answer: {label}"


RESPONDERS = {"echo": echo_responder, "sentiment": sentiment_responder, "rationale": rationale_responder}


class ScriptedChatServer(RunsInThread):
    """Serve /v1/chat/completions on 127.0.0.1; `log` holds (time, last message, seed) per answer sent.

    `responder(messages, body)` returns the answer text, or raises ScriptedError for an HTTP error.
    With `api_key`, requests without `Authorization: Bearer <api_key>` get a 401.
    """

    thread_name = "scripted-chat-server"

    def __init__(self, responder: Responder = echo_responder, delay_s: float = 0.0, port: int = 0,
                 api_key: str | None = None, serve_logprobs: bool = True):
        self.responder = responder
        self.serve_logprobs = serve_logprobs  # False: ignore `logprobs` like `transformers serve` does
        self.delay_s = delay_s
        self.port = port
        self.api_key = api_key
        self.log: list[tuple[float, str, int | None]] = []
        self.active = 0
        self.peak_active = 0  # most chat requests being answered at once
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _answer(self, request) -> bytes:
        if request.method == "GET" and request.path.endswith("/models"):
            return json_response(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
        if request.method != "POST" or not request.path.endswith("/chat/completions"):
            return json_response(404, {"error": {"message": f"no route {request.path}"}})
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return json_response(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        try:
            body = request.json()
            messages = body["messages"]
        except (ValueError, TypeError, KeyError):
            return json_response(400, {"error": {"message": "the body must be JSON with `messages`"}})
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            text = self.responder(messages, body)
        except ScriptedError as err:
            return json_response(err.status, {"error": {"message": str(err), "type": "scripted"}}, err.headers)
        finally:
            self.active -= 1
        self.log.append((time.monotonic(), messages[-1]["content"], body.get("seed")))
        return json_response(200, _completion(body, text, self.serve_logprobs))


def _completion(body: dict, text: str, serve_logprobs: bool = True) -> dict:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    completion_tokens = len(text.split())
    logprobs = None
    if body.get("logprobs") and serve_logprobs:
        top = int(body.get("top_logprobs") or 0)
        logprobs = {"content": [
            {"token": word, "logprob": -0.1 * (i + 1), "bytes": None,
             "top_logprobs": [{"token": word if j == 0 else f"{word}~{j}", "logprob": -0.1 * (i + 1) - j, "bytes": None}
                              for j in range(top)]}
            for i, word in enumerate(text.split())
        ]}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
              "logprobs": logprobs}
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "scripted"), "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.1, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--responder", choices=sorted(RESPONDERS), default="echo",
                        help="echo the prompt, or label it by keywords (sentiment, rationale)")
    args = parser.parse_args()

    async def serve() -> None:
        server = ScriptedChatServer(RESPONDERS[args.responder], delay_s=args.delay, port=args.port)
        await server.start()
        print(f"listening {server.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
