"""The teacher client: any OpenAI-compatible chat endpoint, through the ``openai`` async client.

Every request is keyed by the sha256 of its canonical form and looked up in the ledger before it is sent, so a call
that was paid for once is never paid again. Answers are validated against the task schema; a bad answer is retried
with a fresh sample (a new key) up to ``generate.max_attempts``, then rejected with its reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

import openai

from distill import DistillError
from distill.config import TeacherConfig
from distill.ledger import Ledger, request_key
from distill.task import OutputSchema

log = logging.getLogger("distill")

NO_KEY = "not-needed"


def resolve_api_key(tcfg: TeacherConfig) -> str:
    """The key from the environment variable named by ``teacher.api_key_env`` (never from config)."""
    if not tcfg.api_key_env:
        return NO_KEY
    key = os.environ.get(tcfg.api_key_env)
    if not key:
        raise DistillError(f"the teacher needs an API key in the environment variable {tcfg.api_key_env}, which is "
                           f"not set (export {tcfg.api_key_env}=... or set teacher.api_key_env)")
    return key


@dataclass
class Outcome:
    """The result of labelling one input."""

    answer: dict | None
    reason: str | None  # None on success, else why it was rejected
    key: str | None
    attempt: int
    paid_calls: int = 0
    cache_hit: bool = False
    cost_usd: float = 0.0
    confidence: dict | None = None  # per-field probability of the chosen value (teacher.method=score)


class TeacherClient:
    def __init__(self, tcfg: TeacherConfig, base_url: str, schema: OutputSchema, ledger: Ledger,
                 max_attempts: int = 3):
        self.tcfg = tcfg
        self.base_url = base_url
        self.schema = schema
        self.ledger = ledger
        self.max_attempts = max_attempts
        self._key = resolve_api_key(tcfg)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=self._key, timeout=tcfg.timeout_s,
                                         max_retries=tcfg.max_retries)
        self.semaphore = asyncio.Semaphore(tcfg.concurrency)

    def scrub(self, text: str) -> str:
        """Remove the API key from any text before it is logged or stored."""
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def build_request(self, messages: list[dict], attempt: int) -> dict:
        """The canonical request; its hash is the ledger key. Attempt 0 is greedy; later attempts sample."""
        t = self.tcfg
        request = {"model": t.model, "messages": messages, "max_tokens": t.max_tokens,
                   "temperature": t.temperature if attempt == 0 else max(t.temperature, 0.7),
                   "response_format": self.schema.response_format(t.structured_output)}
        if extra := self.schema.extra_body(t.structured_output):
            request["extra_body"] = extra
        if attempt:
            request["seed"] = attempt
        return request

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        p = self.tcfg.price
        return ((prompt_tokens - cached_tokens) * p.input_per_1m + cached_tokens * p.cached_input_per_1m
                + completion_tokens * p.output_per_1m) / 1e6

    async def label(self, messages: list[dict]) -> Outcome:
        """Label one input: ledger first, then the teacher, validating every answer."""
        reason = "no_attempt"
        paid = 0
        spent = 0.0
        key = None
        for attempt in range(self.max_attempts):
            request = self.build_request(messages, attempt)
            key = request_key(request)
            cached = self.ledger.get(key)
            if cached is not None:
                answer, _ = self.schema.parse(cached["response"])
                return Outcome(answer, None, key, attempt, paid, cache_hit=True, cost_usd=spent)
            choice, usage, latency = await self._call(request)
            text, finish = choice.message.content, choice.finish_reason
            paid += 1
            prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
            details = getattr(usage, "prompt_tokens_details", None)
            cached_tokens = (getattr(details, "cached_tokens", 0) or 0) if details else 0
            completion_tokens = getattr(usage, "completion_tokens", 0) or 0
            cost = self.cost(prompt_tokens, cached_tokens, completion_tokens)
            spent += cost
            answer, reason = self.schema.parse(text)
            if finish == "length":
                answer, reason = None, "finish_length"
            elif finish == "content_filter":
                answer, reason = None, "content_filter"
            if answer is not None:
                self.ledger.record_success(key, self.tcfg.model or "", request, text, prompt_tokens=prompt_tokens,
                                           cached_tokens=cached_tokens, completion_tokens=completion_tokens,
                                           cost_usd=cost, latency_s=latency)
                return Outcome(answer, None, key, attempt, paid, cost_usd=spent)
            self.ledger.record_failure(key, reason, (text or "")[:200], prompt_tokens=prompt_tokens,
                                       completion_tokens=completion_tokens, cost_usd=cost)
        return Outcome(None, reason, key, self.max_attempts - 1, paid, cost_usd=spent)

    async def top_logprobs(self, messages: list[dict]) -> Outcome:
        """First-token top log-probs for a one-token answer (``teacher.method=score``), through the ledger.

        ``Outcome.answer`` is ``{"top": [[token, logprob], ...]}`` on success.
        """
        from distill.teacher.scoring import TOP_LOGPROBS

        request = {"model": self.tcfg.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                   "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        key = request_key(request)
        cached = self.ledger.get(key)
        if cached is not None:
            return Outcome({"top": json.loads(cached["response"])}, None, key, 0, 0, cache_hit=True)
        choice, usage, latency = await self._call(request)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        cost = self.cost(prompt_tokens, 0, completion_tokens)
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if not content or not content[0].top_logprobs:
            self.ledger.record_failure(key, "no_logprobs", "server returned no top_logprobs",
                                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                       cost_usd=cost)
            return Outcome(None, "no_logprobs", key, 0, 1, cost_usd=cost)
        top = [[t.token, t.logprob] for t in content[0].top_logprobs]
        self.ledger.record_success(key, self.tcfg.model or "", request, json.dumps(top),
                                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                   cost_usd=cost, latency_s=latency)
        return Outcome({"top": top}, None, key, 0, 1, cost_usd=cost)

    async def _call(self, request: dict):
        """Send one chat-completions request; returns (first choice, usage, latency in s)."""
        body = {k: v for k, v in request.items() if k not in ("response_format", "extra_body") or v is not None}
        async with self.semaphore:
            started = time.perf_counter()
            try:
                resp = await self.client.chat.completions.create(**body)
            except openai.APIConnectionError as exc:
                raise DistillError(f"cannot reach the teacher at {self.base_url} ({type(exc).__name__}); is the "
                                   f"server running and teacher.base_url right?") from None
            except openai.AuthenticationError:
                raise DistillError(f"the teacher at {self.base_url} rejected the API key from "
                                   f"${self.tcfg.api_key_env} (HTTP 401)") from None
            except openai.NotFoundError:
                raise DistillError(f"the teacher at {self.base_url} does not serve model {self.tcfg.model!r} "
                                   f"(HTTP 404); set teacher.model") from None
            except openai.APIStatusError as exc:
                raise DistillError(f"the teacher at {self.base_url} answered HTTP {exc.status_code}: "
                                   f"{self.scrub(str(exc.message))[:200]}") from None
            latency = time.perf_counter() - started
        return resp.choices[0], resp.usage, latency

    async def close(self) -> None:
        await self.client.close()
