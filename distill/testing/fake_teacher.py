"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests: deterministic answers, counted calls.

    with FakeTeacher(answer_fn) as teacher:
        run(..., teacher.base_url)
        teacher.calls       # every request body received, in order

``answer_fn(messages) -> str`` decides the assistant's text. Requests are served over real HTTP by the standard
library's threading server, so the code under test goes through the real ``openai`` client.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeTeacher:
    def __init__(self, answer_fn: Callable[[list[dict]], str], *, api_key: str | None = None,
                 status: int = 200, error_body: str | None = None):
        self.answer_fn = answer_fn
        self.api_key = api_key
        self.status = status
        self.error_body = error_body
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict | str) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.calls.append(body)
                if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                    return
                if fake.status != 200:
                    self._send(fake.status, fake.error_body or {"error": {"message": "injected failure"}})
                    return
                text = fake.answer_fn(body["messages"])
                prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
                logprobs = None
                if body.get("logprobs"):  # one answer token, certain of itself
                    logprobs = {"content": [{"token": text, "logprob": -0.01, "bytes": None,
                                             "top_logprobs": [{"token": text, "logprob": -0.01, "bytes": None}]}]}
                self._send(200, {
                    "id": f"chatcmpl-{len(fake.calls)}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                              "total_tokens": prompt_tokens + len(text) // 4},
                })

        return Handler

    def __enter__(self) -> "FakeTeacher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
