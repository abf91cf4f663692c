"""A loopback HTTP proxy that injects the failures a teacher API produces, at configured rates.

Faults: `rate_limit` (429 with Retry-After), `server_error` (500), `timeout`
(holds the request without answering), `truncated` (the upstream answer, cut
off mid-body), `invalid_json` (200 with a body that is not JSON). Everything
else is forwarded. `events` records what happened to each request, and
`answered` every prompt whose answer reached the client intact: the server-side
request log the crash tests check.

Rehearse a run against it before paying for one:

    python -m alambic.generate.testing.fault_proxy --upstream 127.0.0.1:8000 --rate 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from alambic.generate.testing.http11 import RunsInThread, encode_response, json_response, read_body, read_head, read_request

FAULTS = ("rate_limit", "server_error", "timeout", "truncated", "invalid_json")


@dataclass
class FaultEvent:
    time: float  # when the request arrived (monotonic clock)
    fault: str  # one of FAULTS, or "forwarded"
    prompt: str | None
    upstream_status: int | None = None


@dataclass
class FaultProxy(RunsInThread):
    thread_name = "fault-proxy"

    upstream_host: str
    upstream_port: int
    rates: dict[str, float] = field(default_factory=dict)
    retry_after: str = "0.2"
    hang_s: float = 30.0
    seed: int = 0
    port: int = 0
    events: list[FaultEvent] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        if sum(self.rates.values()) > 1.0:
            raise ValueError("fault rates add up to more than 1")
        self.rng = random.Random(self.seed)
        self._server = None
        self._loop = None
        self._thread = None

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for event in self.events:
            counts[event.fault] = counts.get(event.fault, 0) + 1
        return counts

    def _draw(self) -> str | None:
        roll, edge = self.rng.random(), 0.0
        for fault in FAULTS:
            edge += self.rates.get(fault, 0.0)
            if roll < edge:
                return fault
        return None

    async def _serve_connection(self, reader, writer) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                keep_open = await self._handle(request, writer)
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, request, writer) -> bool:
        """Answer one request; False when the connection must be dropped."""
        prompt = _last_user_message(request.body)
        arrived = time.monotonic()  # events are timed by arrival, so retry spacing can be checked
        fault = self._draw() if request.method == "POST" else None
        if fault is not None and fault != "truncated":
            self.events.append(FaultEvent(arrived, fault, prompt))
        if fault == "rate_limit":
            writer.write(json_response(429, {"error": {"message": "rate limited (injected)"}},
                                       {"retry-after": self.retry_after}))
        elif fault == "server_error":
            writer.write(json_response(500, {"error": {"message": "internal error (injected)"}}))
        elif fault == "invalid_json":
            writer.write(encode_response(200, b'{"id": "injected", "choices": [{"message": '))
        elif fault == "timeout":
            await asyncio.sleep(self.hang_s)  # the client gives up first and closes the connection
            return False
        else:
            status, head, body = await self._forward(request)
            if fault == "truncated":
                self.events.append(FaultEvent(arrived, "truncated", prompt, status))
                writer.write(encode_response(status, body[: len(body) // 2], head, content_length=len(body)))
                await writer.drain()
                return False
            self.events.append(FaultEvent(arrived, "forwarded", prompt, status))
            writer.write(encode_response(status, body, head))
            await writer.drain()
            if status == 200 and prompt is not None:
                self.answered.append(prompt)
            return True
        await writer.drain()
        return True

    async def _forward(self, request) -> tuple[int, dict, bytes]:
        reader, writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        try:
            headers = {k: v for k, v in request.headers.items() if k not in ("connection", "content-length", "host")}
            lines = [f"{request.method} {request.path} HTTP/1.1", f"host: {self.upstream_host}:{self.upstream_port}",
                     "connection: close", f"content-length: {len(request.body)}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            await writer.drain()
            start, response_headers = await read_head(reader)
            status = int(start.split(" ")[1])
            if "content-length" in response_headers:
                body = await read_body(reader, response_headers)
            else:
                body = await reader.read()
        finally:
            writer.close()
        passed = {k: v for k, v in response_headers.items()
                  if k in ("content-type", "retry-after", "retry-after-ms", "x-request-id")}
        return status, passed, body


def _last_user_message(body: bytes) -> str | None:
    try:
        messages = json.loads(body).get("messages") or []
    except (ValueError, AttributeError):
        return None
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the real server (loopback)")
    parser.add_argument("--rate", type=float, default=0.2, help="total fault rate, split evenly over the faults")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)

    async def serve() -> None:
        proxy = FaultProxy(host, int(port), {fault: args.rate / len(FAULTS) for fault in FAULTS},
                           seed=args.seed, port=args.port)
        await proxy.start()
        print(f"listening {proxy.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
