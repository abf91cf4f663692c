"""Just enough HTTP/1.1 over asyncio streams for the loopback test servers (no chunked bodies)."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
MAX_BODY = 16 * 1024 * 1024


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    """The start line and lower-cased headers; None when the peer closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        raise ValueError("body too large")
    return await reader.readexactly(length) if length else b""


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    head = await read_head(reader)
    if head is None:
        return None
    start, headers = head
    method, path, _version = start.split(" ", 2)
    try:
        body = await read_body(reader, headers)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return HttpRequest(method, path, headers, body)


def encode_response(status: int, body: bytes, headers: dict[str, str] | None = None,
                    content_length: int | None = None) -> bytes:
    """A full response; `content_length` may claim more than `body` holds (to fake a truncated answer)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    claimed = len(body) if content_length is None else content_length
    merged = {"content-type": "application/json", "content-length": str(claimed)}
    merged.update(headers or {})
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_response(status: int, payload, headers: dict[str, str] | None = None) -> bytes:
    return encode_response(status, json.dumps(payload).encode(), headers)


class RunsInThread:
    """A loopback HTTP/1.1 server: `start()` listens on 127.0.0.1:`self.port` (0 = any free port) and answers each
    keep-alive request with `await self._answer(request)` (bytes); `start_in_thread()` / `stop()` run it on its own
    event loop in a daemon thread beside a test."""

    thread_name = "loopback-server"
    port = 0
    _server = None
    _loop = None
    _thread = None

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

    def start_in_thread(self):
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name=self.thread_name)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.thread_name} did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():  # open keep-alive connections too
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
