"""The teacher client: any OpenAI-compatible chat endpoint, through the ``openai`` async client.

Every request is keyed by the sha256 of its canonical form (``teacher.request``) and looked up in the ledger before
it is sent, so a call that was paid for once is never paid again. Answers are validated against the task schema; a
bad answer is retried with a fresh sample (a new key) up to ``generate.max_attempts``, then rejected with its reason.

Transport: chat requests are posted straight through aiohttp (``teacher.transport.DirectPost``: the SDK's
headers, errors and timeouts, without its per-call request assembly), or through the SDK's ``post`` without
aiohttp; the SDK also makes the Batch API's and the probe's calls. Exactly one retry layer, this one (the SDK's own
``max_retries`` is 0), under the rules of ``teacher.transport``; a wait longer than ``teacher.max_wait_s`` fails
the request explicitly. 400 ends that one request; 401, 403 and 404 end the run (every later call would fail the
same way). Requests and tokens per minute are limited client-side with ``aiolimiter``; ``teacher.concurrency`` bounds
the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter

import httpx
import openai
from aiolimiter import AsyncLimiter

from distill import DistillError, runio
from distill.config import TeacherConfig, clean_secret
from distill.ledger import Ledger, LedgerWriteError, grouped, request_key
from distill.task import OutputSchema
from distill.teacher import pricing
from distill.teacher.answers import (ANSWER_REASONS, BUDGET, Asked, ChatReader, Outcome, ScoreReader, content_text,
                                     parse_text, usage_tokens)
from distill.teacher.budget import Budget
from distill.teacher.request import build_chat_request, build_score_request, wire_body
from distill.teacher.transport import (FATAL_STATUS, Backoff, BudgetStop, DirectPost, MalformedResponse,
                                       RequestFailed, RetryLayer, failure_reason, http_client, per_second,
                                       possibly_billed)

log = logging.getLogger("distill")

NO_KEY = "not-needed"
# Importable from here too: the gateway, the Batch API and tests reach the client's vocabulary through the client.
__all__ = ["ANSWER_REASONS", "BUDGET", "NO_KEY", "Outcome", "RequestFailed", "TeacherClient", "build_chat_request",
           "content_text", "probe", "resolve_api_key"]


def resolve_api_key(tcfg: TeacherConfig) -> str:
    """The key from the environment variable named by ``teacher.api_key_env`` (never from config)."""
    if not tcfg.api_key_env:
        return NO_KEY
    # Surrounding whitespace (a trailing newline) is stripped with a warning; whitespace inside is refused.
    key = clean_secret(os.environ.get(tcfg.api_key_env), tcfg.api_key_env, "teacher.api_key_env")
    if not key:
        state = "not set" if tcfg.api_key_env not in os.environ else "empty"
        raise DistillError(f"the teacher needs an API key in the environment variable {tcfg.api_key_env}, which is "
                           f"{state} (export {tcfg.api_key_env}=... or set teacher.api_key_env)")
    return key


_logged_transports: set[str] = set()


def _log_transport(transport: str) -> None:
    """Say once per process which HTTP transport the teacher calls go through (a fallback is a warning)."""
    if transport in _logged_transports:
        return
    _logged_transports.add(transport)
    (log.warning if transport.startswith("httpx (fallback") else log.info)("teacher client: transport %s", transport)


class TeacherClient(RetryLayer):
    """Labels inputs through the ledger: ``label`` (chat answers, optionally voted), ``top_logprobs`` (scoring),
    ``write`` (free text for synthesis); one instance per event loop."""

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
        http, self.transport = http_client(tcfg.timeout_s)  # "aiohttp ..." or "httpx (fallback: why)"
        _log_transport(self.transport)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=self._key, timeout=tcfg.timeout_s,
                                         max_retries=0, http_client=http)
        self._direct = DirectPost(self.client, tcfg.timeout_s) if http is not None else None
        self._backoff = Backoff(tcfg.backoff_initial_s, tcfg.backoff_max_s)
        self.semaphore = asyncio.Semaphore(tcfg.concurrency)
        # Requests: a per-second bucket (rpm/60), steady spacing rather than a minute's worth at once. Tokens: a
        # one-minute bucket (a request may need more than a second's share), charged an estimate before sending.
        self.rpm = per_second(tcfg.rpm) if tcfg.rpm else None
        self.tpm = AsyncLimiter(tcfg.tpm, 60) if tcfg.tpm else None
        self.transport_errors: Counter = Counter()  # retried errors by reason, for the summary
        self.fatal = False  # set once a call proved that no call can succeed (401/403/404): send nothing more
        # Every paid attempt is claimed in the ledger (one cap and one payer per key across processes).
        self._own_budget = budget is None
        self.budget = budget if budget is not None else Budget(None, ledger, max_billed=tcfg.max_billed_attempts,
                                                               lease_s=tcfg.claim_lease_s)
        self._locks: dict[str, _KeyLock] = {}

    def scrub(self, text: str) -> str:
        """Remove the API key from any text before it is logged or stored."""
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def build_request(self, messages: list[dict], attempt: int, sample: int | None = None, *,
                      structured: bool = True) -> dict:
        return build_chat_request(self.tcfg, self.schema, messages, attempt, sample, structured=structured)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """Dollars for one call's tokens at ``teacher.price`` (``pricing.usd``)."""
        return pricing.usd(self.tcfg.price, prompt_tokens, cached_tokens, completion_tokens, batch=batch)

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
            return Outcome(None, outcomes[-1].reason, first_key, 0, paid, cost_usd=cost,
                           retry_after_s=outcomes[-1].retry_after_s)
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
        return await self._label_one(messages, sample, parse=parse_text, structured=False)

    async def _label_one(self, messages: list[dict], sample: int | None, parse=None,
                         structured: bool = True) -> Outcome:
        """Ledger first, then the teacher, validating every answer; a bad answer is retried as a fresh sample.

        A request key whose answer was already rejected (in this or an earlier run) is never sent again: the next
        attempt index is a fresh sample. Transport failures are not final: the next run retries them.
        """
        reader = ChatReader(parse or self.schema.parse)
        reason, paid, spent, key = "no_attempt", 0, 0.0, None
        for attempt in range(self.max_attempts):
            request = self.build_request(messages, attempt, sample, structured=structured)
            canonical = runio.canonical_json(request)  # hashed for the key and stored in the ledger row: made once
            key = runio.sha256_text(canonical)          # = request_key(request)
            got = await self._ask(key, request, reader, canonical)
            paid, spent, reason = paid + got.paid, spent + got.cost, got.reason
            if got.answer is not None or not got.final:
                return Outcome(got.answer, reason, key, attempt, paid, cache_hit=got.cache_hit, cost_usd=spent,
                               retry_after_s=got.retry_after_s)
        return Outcome(None, reason, key, self.max_attempts - 1, paid, cost_usd=spent)

    async def top_logprobs(self, messages: list[dict]) -> Outcome:
        """First-token top log-probs for a one-token answer (``teacher.method=score``), through the ledger.

        ``Outcome.answer`` is ``{"top": [[token, logprob], ...]}`` on success.
        """
        request = build_score_request(self.tcfg, messages)
        key = request_key(request)
        got = await self._ask(key, request, ScoreReader())
        return Outcome(got.answer, got.reason, key, 0, got.paid, cache_hit=got.cache_hit, cost_usd=got.cost)

    async def _ask(self, key: str, request: dict, reader, canonical: str | None = None) -> Asked:
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
                return Asked(answer, reason, cache_hit=True, final=True)
            if claim.status == "raw":
                return await self._read_raw(key, request, claim.row, reader)
            if claim.status == "over_cap":
                return Asked(None, BUDGET)
            if claim.status == "exhausted":
                return Asked(None, "max_billed_attempts")
            if claim.last_failure in reader.final:
                self.ledger.release(key, owner)
                return Asked(None, claim.last_failure, final=True)
            try:
                body, latency = await self._call(request, key, estimate)
            except BudgetStop:
                self.ledger.release(key, owner)
                return Asked(None, BUDGET)
            except RequestFailed as exc:
                if exc.recorded:
                    self.ledger.release(key, owner)
                else:
                    self.ledger.record_failure(key, exc.reason, self.scrub(exc.detail)[:200], owner=owner)
                return Asked(None, exc.reason, cost=exc.billed_usd, retry_after_s=exc.retry_after_s)
            except BaseException:
                with contextlib.suppress(LedgerWriteError):
                    self.ledger.release(key, owner)
                raise
            tokens, cost = self._price(body, request, estimate)
            self.budget.charged(cost)
            try:
                return await self._record(key, canonical or request, body, tokens, cost, latency, reader, owner,
                                          paid=1)
            except LedgerWriteError:
                self.fatal = True  # nothing more is sent while answers cannot be recorded
                raise

    async def _record(self, key: str, request: dict | str, body: dict, tokens: tuple, cost: float, latency: float,
                      reader, owner: str | None, paid: int) -> Asked:
        """Write what came back; returns once it is committed (with the rest of this turn's records), so no answer
        is handed on before it is in the ledger."""
        got, record = self._reading(key, request, body, tokens, cost, latency, reader, owner, paid)
        await grouped(self.ledger).add(record)  # with every other write of this turn of the loop
        return got

    def _reading(self, key: str, request: dict | str, body: dict, tokens: tuple, cost: float, latency: float, reader,
                 owner: str | None, paid: int) -> tuple[Asked, tuple]:
        """What a response means, and the ledger record that keeps it (``GroupCommit.add``'s argument)."""
        model = self.tcfg.model or ""
        try:
            text, answer, reason = reader.body(body)
        except Exception as exc:  # an answer of a shape we cannot read: keep it, never pay for it again
            log.warning("teacher answer for %s kept unread (%s: %s); a rerun reads it again without paying",
                        key[:12], type(exc).__name__, self.scrub(str(exc))[:120])
            return Asked(None, "unreadable_response", paid, cost), ("raw", (
                key, model, request, body), {"tokens": tokens, "cost_usd": cost, "latency_s": latency, "owner": owner})
        if answer is not None:
            record = ("success", (key, model, request, text), {
                "prompt_tokens": tokens[0], "cached_tokens": tokens[1], "completion_tokens": tokens[2],
                "cost_usd": cost, "latency_s": latency, "owner": owner})
        else:
            record = ("failure", (key, reason, text[:200]), {
                "prompt_tokens": tokens[0], "completion_tokens": tokens[2], "cost_usd": cost, "owner": owner})
        return Asked(answer, reason, paid, cost, final=answer is None), record

    async def _read_raw(self, key: str, request: dict, raw: dict, reader) -> Asked:
        """A response paid for earlier and kept unread: read it now (after a fix) at no cost."""
        got = await self._record(key, request, raw["body"], raw["tokens"], raw["cost_usd"], raw["latency_s"], reader,
                                 None, paid=0)
        return Asked(got.answer, got.reason, cache_hit=True, final=got.final)

    def read_raw_now(self, key: str, request: dict, raw: dict, reader) -> Asked:
        """``_read_raw`` outside the event loop (the Batch API's look-up of where an input stands)."""
        got, record = self._reading(key, request, raw["body"], raw["tokens"], raw["cost_usd"], raw["latency_s"],
                                    reader, None, paid=0)
        self.ledger.together([record])
        return Asked(got.answer, got.reason, cache_hit=True, final=got.final)

    def _exclusive(self, key: str) -> "_KeyLock":
        """One call per request key at a time in this client (a second identical request waits, then reads the
        ledger); the lock lives only while someone holds or waits for it."""
        held = self._locks.get(key)
        if held is None:
            held = self._locks[key] = _KeyLock(self._locks, key)
        return held

    def estimate(self, request: dict, batch: bool = False) -> float:
        """An upper bound on one request's price (``pricing.upper_bound_usd``): what the budget admits it at."""
        return pricing.upper_bound_usd(self.tcfg.price, request, self.tcfg.max_tokens, batch=batch)

    def _price(self, body: dict, request: dict, estimate: float) -> tuple[tuple[int, int, int], float]:
        """(tokens, dollars) of an answer. One without ``usage`` is charged its estimate, so a server that reports
        nothing cannot slip past the cap."""
        usage = body.get("usage")
        if isinstance(usage, dict) and usage:
            tokens = usage_tokens(usage)
            return tokens, self.cost(*tokens)
        return (pricing.prompt_token_bound(request["messages"]), 0, request.get("max_tokens") or 0), estimate

    # -- transport ------------------------------------------------------------------------------------------------

    async def _call(self, request: dict, key: str, estimate: float) -> tuple[dict, float]:
        """Send one claimed request with retries; returns (response body, latency in s).

        Every attempt after the first is admitted again under the cap and the key's ``teacher.max_billed_attempts``;
        an attempt that failed after its body was sent in a way that may be billed is recorded as such at its
        estimate. Raises RequestFailed when this one request cannot succeed, BudgetStop when the cap has no room for
        a retry, DistillError when no request can succeed.
        """
        body = wire_body(request)
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if self._direct else None
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
                return await self._send(body, data)
            except Exception as exc:
                if possibly_billed(exc):
                    self.ledger.record_failure(key, failure_reason(exc), "sent; the answer may have been billed",
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

    async def _send(self, body: dict, data: bytes | None = None) -> tuple[dict, float]:
        if self.rpm:
            await self.rpm.acquire()
        if self.tpm:
            tokens = pricing.forecast_tokens(body["messages"]) + body.get("max_tokens", 0)
            await self.tpm.acquire(min(self.tpm.max_rate, tokens))
        async with self.semaphore:
            started = time.perf_counter()
            try:
                # Not chat.completions.create: it re-validates our already-canonical body and builds pydantic
                # models for the answer (~3 ms of client CPU per call); the SDK's post still assembles an httpx
                # request per call (~1 ms), which DirectPost does once.
                if self._direct is not None:
                    resp = await self._direct(data if data is not None else
                                              json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
                else:
                    raw = await self.client.post("/chat/completions", body=body, cast_to=httpx.Response)
                    resp = json.loads(raw.content)
            except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as exc:
                raise MalformedResponse(str(exc)[:100]) from None
            latency = time.perf_counter() - started
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise MalformedResponse("no choices in the response")
        return resp, latency

    async def close(self) -> None:
        grouped(self.ledger).flush()  # only cancelled calls can leave writes queued: they are made now
        if self._direct is not None:
            await self._direct.close()
        await self.client.close()
        if self._own_budget:
            self.budget.close()


class _KeyLock:
    """``TeacherClient._exclusive``'s lock of one key: removed from the client's table when its last user leaves."""

    __slots__ = ("table", "key", "lock", "users")

    def __init__(self, table: dict, key: str):
        self.table, self.key, self.lock, self.users = table, key, asyncio.Lock(), 0

    async def __aenter__(self) -> None:
        self.users += 1
        try:
            await self.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
        self._leave()

    def _leave(self) -> None:
        self.users -= 1
        if not self.users:
            del self.table[self.key]


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
