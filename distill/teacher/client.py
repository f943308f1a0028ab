"""The teacher client: any OpenAI-compatible chat endpoint, through the ``openai`` async client.

Every request is keyed by the sha256 of its canonical form and looked up in the ledger before it is sent, so a call
that was paid for once is never paid again. Answers are validated against the task schema; a bad answer is retried
with a fresh sample (a new key) up to ``generate.max_attempts``, then rejected with its reason.

Transport: exactly one retry layer, this one (the SDK's own ``max_retries`` is 0). Only 408, 409, 429, 5xx, timeouts
and connection errors are retried, with exponential backoff and jitter (tenacity), never sooner than the server's
``Retry-After`` / ``retry-after-ms``; a wait longer than ``teacher.max_wait_s`` fails the request explicitly. 400 ends
that one request; 401, 403 and 404 end the run (every later call would fail the same way). Requests and tokens per
minute are limited client-side with ``aiolimiter``; ``teacher.concurrency`` bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import logging
import os
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from distill import DistillError, runio
from distill.config import TeacherConfig
from distill.ledger import Ledger, LedgerWriteError, request_key
from distill.task import OutputSchema
from distill.teacher.budget import Budget

log = logging.getLogger("distill")

NO_KEY = "not-needed"
RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = {401: "rejected the API key", 403: "refused access (HTTP 403)", 404: "does not serve the model"}


def resolve_api_key(tcfg: TeacherConfig) -> str:
    """The key from the environment variable named by ``teacher.api_key_env`` (never from config)."""
    from distill.config import clean_secret

    if not tcfg.api_key_env:
        return NO_KEY
    # Surrounding whitespace (a trailing newline) is stripped with a warning; whitespace inside is refused.
    key = clean_secret(os.environ.get(tcfg.api_key_env), tcfg.api_key_env, "teacher.api_key_env")
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
    confidence: dict | None = None  # per-field probability of the chosen value (score) or vote share (votes)


BUDGET = "budget"  # Outcome.reason of an input the budget cap stopped before it was asked: not a rejection
# Reasons that judge an answer the teacher gave: final for that request key (a new attempt is a new sample).
ANSWER_REASONS = frozenset({"empty", "invalid_json", "schema_violation", "refusal", "finish_length",
                            "content_filter"})


class BudgetStop(Exception):
    """The budget cap has no room for this request."""


class RequestFailed(Exception):
    """One request failed for good (retries spent, a 400, a Retry-After past max_wait_s); the run goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.recorded = False   # its last attempt is already in the ledger (as a possibly billed failure)
        self.billed_usd = 0.0   # what its possibly billed attempts were charged


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # unreadable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time()) if when else None


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, _MalformedResponse)


class _MalformedResponse(Exception):
    """A 200 whose body is not a chat completion (truncated or garbled in transit): resent like a 5xx."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, _MalformedResponse):
        return "malformed_response"
    return type(exc).__name__


class _Wait:
    """Exponential backoff with full jitter, but never shorter than the server's Retry-After."""

    def __init__(self, initial: float, cap: float):
        self.backoff = wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        backoff = self.backoff(state)
        asked = retry_after_s(state.outcome.exception()) if state.outcome else None
        if asked is None:
            return backoff
        return asked + min(backoff, 1.0) * 0.1 + 0.01  # a little after the server's time, never before


