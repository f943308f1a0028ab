"""The student as the gateway calls it: an answer and its confidence, or a failure the breaker counts.

    student = ScoredStudent(base_url, task, max_new_tokens=48, timeout_s=10, session=aiohttp_session)
    reply = await student.answer(text)      # StudentReply, or raises StudentFailed("timeout" | "connection_error" ...)

Two protocols (``serve.confidence``):

- ``scored``: ``POST {base}/distill/score`` on a distill student runtime (``distill.serve.runtime``, started by the
  gateway on the published GGUF). The confidence is evaluate's ``eval.decode=scored`` confidence computed on the
  served artifact (``distill.serve.scored``): the one publish chose routing.yaml's threshold on (it scores the val
  split with this same code on this same GGUF, ``evidence.artifact``).
- ``sequence``: ``POST {base}/chat/completions`` with ``logprobs`` on any OpenAI-compatible server (vLLM,
  llama.cpp), the request and confidence of ``evaluate.predict_endpoint``: the probability of the token sequence
  the server wrote. A different number from the scored one: the threshold was not chosen on it.

The embedding-classifier rung (``student.kind=embed_classifier``) has no server: ``ClassifierStudent`` runs the
published encoder and heads in the gateway's process (``EmbedClassifier.predict`` in a worker thread), and the
confidence is the heads' (the product of each field's top probability), the one evaluate scored and publish chose
the threshold on.

The circuit breaker is a few lines of state (``Breaker``), not a library: the maintained Python breakers
(pybreaker) wrap synchronous calls, and the gateway needs only "N failures in a row open it for T seconds, then one
request tries again".
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import aiohttp

from distill.serve.runtime import SCORE_PATH
from distill.task import Task


@dataclass
class StudentReply:
    answer: dict | None          # schema-valid answer, or None (evaluate would have counted it invalid)
    confidence: float | None
    invalid_reason: str | None
    text: str


class StudentFailed(Exception):
    """The student runtime did not answer: ``kind`` is timeout, connection_error, http_<status>, bad_response, or
    input_too_long (the runtime is well: this input does not fit its context; ``message`` says by how much)."""

    def __init__(self, kind: str, message: str = ""):
        super().__init__(kind)
        self.kind, self.message = kind, message


class Student(Protocol):
    endpoint: str

    async def answer(self, text: str) -> StudentReply: ...


_JSON = {"Content-Type": "application/json"}


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, timeout: aiohttp.ClientTimeout) -> dict:
    """POST a JSON body (already encoded) and return the JSON answer; every failure becomes StudentFailed."""
    try:
        async with session.post(url, data=body, headers=_JSON, timeout=timeout) as resp:
            if resp.status == 400:
                error = _error_of(await resp.read())
                if _too_long(error):
                    raise StudentFailed("input_too_long", str(error.get("message") or "")[:300])
            if resp.status != 200:
                raise StudentFailed(f"http_{resp.status}")
            data = json.loads(await resp.read())
    except asyncio.TimeoutError:
        raise StudentFailed("timeout") from None
    except aiohttp.ClientError:
        raise StudentFailed("connection_error") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise StudentFailed("bad_response") from None
    if not isinstance(data, dict):
        raise StudentFailed("bad_response")
    return data


def _error_of(raw: bytes) -> dict:
    """The ``error`` object of an OpenAI-style error body ({} when there is none)."""
    try:
        error = json.loads(raw).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _too_long(error: dict) -> bool:
    """A 400 that says the prompt exceeds the context: distill's runtime and OpenAI say so by code, llama.cpp's
    server by type (exceed_context_size_error), vLLM in its message ("maximum context length")."""
    message = str(error.get("message") or "").lower()
    return (error.get("code") == "context_length_exceeded" or error.get("type") == "exceed_context_size_error"
            or "maximum context length" in message or "exceeds the available context" in message)


class ValidAnswers:
    """``schema.errors(answer) == []``, remembered: a scored student picks among a few enum values, so the same
    answers come back all day, and jsonschema costs tens of microseconds a call (a large share of a kept request).

    The memo is keyed by the answer's exact JSON value (types included: ``true`` is not ``1``), so it returns what
    the validator would; at most ``size`` answers are kept (then it is cleared and refills)."""

    def __init__(self, schema, size: int = 4096):
        self.schema, self.size = schema, size
        self._seen: dict = {}

    def __call__(self, answer: dict) -> bool:
        try:  # a flat answer of scalars (the usual case) keys cheaply; anything else by its canonical JSON
            key = tuple(sorted((k, type(v), v) for k, v in answer.items()))
            hash(key)
        except TypeError:
            key = json.dumps(answer, sort_keys=True)
        valid = self._seen.get(key)
        if valid is None:
            valid = not self.schema.errors(answer)
            if len(self._seen) >= self.size:
                self._seen.clear()
            self._seen[key] = valid
        return valid


class ScoredStudent:
    """A distill student runtime: evaluate's scored answer and confidence on the served artifact."""

    def __init__(self, base_url: str, task: Task, *, max_new_tokens: int, timeout_s: float,
                 session: aiohttp.ClientSession):
        self.endpoint = base_url.rstrip("/")
        self.task, self.max_new_tokens, self.timeout_s, self.session = task, max_new_tokens, timeout_s, session
        self.url = self.endpoint + SCORE_PATH
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.valid = ValidAnswers(task.schema)
        # the body's tail is the same on every request: the schema and the token cap, encoded once
        self._tail = f'"schema": {json.dumps(task.schema.schema)}, "max_new_tokens": {max_new_tokens}}}'.encode()

    def body(self, text: str) -> bytes:
        """The score request for ``text``: ``{"messages": ..., "schema": ..., "max_new_tokens": ...}`` as JSON."""
        return b'{"messages": ' + json.dumps(self.task.student_messages(text)).encode() + b", " + self._tail

    async def answer(self, text: str) -> StudentReply:
        data = await _post(self.session, self.url, self.body(text), self.timeout)
        if "answer" not in data:
            raise StudentFailed("bad_response")
        answer = data.get("answer")
        if answer is not None and (not isinstance(answer, dict) or not self.valid(answer)):
            answer = None  # a runtime answer the schema rejects is invalid, whatever the runtime said
        return StudentReply(answer, data.get("confidence") if answer is not None else None,
                            data.get("invalid_reason") or (None if answer is not None else "schema_violation"),
                            str(data.get("text") or ""))


