"""A cheap OpenAI-compatible chat server for throughput benchmarks: one asyncio loop, no threads per connection.

    with FastTeacher(answer_fn, latency_s=0.1) as teacher:   # serves from a background thread
        run(..., teacher.base_url)
        teacher.calls                                        # chat requests answered

    python -m distill.testing.fast_teacher 0.1               # the same in its own process: prints its base URL,
                                                             # serves until stdin closes, then prints the count

A benchmark of the client must not be held up by its server. ``FakeTeacher`` (the standard library's threading
HTTP server, a thread per connection) costs about 0.35 ms of CPU per request, as much as the client it measures;
this one reads the request line, ``Content-Length`` and the JSON body and answers each chat request after
``latency_s`` (a timer, not a sleeping thread) with ``answer_fn(messages)`` as a chat completion with usage, over
HTTP/1.1 keep-alive. It has no faults, keys or Batch API: tests of those use ``FakeTeacher``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Callable

_MODELS = json.dumps({"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]}).encode()


class _Connection(asyncio.Protocol):
    def __init__(self, teacher: "FastTeacher"):
        self.teacher = teacher
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is still on its way
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            method, path = head[0].split(" ", 2)[:2]
            self.teacher.handle(self, method, path.split("?")[0].rstrip("/"), body)

    def send(self, status: int, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


class FastTeacher:
    def __init__(self, answer_fn: Callable[[list[dict]], str], *, latency_s: float = 0.0):
        self.answer_fn = answer_fn
        self.latency_s = latency_s
        self.calls = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def handle(self, conn: _Connection, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path.endswith("/models"):
            return conn.send(200, _MODELS)
        if method != "POST" or not path.endswith("/chat/completions"):
            return conn.send(404, json.dumps({"error": {"message": f"no route {method} {path}"}}).encode())
        request = json.loads(body)
        self.calls += 1
        text = self.answer_fn(request["messages"])
        prompt_tokens = sum(len(m["content"]) for m in request["messages"]) // 4
        completion_tokens = len(text) // 4 + 1
        reply = json.dumps({
            "id": f"chatcmpl-{self.calls}", "object": "chat.completion", "created": 0,
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text, "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}).encode()
        if self.latency_s:
            asyncio.get_running_loop().call_later(self.latency_s, conn.send, 200, reply)
        else:
            conn.send(200, reply)

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), "127.0.0.1", self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            await stop.wait()

    def __enter__(self) -> "FastTeacher":
        started = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                task = asyncio.ensure_future(self.serve(self._stop))
                while not self.port and not task.done():
                    await asyncio.sleep(0.001)
                started.set()
                await task

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="fast-teacher", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fast fake teacher did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5)


def main() -> None:
    """``python -m distill.testing.fast_teacher LATENCY_S``: serve until stdin closes, then print the call count."""
    latency = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    teacher = FastTeacher(lambda _m: json.dumps({"category": "billing", "priority": "low"}), latency_s=latency)

    async def run() -> None:
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        serving = asyncio.ensure_future(teacher.serve(stop))
        while not teacher.port:
            await asyncio.sleep(0.001)
        print(teacher.base_url, flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # the benchmark closes our stdin when it is done
        stop.set()
        await serving

    asyncio.run(run())
    print(json.dumps({"calls": teacher.calls}), flush=True)


if __name__ == "__main__":
    main()