def teacher_identity(tcfg: TeacherConfig) -> dict:
    """What identifies the model behind ``teacher.model``, beyond its name: part of every ledger key, never sent.

    The rule for a request key (the one place it is decided): it covers exactly what changes the answer. That is
    the body sent (model, messages, sampling, response format, logprobs, seed) plus what the body cannot show: for a
    local teacher the model file's sha256 and its context size (never the loopback port of the server distill
    starts for it), for a remote one the base URL (another provider serving the same model name is another
    teacher), and for structured answers the schema (an answer bought under one schema is never served under
    another, even with ``structured_output=none``). Speed and retry knobs are not part of it.
    """
    if tcfg.kind == "llama_cpp":
        from distill.teacher.server import embedded_gguf

        path = Path(tcfg.model_path) if tcfg.model_path else embedded_gguf()
        stat = path.stat()
        return {"gguf_sha256": _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns),
                "n_ctx": tcfg.n_ctx or DEFAULT_N_CTX}
    url = urllib.parse.urlsplit((tcfg.base_url or "").rstrip("/"))
    host = url.hostname or ""  # never user:password@ (the key is stored in the ledger's request column)
    netloc = f"{host}:{url.port}" if url.port else host
    return {"base_url": urllib.parse.urlunsplit((url.scheme.lower(), netloc.lower(), url.path, url.query, ""))}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file is hashed again
    return runio.sha256_file(Path(path))


def build_chat_request(tcfg: TeacherConfig, schema: OutputSchema, messages: list[dict], attempt: int,
                       sample: int | None, *, structured: bool = True) -> dict:
    """The canonical request; its hash is the ledger key (see ``teacher_identity`` for what a key covers).

    Attempt 0 is greedy; later attempts and votes sample. ``sample`` (self-consistency, synthesis) is part of the
    key, so the k votes are k distinct paid calls, each paid once. ``structured=False`` (free text, synthesis)
    sends no response format, and the schema is then not part of the key. Keys starting with _ are not sent.
    """
    sampled = attempt > 0 or sample is not None
    request = {"model": tcfg.model, "messages": messages, "max_tokens": tcfg.max_tokens,
               "temperature": max(tcfg.temperature, 0.7) if sampled else tcfg.temperature,
               "_teacher": teacher_identity(tcfg)}
    if structured:
        request["response_format"] = schema.response_format(tcfg.structured_output)
        if extra := schema.extra_body(tcfg.structured_output):
            request["extra_body"] = extra
        request["_schema"] = schema.sha256
    seed = (sample or 0) * 1000 + attempt
    if seed:
        request["seed"] = seed
    return request


def build_score_request(tcfg: TeacherConfig, messages: list[dict]) -> dict:
    """A one-token request for the first answer token's top log-probs (``teacher.method=score``)."""
    from distill.teacher.scoring import TOP_LOGPROBS

    return {"model": tcfg.model, "messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
            "top_logprobs": TOP_LOGPROBS, "_teacher": teacher_identity(tcfg)}


def wire_body(request: dict) -> dict:
    """The JSON body sent for a canonical request: ``extra_body`` merged in, private (_) and null keys left out."""
    body = {k: v for k, v in request.items() if k != "extra_body" and not k.startswith("_") and v is not None}
    body.update(request.get("extra_body") or {})
    return body


def prompt_token_bound(messages: list[dict]) -> int:
    """An upper bound on a chat prompt's tokens for any tokenizer: one per UTF-8 byte (a byte-level BPE or a
    byte-fallback SentencePiece token covers at least one byte) plus the chat template's tokens per message.

    A characters-per-token guess is not a bound: CJK text runs at about one token per character (three bytes).
    The teacher's own tokenizer would be tighter, but it is not at hand offline for a remote teacher, and the
    bound only matters near the cap, where it makes the run stop a little early instead of late."""
    return sum(len(str(m.get("content") or "").encode("utf-8")) + TEMPLATE_TOKENS_PER_MESSAGE
               for m in messages) + TEMPLATE_TOKENS_PER_MESSAGE


TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers and separators of common chat templates (OpenAI's is 3-4)
DEFAULT_N_CTX = 4096
TOKEN_BOUND = "utf8_bytes"  # which bound ``estimate`` uses, named in generate's estimate


@dataclass
class _Asked:
    """One request key's result: an answer, or a reason; what it paid."""

    answer: dict | None
    reason: str | None
    paid: int = 0
    cost: float = 0.0
    cache_hit: bool = False
    final: bool = False  # the reason judges an answer (the next attempt is a fresh sample), not the transport


class _ChatReader:
    """Reads a chat answer: the stored text of a ledger row, or a fresh response body."""

    final = ANSWER_REASONS

    def __init__(self, parse):
        self.parse = parse

    def text(self, stored: str) -> tuple[dict | None, str | None]:
        answer, reason = self.parse(stored)
        return answer, None if answer is not None else f"cached_{reason}"

    def body(self, body: dict) -> tuple[str, dict | None, str | None]:
        choice = body["choices"][0]
        message = choice["message"]
        text = content_text(message.get("content"))
        answer, reason = self.parse(text)
        if message.get("refusal"):
            answer, reason = None, "refusal"
        elif choice.get("finish_reason") == "length":
            answer, reason = None, "finish_length"
        elif choice.get("finish_reason") == "content_filter":
            answer, reason = None, "content_filter"
        return text or "", answer, reason


class _ScoreReader:
    """Reads the first answer token's top log-probs."""

    final = frozenset({"no_logprobs"})

    def text(self, stored: str) -> tuple[dict | None, str | None]:
        return {"top": json.loads(stored)}, None

    def body(self, body: dict) -> tuple[str, dict | None, str | None]:
        logprobs = body["choices"][0].get("logprobs") or {}
        content = logprobs.get("content") or []
        if not content or not content[0].get("top_logprobs"):
            return "server returned no top_logprobs", None, "no_logprobs"
        top = [[t["token"], float(t["logprob"])] for t in content[0]["top_logprobs"]]
        return json.dumps(top), {"top": top}, None


def content_text(content) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts (as some servers answer)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type", "text") in ("text", "output_text"))
    raise TypeError(f"message content is a {type(content).__name__}, not text or a list of parts")


def possibly_billed(exc: BaseException) -> bool:
    """Whether a failed attempt may still be billed: the body reached the server and the answer may have been made.

    A timeout or a dropped connection after the request was sent, and a 200 that came back truncated, are billed
    by real providers; an HTTP error status (429, 5xx) and a connection that was never made are not.
    """
    if isinstance(exc, _MalformedResponse):
        return True
    if isinstance(exc, openai.APIStatusError) or not isinstance(exc, openai.APIConnectionError):
        return False  # APITimeoutError is an APIConnectionError
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError)):
            return False
        if type(cause).__name__ in ("ClientConnectorError", "ClientConnectorDNSError", "ClientProxyConnectionError"):
            return False  # aiohttp: the connection was never made
        cause = cause.__cause__ or cause.__context__
    return True


