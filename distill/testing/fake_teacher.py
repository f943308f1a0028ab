"""An OpenAI-compatible server on 127.0.0.1 for tests: deterministic answers, injected faults, counted calls.

    with FakeTeacher(answer_fn, faults={"429": 0.3, "500": 0.05}, retry_after_s=1) as teacher:
        run(..., teacher.base_url)
        teacher.calls            # every request body received, in order
        teacher.paid             # Counter: successful (HTTP 200, well-formed) answers per request key
        teacher.billed           # Counter: answers the server produced (and a real provider bills) per request key
        teacher.billed_tokens    # [prompt, completion] tokens of every billed answer
        teacher.early_retries    # requests that came back before the Retry-After they were given
        teacher.open_connections # connections not yet closed
        teacher.other_calls      # (method, path, body) of every embeddings request and model lookup

``answer_fn(messages) -> str`` decides the assistant's text. Requests go over real HTTP (the standard library's
threading server), so the code under test goes through the real ``openai`` client and its connection pool.
``top_logprobs_fn(messages) -> [(token, logprob), ...]`` (optional) gives the first answer token's top log-probs
when a request asks for them (teacher.method=score); without it the answer's text is the one, near-certain token.

Faults, each drawn per request at its rate from a seeded generator:
  transport: ``429`` (with Retry-After), ``500``, ``hang`` (no answer until past the client's timeout, then the
  connection is dropped), ``reset`` (TCP reset), ``malformed_body`` (a 200 cut short: billed, not JSON),
  ``billed_hang`` (the answer is made and billed, then the server hangs past the client's timeout);
  answers (HTTP 200, paid): ``invalid_json``, ``schema`` (valid JSON that breaks the schema), ``refusal``,
  ``length`` (finish_reason "length").
``POST /v1/embeddings`` answers a small vector per input and ``GET /v1/models/fake-teacher`` its model object (the
gateway's pass-through). A fake Batch API (files + batches) serves ``generate.mode=batch``. ``batch_end`` gives a batch id the way it ends
instead of ``completed``: ``failed`` (rejected as a whole: no line runs, ``errors`` says why), ``cancelled`` (reported
``cancelling`` first; the first half of its lines ran) or ``expired`` (the first half ran).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

TRANSPORT_FAULTS = ("429", "408", "409", "500", "hang", "reset", "malformed_body", "billed_hang")
ANSWER_FAULTS = ("invalid_json", "schema", "refusal", "length")


def body_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 64 clients connect at once; the default backlog of 5 would refuse some

    def handle_error(self, request, client_address):  # injected resets and hangs break pipes on purpose
        pass


class FakeTeacher:
    def __init__(self, answer_fn: Callable[[list[dict]], str], *, api_key: str | None = None,
                 status: int = 200, error_body: str | dict | None = None, faults: dict[str, float] | None = None,
                 retry_after_s: float = 1.0, retry_after_ms: float | None = None, retry_after_date: bool = False,
                 hang_s: float = 3.0,
                 latency_s: float = 0.0, seed: int = 0, batch_error_rate: float = 0.0,
                 batch_hold: bool = False, batch_hold_create: bool = False, batch_expire_first: bool = False,
                 batch_end: dict[str, str] | None = None,
                 check_key_on_models: bool = True, content_parts: bool = False, tokens_per_char: bool = False,
                 top_logprobs_fn: Callable[[list[dict]], list[tuple[str, float]]] | None = None):
        self.answer_fn = answer_fn
        self.top_logprobs_fn = top_logprobs_fn  # messages -> [(token, logprob)]: the first token's top list
        self.content_parts = content_parts      # answer content as a list of text parts, as some servers do
        self.tokens_per_char = tokens_per_char  # bill one token per character (CJK text runs at about that)
        self.api_key = api_key
        self.status = status
        self.error_body = error_body
        self.faults = faults or {}
        unknown = set(self.faults) - set(TRANSPORT_FAULTS) - set(ANSWER_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.retry_after_s = retry_after_s
        self.retry_after_ms = retry_after_ms
        self.retry_after_date = retry_after_date
        self.hang_s = hang_s
        self.latency_s = latency_s
        self.seed = seed
        self.rng = random.Random(seed)
        self.calls: list[dict] = []
        self.other_calls: list[tuple] = []  # (method, path, body) of embeddings and model lookups
        self.arrivals: list[float] = []     # time.monotonic() of every chat request
        self._seen: Counter = Counter()     # occurrences of each request key so far
        self.events: Counter = Counter()     # what was served, by kind ("ok", "429", "invalid_json", ...)
        self.paid: Counter = Counter()       # well-formed 200 answers per request key
        self.billed: Counter = Counter()     # answers made and billed per request key (whatever reached the client)
        self.billed_tokens = [0, 0]
        self.early_retries = 0
        self.open_connections = 0
        self._not_before: dict[str, float] = {}
        self._lock = threading.Lock()
        # Batch API state
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_creations = 0
        self.batch_error_rate = batch_error_rate
        self.batch_release = threading.Event()
        if not batch_hold:
            self.batch_release.set()
        self.batch_create_release = threading.Event()  # batch_hold_create: the batch exists, its id is not sent yet
        if not batch_hold_create:
            self.batch_create_release.set()
        self.batch_end = dict(batch_end or {})
        if batch_expire_first:
            self.batch_end.setdefault("batch_1", "expired")
        unknown_end = set(self.batch_end.values()) - {"failed", "cancelled", "expired"}
        if unknown_end:
            raise ValueError(f"unknown batch endings {sorted(unknown_end)}")
        self.batch_polls: Counter = Counter()  # GET /batches/{id} per batch id
        self.check_key_on_models = check_key_on_models
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _draw(self, key: str) -> str:
        """The fault for the n-th arrival of a request key: the same whatever order threads run in."""
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
        u = random.Random(f"{self.seed}:{key}:{n}").random()
        edge = 0.0
        for kind in (*TRANSPORT_FAULTS, *ANSWER_FAULTS):
            edge += self.faults.get(kind, 0.0)
            if u < edge:
                return kind
        return "ok"

    def completion(self, body: dict, kind: str = "ok") -> dict:
        """The chat.completion object for a request (with an answer fault applied when ``kind`` names one)."""
        text = self.answer_fn(body["messages"])
        finish, refusal = "stop", None
        if kind == "invalid_json":
            text = text[: max(1, len(text) // 2)] + " ... sorry"
        elif kind == "schema":
            text = json.dumps({"unexpected": "field"})
        elif kind == "refusal":
            text, refusal = None, "I can't help with that."
        elif kind == "length":
            text, finish = text[: max(1, len(text) // 3)], "length"
        per = 1 if self.tokens_per_char else 4
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // per
        completion_tokens = len(text or "") // per + 1
        with self._lock:
            self.billed[body_key(body)] += 1
            self.billed_tokens[0] += prompt_tokens
            self.billed_tokens[1] += completion_tokens
        content = [{"type": "text", "text": text}] if self.content_parts and text is not None else text
        logprobs = None
        if body.get("logprobs"):  # one answer token, certain of itself, unless top_logprobs_fn says otherwise
            top = self.top_logprobs_fn(body["messages"]) if self.top_logprobs_fn else [(text, -0.01)]
            logprobs = {"content": [{"token": top[0][0], "logprob": top[0][1], "bytes": None,
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]}
        return {"id": f"chatcmpl-{len(self.calls)}", "object": "chat.completion", "created": 0,
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": finish, "logprobs": logprobs,
                             "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    # -- Batch API ------------------------------------------------------------------------------------------------

    def _run_batch(self, batch: dict) -> None:
        self.batch_release.wait()
        lines = self.files[batch["input_file_id"]].decode().splitlines()
        out, err = [], []
        end = self.batch_end.get(batch["id"], "completed")
        if end == "failed":  # validation failed: nothing ran, nothing is billed
            with self._lock:
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": None,
                                                               "param": None,
                                                               "message": "injected batch failure"}]}
                batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
                batch["status"], batch["failed_at"] = "failed", int(time.time())
            return
        if end == "cancelled":
            with self._lock:
                batch["status"] = "cancelling"
        for i, line in enumerate(lines):
            if end in ("expired", "cancelled") and i >= len(lines) // 2:  # stopped: the rest never ran
                break
            item = json.loads(line)
            with self._lock:
                failed = self.rng.random() < self.batch_error_rate
            if failed:
                err.append({"id": f"req-{item['custom_id']}", "custom_id": item["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "injected batch line failure"}})
                continue
            body = item["body"]
            with self._lock:
                self.paid[body_key(body)] += 1
            out.append({"id": f"req-{item['custom_id']}", "custom_id": item["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": "r", "body": self.completion(body)}})
        with self._lock:
            if out:
                batch["output_file_id"] = self._store("\n".join(json.dumps(o) for o in out).encode())
            if err:
                batch["error_file_id"] = self._store("\n".join(json.dumps(e) for e in err).encode())
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
            batch["status"] = end
            batch[f"{end}_at"] = int(time.time())

    def _store(self, data: bytes) -> str:
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = data
        return file_id

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: open connections are observable

            def log_message(self, *args):  # keep test output clean
                pass

            def setup(self):
                super().setup()
                with fake._lock:
                    fake.open_connections += 1

            def finish(self):
                try:
                    super().finish()
                finally:
                    with fake._lock:
                        fake.open_connections -= 1

            def _send(self, status: int, body: dict | str | bytes, headers: dict | None = None) -> None:
                if isinstance(body, dict):
                    body = json.dumps(body)
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    # Like some real gateways, echo what was sent: the client must scrub it.
                    sent = self.headers.get("Authorization", "")
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {sent}",
                                               "type": "invalid_request_error", "code": "invalid_api_key"}})
                    return False
                return True

            def do_GET(self):
                path0 = self.path.split("?")[0].rstrip("/")
                if (fake.check_key_on_models or not path0.endswith("/models")) and not self._authorised():
                    return
                path = self.path.split("?")[0].rstrip("/")
                if path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})
                elif path.startswith("/v1/models/"):
                    name = urllib.parse.unquote(path[len("/v1/models/"):])
                    with fake._lock:
                        fake.other_calls.append(("GET", path, None))
                    if name == "fake-teacher":
                        self._send(200, {"id": name, "object": "model", "created": 0, "owned_by": "fake"})
                    else:
                        self._send(404, {"error": {"message": f"The model '{name}' does not exist",
                                                   "type": "invalid_request_error", "code": "model_not_found"}})
                elif "/batches/" in path:
                    batch = fake.batches.get(path.rsplit("/", 1)[1])
                    with fake._lock:
                        fake.batch_polls[path.rsplit("/", 1)[1]] += 1
                    self._send(200, batch) if batch else self._send(404, {"error": {"message": "no such batch"}})
                elif path.endswith("/batches"):
                    self._send(200, {"object": "list", "data": list(fake.batches.values()), "has_more": False})
                elif path.startswith("/v1/files/") and path.endswith("/content"):
                    file_id = path.split("/")[3]
                    data = fake.files.get(file_id)
                    self._send(200, data) if data is not None else self._send(404, {"error": {"message": "no file"}})
                else:
                    self._send(404, {"error": {"message": f"no route {path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                path = self.path.split("?")[0].rstrip("/")
                if path.endswith("/embeddings"):  # OpenAI's embeddings endpoint, for the gateway's pass-through
                    body = json.loads(raw or b"{}")
                    with fake._lock:
                        fake.other_calls.append(("POST", path, body))
                    if not self._authorised():
                        return
                    texts = body.get("input") if isinstance(body.get("input"), list) else [body.get("input")]
                    self._send(200, {"object": "list", "model": body.get("model"), "data": [
                        {"object": "embedding", "index": i, "embedding": [len(str(t)) / 100, 0.5, -0.25]}
                        for i, t in enumerate(texts)], "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})
                    return
                chat = not (path.endswith("/files") or path.endswith("/batches"))
                if chat:  # every chat request that reaches the server is recorded, authorised or not
                    body = json.loads(raw or b"{}")
                    key = body_key(body)
                    now = time.monotonic()
                    with fake._lock:
                        fake.calls.append(body)
                        fake.arrivals.append(now)
                        if now < fake._not_before.get(key, 0.0):
                            fake.early_retries += 1
                if not self._authorised():
                    return
                if path.endswith("/files"):
                    return self._upload(raw)
                if path.endswith("/batches"):
                    return self._create_batch(json.loads(raw))
                if fake.status != 200:
                    self._send(fake.status, fake.error_body or {"error": {"message": "injected failure"}})
                    return
                kind = fake._draw(key)
                with fake._lock:
                    fake.events[kind] += 1
                if fake.latency_s:
                    time.sleep(fake.latency_s)
                if kind == "429":
                    headers = {"Retry-After": f"{fake.retry_after_s:g}"}
                    wait = fake.retry_after_s
                    if fake.retry_after_date:  # the HTTP-date form, whole seconds: wait until that second
                        import email.utils
                        when = time.time() + fake.retry_after_s
                        headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
                        wait = int(when) - time.time()
                    if fake.retry_after_ms is not None:
                        headers["retry-after-ms"] = f"{fake.retry_after_ms:g}"
                        wait = fake.retry_after_ms / 1000
                    with fake._lock:
                        fake._not_before[key] = time.monotonic() + wait
                    self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, headers)
                elif kind in ("408", "409"):
                    self._send(int(kind), {"error": {"message": "try again", "type": "server_error"}})
                elif kind == "500":
                    self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                elif kind == "hang":
                    time.sleep(fake.hang_s)
                    self.close_connection = True
                elif kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                elif kind == "malformed_body":
                    fake.completion(body)  # made and billed, then cut short in transit
                    self._send(200, '{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
                elif kind == "billed_hang":
                    fake.completion(body)
                    time.sleep(fake.hang_s)
                    self.close_connection = True
                else:
                    reply = fake.completion(body, kind)
                    if kind == "ok":
                        with fake._lock:
                            fake.paid[key] += 1
                    self._send(200, reply)

            def _upload(self, raw: bytes) -> None:
                msg = BytesParser(policy=HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                data, purpose = b"", ""
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name == "file":
                        data = part.get_payload(decode=True)
                    elif name == "purpose":
                        purpose = part.get_payload(decode=True).decode()
                with fake._lock:
                    file_id = fake._store(data)
                self._send(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": 0,
                                 "filename": "batch.jsonl", "purpose": purpose or "batch", "status": "processed"})

            def _create_batch(self, req: dict) -> None:
                with fake._lock:
                    fake.batch_creations += 1
                    batch_id = f"batch_{fake.batch_creations}"
                    batch = {"id": batch_id, "object": "batch", "endpoint": req["endpoint"], "errors": None,
                             "input_file_id": req["input_file_id"], "completion_window": req["completion_window"],
                             "status": "in_progress", "output_file_id": None, "error_file_id": None,
                             "created_at": int(time.time()), "metadata": req.get("metadata"),
                             "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                    fake.batches[batch_id] = batch
                threading.Thread(target=fake._run_batch, args=(batch,), daemon=True).start()
                fake.batch_create_release.wait()  # a client killed here never learns the id
                self._send(200, batch)

        return Handler

    def __enter__(self) -> "FakeTeacher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.batch_release.set()
        self.batch_create_release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