class SequenceStudent:
    """Any OpenAI-compatible chat server: ``evaluate.predict_endpoint``'s request, answer parsing and confidence."""

    def __init__(self, base_url: str, model: str, task: Task, *, max_new_tokens: int, timeout_s: float,
                 session: aiohttp.ClientSession):
        self.endpoint = base_url.rstrip("/")
        self.model, self.task, self.max_new_tokens = model, task, max_new_tokens
        self.timeout_s, self.session = timeout_s, session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def answer(self, text: str) -> StudentReply:
        body = {"model": self.model, "messages": self.task.student_messages(text), "temperature": 0.0,
                "max_tokens": self.max_new_tokens, "logprobs": True}
        data = await _post(self.session, self.endpoint + "/chat/completions", json.dumps(body).encode(),
                           self.timeout)
        try:
            choice = data["choices"][0]
            raw = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise StudentFailed("bad_response") from None
        answer, why = self.task.schema.parse(raw)
        if choice.get("finish_reason") == "length" and answer is None:
            why = "finish_length"
        tokens = (choice.get("logprobs") or {}).get("content") or []
        confidence = None
        if answer is not None and tokens:
            try:
                confidence = round(float(math.exp(sum(float(t["logprob"]) for t in tokens))), 6)
            except (KeyError, TypeError, ValueError):
                confidence = None  # decide() then falls back with no_confidence
        return StudentReply(answer, confidence, why, raw)


class ClassifierStudent:
    """The embedding classifier, in process: its answer and the confidence from its heads."""

    endpoint = "in-process"

    def __init__(self, classifier, task: Task):
        self.classifier, self.task = classifier, task
        self._lock = threading.Lock()  # one encoder forward at a time: it uses every core already

    def _predict(self, text: str):
        with self._lock:
            return self.classifier.predict([text])[0]

    async def answer(self, text: str) -> StudentReply:
        try:
            answer, confidence, _ = await asyncio.to_thread(self._predict, text)
        except Exception as exc:  # a broken encoder or head: the breaker counts it, the teacher answers
            raise StudentFailed(f"classifier_{type(exc).__name__}") from None
        if self.task.schema.errors(answer):
            return StudentReply(None, None, "schema_violation", json.dumps(answer))
        return StudentReply(answer, float(confidence), None, json.dumps(answer))


class Breaker:
    """Closed: the student is tried. ``failures`` failures in a row open it: requests go to the teacher for
    ``cooldown_s``; then one request at a time tries the student (half open) until one succeeds."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """Whether this request may try the student (at most one trial while half open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self._probing = False

    def release(self) -> None:
        """The call ended without a verdict (the client went away): let the next request try."""
        self._probing = False
