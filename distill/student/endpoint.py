"""The one OpenAI-compatible client for a served student (the published GGUF in llama.cpp, vLLM, a gateway).

    with StudentEndpoint(base_url, model) as client:                    # one request: publish's stop check
        reply = client.ask(task.student_messages(text), max_tokens=64, response_format=fmt)
    preds = predict_endpoint(cfg, task, rows, base_url, model)          # every row: evaluate, publish's parity

A request never raises: a transport failure comes back as ``Reply.failure`` ("connection_error", "timeout",
"http_500", "bad_response"), and ``predict_endpoint`` counts failures and unparseable answers by reason.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
from tqdm import tqdm

from distill import DistillError
from distill.config import Config, read_secret_env
from distill.student.predictions import DOWN, Predictions, count_reasons
from distill.task import Task
from distill.teacher.client import NO_KEY


@dataclass
class Reply:
    """One chat completion: its first choice and usage, or why there was none."""

    choice: Any | None          # openai's Choice (message, finish_reason, logprobs); None on a failure
    usage: Any | None           # openai's CompletionUsage, when the server sent one
    failure: str | None         # None, or "connection_error", "timeout", "http_<status>", "bad_response"
    latency_s: float

    @property
    def text(self) -> str:
        return (self.choice.message.content or "") if self.choice is not None else ""


class StudentEndpoint:
    """A chat-completions client for one served model, answering at temperature 0."""

    def __init__(self, base_url: str, model: str, *, api_key: str = NO_KEY, timeout_s: float = 60,
                 max_retries: int = 1):
        self.base_url, self.model = base_url, model
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)

    def ask(self, messages: list[dict], *, max_tokens: int, response_format: dict | None = None,
            extra_body: dict | None = None, logprobs: bool = False) -> Reply:
        body: dict = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}
        if response_format:
            body["response_format"] = response_format
        if extra_body:
            body["extra_body"] = extra_body
        if logprobs:
            body["logprobs"] = True
        t0 = time.perf_counter()
        try:
            resp = self._client.chat.completions.create(**body)
            choice = resp.choices[0]
            if choice.message is None:
                raise ValueError("no message")
        except openai.APITimeoutError:
            return Reply(None, None, "timeout", time.perf_counter() - t0)
        except openai.APIConnectionError:
            return Reply(None, None, "connection_error", time.perf_counter() - t0)
        except openai.APIStatusError as exc:
            return Reply(None, None, f"http_{exc.status_code}", time.perf_counter() - t0)
        except Exception:  # a 200 whose body is not a chat completion
            return Reply(None, None, "bad_response", time.perf_counter() - t0)
        return Reply(choice, getattr(resp, "usage", None), None, time.perf_counter() - t0)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "StudentEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def endpoint_key(cfg: Config) -> str:
    """The API key eval.endpoint.api_key_env names, or the placeholder local servers accept."""
    name = cfg.eval.endpoint.api_key_env
    if not name:
        return NO_KEY
    key = read_secret_env(name, "eval.endpoint.api_key_env")
    if not key:
        raise DistillError(f"eval.endpoint.api_key_env={name} is not set in the environment; export it or unset "
                           f"eval.endpoint.api_key_env")
    return key


def predict_endpoint(cfg: Config, task: Task, rows: list[dict], base_url: str, model_name: str) -> Predictions:
    """Answers from an OpenAI-compatible chat endpoint, ``eval.endpoint.concurrency`` requests at a time.

    Never raises on a down server or garbage: transport errors are counted by reason ("connection_error",
    "timeout", "http_500", "bad_response"), unparseable answers by their parse reason ("invalid_json", ...).
    When the first request cannot reach the server, the rest are not sent ("not_sent_endpoint_down").
    Confidence = the probability of the returned token sequence when the server returns log-probs.
    """
    e = cfg.eval.endpoint
    client = StudentEndpoint(base_url, model_name, api_key=endpoint_key(cfg), timeout_s=e.timeout_s,
                             max_retries=e.max_retries)
    fmt = task.schema.response_format(e.structured_output)
    extra = task.schema.extra_body(e.structured_output)
    state = {"logprobs": e.logprobs}
    lock = threading.Lock()
    n = len(rows)
    answers: list = [None] * n
    raw, reasons, conf, lat = [""] * n, [None] * n, [None] * n, [0.0] * n

    def ask(i: int, logprobs: bool) -> Reply:
        text = rows[i]["input"]
        messages = task.student_messages(text) if e.prompt == "student" else task.teacher_messages(text)
        return client.ask(messages, max_tokens=cfg.eval.max_new_tokens, response_format=fmt, extra_body=extra,
                          logprobs=logprobs)

    def one(i: int) -> None:
        reply = ask(i, state["logprobs"])
        failure = reply.failure
        if failure and failure.startswith("http_4") and state["logprobs"] and failure not in ("http_401",
                                                                                               "http_404"):
            with lock:  # the server may not do logprobs: drop them for every later request
                state["logprobs"] = False
            reply = ask(i, False)
        lat[i] = round(reply.latency_s, 4)
        if reply.failure:
            reasons[i] = reply.failure
            return
        raw[i] = reply.text
        answer, why = task.schema.parse(raw[i])
        if reply.choice.finish_reason == "length" and answer is None:
            why = "finish_length"
        answers[i], reasons[i] = answer, why
        tokens = getattr(getattr(reply.choice, "logprobs", None), "content", None)
        if answer is not None and tokens:
            conf[i] = round(float(math.exp(sum(t.logprob for t in tokens))), 6)

    started = time.perf_counter()
    with client:
        if n:
            one(0)
            if reasons[0] in DOWN:
                for i in range(1, n):
                    reasons[i] = "not_sent_endpoint_down"
            else:
                with ThreadPoolExecutor(max_workers=e.concurrency) as pool:
                    list(tqdm(pool.map(one, range(1, n)), total=n - 1, desc="endpoint", unit="req", leave=False))
    return Predictions(answers, raw, reasons, conf, lat, count_reasons(reasons), [None] * n,
                       wall_s=time.perf_counter() - started)