class TeacherClient:
    def __init__(self, tcfg: TeacherConfig, base_url: str, schema: OutputSchema, ledger: Ledger,
                 max_attempts: int = 3, *, votes: int = 1, min_vote_share: float = 0.0, budget: Budget | None = None):
        self.tcfg = tcfg
        self.base_url = base_url
        self.schema = schema
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.votes = votes
        self.min_vote_share = min_vote_share
        self._key = resolve_api_key(tcfg)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=self._key, timeout=tcfg.timeout_s,
                                         max_retries=0, http_client=_http_client(tcfg))
        self.semaphore = asyncio.Semaphore(tcfg.concurrency)
        # Requests: a per-second bucket (rpm/60), steady spacing rather than a minute's worth at once. Tokens: a
        # one-minute bucket (a request may need more than a second's share), charged an estimate before sending.
        self.rpm = _per_second(tcfg.rpm) if tcfg.rpm else None
        self.tpm = AsyncLimiter(tcfg.tpm, 60) if tcfg.tpm else None
        self.transport_errors: Counter = Counter()  # retried errors by reason, for the summary
        self.fatal = False  # set once a call proved that no call can succeed (401/403/404): send nothing more
        # Every paid attempt is claimed in the ledger (one cap and one payer per key across processes).
        self._own_budget = budget is None
        self.budget = budget if budget is not None else Budget(None, ledger, max_billed=tcfg.max_billed_attempts,
                                                               lease_s=tcfg.claim_lease_s)
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: Counter = Counter()

    def scrub(self, text: str) -> str:
        """Remove the API key from any text before it is logged or stored."""
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def build_request(self, messages: list[dict], attempt: int, sample: int | None = None, *,
                      structured: bool = True) -> dict:
        return build_chat_request(self.tcfg, self.schema, messages, attempt, sample, structured=structured)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        p = self.tcfg.price
        usd = ((prompt_tokens - cached_tokens) * p.input_per_1m + cached_tokens * p.cached_input_per_1m
               + completion_tokens * p.output_per_1m) / 1e6
        return usd * p.batch_discount if batch else usd

    # -- labelling ------------------------------------------------------------------------------------------------

    async def label(self, messages: list[dict]) -> Outcome:
        """Label one input: one answer, or the majority of ``votes`` sampled answers (self-consistency)."""
        if self.votes == 1:
            return await self._label_one(messages, None)
        outcomes = [await self._label_one(messages, k) for k in range(self.votes)]
        if any(o.reason == BUDGET for o in outcomes):
            return next(o for o in outcomes if o.reason == BUDGET)
        paid = sum(o.paid_calls for o in outcomes)
        cost = sum(o.cost_usd for o in outcomes)
        valid = [o for o in outcomes if o.answer is not None]
        first_key = outcomes[0].key
        if not valid:
            return Outcome(None, outcomes[-1].reason, first_key, 0, paid, cost_usd=cost)
        tally = Counter(json.dumps(o.answer, sort_keys=True) for o in valid)
        winner, count = tally.most_common(1)[0]
        share = count / self.votes
        cache_hit = all(o.cache_hit for o in outcomes)
        if share < self.min_vote_share:
            return Outcome(None, "low_vote_share", first_key, 0, paid, cache_hit=cache_hit, cost_usd=cost)
        answer = json.loads(winner)
        return Outcome(answer, None, first_key, 0, paid, cache_hit=cache_hit, cost_usd=cost,
                       confidence={"vote_share": round(share, 4)})

    async def write(self, messages: list[dict], sample: int) -> Outcome:
        """Free text from the teacher (``generate.source=synthesize``), through the ledger; answer ``{"text": ...}``."""
        return await self._label_one(messages, sample, parse=_parse_text, structured=False)

    async def _label_one(self, messages: list[dict], sample: int | None, parse=None,
                         structured: bool = True) -> Outcome:
        """Ledger first, then the teacher, validating every answer; a bad answer is retried as a fresh sample.

        A request key whose answer was already rejected (in this or an earlier run) is never sent again: the next
        attempt index is a fresh sample. Transport failures are not final: the next run retries them.
        """
        reader = _ChatReader(parse or self.schema.parse)
        reason, paid, spent, key = "no_attempt", 0, 0.0, None
        for attempt in range(self.max_attempts):
            request = self.build_request(messages, attempt, sample, structured=structured)
            key = request_key(request)
            got = await self._ask(key, request, reader)
            paid, spent, reason = paid + got.paid, spent + got.cost, got.reason
            if got.answer is not None or not got.final:
                return Outcome(got.answer, reason, key, attempt, paid, cache_hit=got.cache_hit, cost_usd=spent)
        return Outcome(None, reason, key, self.max_attempts - 1, paid, cost_usd=spent)

    async def top_logprobs(self, messages: list[dict]) -> Outcome:
        """First-token top log-probs for a one-token answer (``teacher.method=score``), through the ledger.

        ``Outcome.answer`` is ``{"top": [[token, logprob], ...]}`` on success.
        """
        request = build_score_request(self.tcfg, messages)
        key = request_key(request)
        got = await self._ask(key, request, _ScoreReader())
        return Outcome(got.answer, got.reason, key, 0, got.paid, cache_hit=got.cache_hit, cost_usd=got.cost)

    async def _ask(self, key: str, request: dict, reader) -> _Asked:
        """The answer for one request key: from the ledger, or paid for once across every process sharing it.

        The key is claimed in the ledger first (which also reserves its price under the cap); whatever comes back
        is recorded in the transaction that releases the claim. A response that cannot be read is kept raw and read
        again by the next run instead of being bought again.
        """
        estimate = self.estimate(request)
        owner = self.budget.owner
        async with self._exclusive(key):  # an identical request in flight here: wait for it, then read the ledger
            claim = await self.budget.claim(key, estimate)
            if claim.status == "hit":
                answer, reason = reader.text(claim.row["response"])
                return _Asked(answer, reason, cache_hit=True, final=True)
            if claim.status == "raw":
                return self._read_raw(key, request, claim.row, reader)
            if claim.status == "over_cap":
                return _Asked(None, BUDGET)
            if claim.status == "exhausted":
                return _Asked(None, "max_billed_attempts")
            if (previous := self.ledger.last_failure(key)) in reader.final:
                self.ledger.release(key, owner)
                return _Asked(None, previous, final=True)
            try:
                body, latency = await self._call(request, key, estimate)
            except BudgetStop:
                self.ledger.release(key, owner)
                return _Asked(None, BUDGET)
            except RequestFailed as exc:
                if exc.recorded:
                    self.ledger.release(key, owner)
                else:
                    self.ledger.record_failure(key, exc.reason, self.scrub(exc.detail)[:200], owner=owner)
                return _Asked(None, exc.reason, cost=exc.billed_usd)
            except BaseException:
                with contextlib.suppress(LedgerWriteError):
                    self.ledger.release(key, owner)
                raise
            tokens, cost = self._price(body, request, estimate)
            self.budget.charged(cost)
            try:
                return self._record(key, request, body, tokens, cost, latency, reader, owner, paid=1)
            except LedgerWriteError:
                self.fatal = True  # nothing more is sent while answers cannot be recorded
                raise

    def _record(self, key: str, request: dict, body: dict, tokens: tuple, cost: float, latency: float, reader,
                owner: str | None, paid: int) -> _Asked:
        try:
            text, answer, reason = reader.body(body)
        except Exception as exc:  # an answer of a shape we cannot read: keep it, never pay for it again
            log.warning("teacher answer for %s kept unread (%s: %s); a rerun reads it again without paying",
                        key[:12], type(exc).__name__, self.scrub(str(exc))[:120])
            self.ledger.record_raw(key, self.tcfg.model or "", request, body, tokens=tokens, cost_usd=cost,
                                   latency_s=latency, owner=owner)
            return _Asked(None, "unreadable_response", paid, cost)
        if answer is not None:
            self.ledger.record_success(key, self.tcfg.model or "", request, text, prompt_tokens=tokens[0],
                                       cached_tokens=tokens[1], completion_tokens=tokens[2], cost_usd=cost,
                                       latency_s=latency, owner=owner)
        else:
            self.ledger.record_failure(key, reason, text[:200], prompt_tokens=tokens[0], completion_tokens=tokens[2],
                                       cost_usd=cost, owner=owner)
        return _Asked(answer, reason, paid, cost, final=answer is None)

    def _read_raw(self, key: str, request: dict, raw: dict, reader) -> _Asked:
        """A response paid for earlier and kept unread: read it now (after a fix) at no cost."""
        got = self._record(key, request, raw["body"], raw["tokens"], raw["cost_usd"], raw["latency_s"], reader,
                           None, paid=0)
        return _Asked(got.answer, got.reason, cache_hit=True, final=got.final)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str):
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._waiters[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._waiters[key] -= 1
            if not self._waiters[key]:
                del self._waiters[key], self._locks[key]

    def estimate(self, request: dict) -> float:
        """An upper bound on one request's price: ``prompt_token_bound`` prompt tokens, every completion token used."""
        return self.cost(prompt_token_bound(request["messages"]), 0,
                         request.get("max_tokens") or self.tcfg.max_tokens)

    def _price(self, body: dict, request: dict, estimate: float) -> tuple[tuple[int, int, int], float]:
        """(tokens, dollars) of an answer. One without ``usage`` is charged its estimate, so a server that reports
        nothing cannot slip past the cap."""
        usage = body.get("usage")
        if isinstance(usage, dict) and usage:
            tokens = _usage(namespace(usage))
            return tokens, self.cost(*tokens)
        return (prompt_token_bound(request["messages"]), 0, request.get("max_tokens") or 0), estimate

    # -- transport ------------------------------------------------------------------------------------------------

    def _retry_allowed(self, exc: BaseException) -> bool:
        if not is_retryable(exc):
            return False
        asked = retry_after_s(exc)
        return asked is None or asked <= self.tcfg.max_wait_s

    def _count(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            self.transport_errors[_reason(exc)] += 1

    async def _call(self, request: dict, key: str, estimate: float) -> tuple[dict, float]:
        """Send one claimed request with retries; returns (response body, latency in s).

        Every attempt after the first is admitted again under the cap and the key's ``teacher.max_billed_attempts``;
        an attempt that failed after its body was sent in a way that may be billed is recorded as such at its
        estimate. Raises RequestFailed when this one request cannot succeed, BudgetStop when the cap has no room for
        a retry, DistillError when no request can succeed.
        """
        body = wire_body(request)
        attempts, billed_usd, last_billed = 0, 0.0, False

        async def attempt():
            nonlocal attempts, billed_usd, last_billed
            attempts += 1
            if attempts > 1:
                status = await self.budget.readmit(key, estimate)
                if status == "over_cap":
                    raise BudgetStop
                if status == "exhausted":
                    raise RequestFailed("max_billed_attempts", f"{self.tcfg.max_billed_attempts} possibly billed "
                                        f"failures for this request (teacher.max_billed_attempts)")
            last_billed = False
            if self.fatal:
                raise DistillError("the run is stopping (see the first error); nothing more is sent")
            try:
                return await self._send(body)
            except Exception as exc:
                if possibly_billed(exc):
                    self.ledger.record_failure(key, _reason(exc), "sent; the answer may have been billed",
                                               cost_usd=estimate, billed=True, release=False)
                    self.budget.charged(estimate)
                    billed_usd += estimate
                    last_billed = True
                raise

        try:
            return await self.retrying(attempt)
        except RequestFailed as exc:
            exc.recorded = last_billed and exc.reason != "max_billed_attempts"
            exc.billed_usd = billed_usd
            raise

    async def retrying(self, fn, *args, **kwargs):
        """``await fn(*args, **kwargs)`` under the one retry layer (also used for the Batch API's calls)."""
        retrying = AsyncRetrying(stop=stop_after_attempt(self.tcfg.max_retries + 1),
                                 wait=_Wait(self.tcfg.backoff_initial_s, self.tcfg.backoff_max_s),
                                 retry=retry_if_exception(self._retry_allowed), after=self._count, reraise=True)
        try:
            return await retrying(fn, *args, **kwargs)
        except openai.APIStatusError as exc:
            if exc.status_code in FATAL_STATUS:
                self.fatal = True
                what = FATAL_STATUS[exc.status_code]
                hint = {401: f" from ${self.tcfg.api_key_env}", 404: f" {self.tcfg.model!r}; set teacher.model"}
                raise DistillError(f"the teacher at {self.base_url} {what}{hint.get(exc.status_code, '')} "
                                   f"(HTTP {exc.status_code})") from None
            asked = retry_after_s(exc)
            if asked is not None and asked > self.tcfg.max_wait_s:
                raise RequestFailed("retry_after_too_long",
                                    f"HTTP {exc.status_code} asked to wait {asked:.0f} s, over teacher.max_wait_s="
                                    f"{self.tcfg.max_wait_s:.0f}") from None
            raise RequestFailed(_reason(exc), self.scrub(str(exc.message))) from None
        except (openai.APIConnectionError, _MalformedResponse) as exc:
            raise RequestFailed(_reason(exc), f"{type(exc).__name__} from {self.base_url}") from None

    async def _send(self, body: dict) -> tuple[dict, float]:
        if self.rpm:
            await self.rpm.acquire()
        if self.tpm:
            chars = sum(len(m.get("content") or "") for m in body["messages"])
            await self.tpm.acquire(min(self.tpm.max_rate, chars / 4 + body.get("max_tokens", 0)))
        async with self.semaphore:
            started = time.perf_counter()
            try:
                # The SDK's low-level post: same transport, auth, timeouts and errors as chat.completions.create,
                # without re-validating our already-canonical request body or building pydantic models for the
                # answer (together ~3 ms of client CPU per call, more than everything else distill does).
                raw = await self.client.post("/chat/completions", body=body, cast_to=httpx.Response)
                resp = json.loads(raw.content)
            except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as exc:
                raise _MalformedResponse(str(exc)[:100]) from None
            latency = time.perf_counter() - started
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise _MalformedResponse("no choices in the response")
        return resp, latency

    async def close(self) -> None:
        await self.client.close()
        if self._own_budget:
            self.budget.close()


def _http_client(tcfg: TeacherConfig):
    """aiohttp under the SDK when installed (``openai[aiohttp]``): httpx's connection pool scans every open
    connection on each request, which at 64 in flight cost more client CPU than the rest of a call together."""
    if hasattr(openai, "DefaultAioHttpClient"):
        try:
            import httpx_aiohttp  # noqa: F401

            return openai.DefaultAioHttpClient(timeout=tcfg.timeout_s)
        except ImportError:
            pass
    return None


def namespace(value):
    """JSON -> attribute access (``resp.choices[0].message.content``), missing attributes read as None."""
    if isinstance(value, dict):
        return _NS({k: namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [namespace(v) for v in value]
    return value


class _NS(dict):
    __slots__ = ()

    def __getattr__(self, name):
        return self.get(name)


def _per_second(per_minute: float) -> AsyncLimiter:
    """A limiter holding ``per_minute`` on average: a bucket of per_minute/60 per second (at least 1 per period)."""
    if per_minute >= 60:
        return AsyncLimiter(per_minute / 60, 1)
    return AsyncLimiter(1, 60 / per_minute)


def _parse_text(text: str | None) -> tuple[dict | None, str | None]:
    text = (text or "").strip().strip('"').strip()
    return ({"text": text}, None) if len(text) >= 8 else (None, "empty")


def _usage(usage) -> tuple[int, int, int]:
    prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
    details = getattr(usage, "prompt_tokens_details", None)
    cached_tokens = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    completion_tokens = getattr(usage, "completion_tokens", 0) or 0
    return prompt_tokens, cached_tokens, completion_tokens


async def probe(client: TeacherClient) -> None:
    """Fail fast with one clear line when the teacher cannot be reached at all (before any input is processed)."""
    try:
        await client.client.models.list(timeout=min(client.tcfg.timeout_s, 10))
    except openai.APIConnectionError:
        raise DistillError(f"cannot reach the teacher at {client.base_url}; is the server running and "
                           f"teacher.base_url right?") from None
    except openai.APIStatusError as exc:
        if exc.status_code in (401, 403):
            raise DistillError(f"the teacher at {client.base_url} {FATAL_STATUS[exc.status_code]} from "
                               f"${client.tcfg.api_key_env} (HTTP {exc.status_code})") from None
        # Some compatible servers have no /models route: the real calls will tell.
