"""A fake student runtime on 127.0.0.1 for tests and benchmarks: chosen answers and confidences, counted calls.

    with FakeStudent(lambda text: ({"category": "billing", "priority": "low"}, 0.97), latency_s=0.02) as student:
        serve.student_endpoint=student.base_url
        student.calls          # the task inputs it was asked, in order of arrival
        student.kill()         # stop answering: new connections are refused and open ones are cut
    FakeStudent(..., max_input_chars=200)  # longer inputs: the runtime's 400 context_length_exceeded

``answer_fn(text) -> (answer, confidence)``: a dict is a schema-valid answer (or not: the gateway checks), a str is
raw text the student "wrote". It speaks the distill runtime's scored protocol (``POST /v1/distill/score``) and
OpenAI chat completions with logprobs (one token carrying log(confidence)), so ``serve.confidence=scored`` and
``sequence`` can both be tested.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from distill.serve.runtime import SCORE_PATH


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):  # cut connections break pipes on purpose
        pass


class FakeStudent:
    def __init__(self, answer_fn: Callable[[str], tuple[Any, float | None]], *, latency_s: float = 0.0,
                 status: int = 200, max_input_chars: int | None = None):
        self.answer_fn = answer_fn
        self.latency_s = latency_s
        self.status = status
        self.max_input_chars = max_input_chars  # longer inputs get the runtime's 400 context_length_exceeded
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.alive = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _reply(self, text: str, body: dict, path: str) -> dict:
        answer, confidence = self.answer_fn(text)
        raw = answer if isinstance(answer, str) else json.dumps(answer)
        if path.endswith(SCORE_PATH):
            valid = isinstance(answer, dict)
            return {"answer": answer if valid else None, "text": raw, "confidence": confidence if valid else None,
                    "invalid_reason": None if valid else "invalid_json", "field_confidence": {}, "prompt_tokens": 0}
        logprobs = None
        if confidence is not None:
            logprobs = {"content": [{"token": raw, "logprob": math.log(max(confidence, 1e-300)), "bytes": None,
                                     "top_logprobs": []}]}
        return {"id": "chatcmpl-fake-student", "object": "chat.completion", "created": 0,
                "model": body.get("model", "student"),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": raw}}]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with fake._lock:
                    fake._conns.add(self.connection)

            def finish(self):
                try:
                    super().finish()
                finally:
                    with fake._lock:
                        fake._conns.discard(self.connection)

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake-student", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                text = next((m.get("content") for m in reversed(body.get("messages") or [])
                             if m.get("role") == "user"), "")
                with fake._lock:  # counted on arrival: a test can see requests in flight
                    fake.calls.append(text)
                if fake.latency_s:
                    time.sleep(fake.latency_s)
                if fake.status != 200:
                    return self._send(fake.status, {"error": {"message": "injected failure"}})
                if fake.max_input_chars is not None and len(text) > fake.max_input_chars:
                    return self._send(400, {"error": {"message": f"{len(text)} tokens do not fit the runtime's "
                                                      f"context of {fake.max_input_chars}", "type":
                                                      "invalid_request_error", "code": "context_length_exceeded"}})
                path = self.path.split("?")[0].rstrip("/")
                if not (path.endswith(SCORE_PATH) or path.endswith("/chat/completions")):
                    return self._send(404, {"error": {"message": f"no route {path}"}})
                self._send(200, fake._reply(text, body, path))

        return Handler

    def kill(self) -> None:
        """Stop like a crashed runtime: refuse new connections and cut the open ones."""
        if not self.alive:
            return
        self.alive = False
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeStudent":
        self.thread.start()
        self.alive = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.thread.join(timeout=5)
