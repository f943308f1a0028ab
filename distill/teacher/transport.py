"""The transport rules of teacher calls: which failures are retried, how long to wait, which may be billed.

Only 408, 409, 429, 5xx, timeouts, connection errors and a garbled 200 are retried (``RetryLayer``, the client's
one retry layer: tenacity's ``AsyncRetrying`` after a failed first attempt), with exponential backoff and jitter
(tenacity's ``wait_exponential_jitter``), never sooner than the server's ``Retry-After`` / ``retry-after-ms``.
401, 403 and 404 end the run (``FATAL_STATUS``).
``possibly_billed`` decides which failed attempts count against the budget.

Chat requests go through ``DirectPost`` where aiohttp is installed: the request body, encoded once, is posted
straight through one aiohttp session with the SDK's own headers (computed once), and the answer is read with
``json``; its failures are raised as the SDK's exceptions, so the rules above do not depend on the transport.
Without aiohttp they go through the SDK's low-level ``post`` on its httpx pool.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections import namedtuple

import httpx
import openai
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

try:
    import aiohttp
    import yarl
except ImportError:  # pragma: no cover - the httpx fallback
    aiohttp = yarl = None

from distill import DistillError

try:  # openai >= 3 runs on httpx2 (its default pool and the aiohttp transport raise httpx2's errors)
    import httpx2
except ImportError:  # pragma: no cover - openai 1.x/2.x
    httpx2 = httpx
_NOT_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx2.ConnectError, httpx2.ConnectTimeout,
                  ConnectionRefusedError)

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = {401: "rejected the API key", 403: "refused access (HTTP 403)", 404: "does not serve the model"}


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
        self.retry_after_s: float | None = None  # the wait the server asked for on the last attempt, if any


class MalformedResponse(Exception):
    """A 200 whose body is not a chat completion (truncated or garbled in transit): resent like a 5xx."""


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
    return isinstance(exc, MalformedResponse)


def _refused(exc: BaseException) -> bool:
    """A connection refused or unreachable (not a slow one), wherever it sits in the cause chain: the SDK's aiohttp
    client reports a refused connection as a connect *timeout*."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (ConnectionRefusedError, ConnectionResetError)) or (
                type(cause).__name__ == "ClientConnectorError" and not isinstance(cause, TimeoutError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def failure_reason(exc: BaseException) -> str:
    """The ledger's ``reason`` for a failed attempt (``timeout``, ``http_429``, ...)."""
    if isinstance(exc, openai.APITimeoutError):
        return "connection_error" if _refused(exc) else "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, MalformedResponse):
        return "malformed_response"
    return type(exc).__name__


_Attempt = namedtuple("_Attempt", "attempt_number")  # what tenacity's wait functions read of a retry state


class Backoff:
    """Exponential backoff with full jitter, but never shorter than the server's Retry-After."""

    def __init__(self, initial: float, cap: float):
        self.backoff = wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial)

    def seconds(self, attempt: int, exc: BaseException | None) -> float:
        """The wait after failed attempt number ``attempt`` (1 = the first) that raised ``exc``."""
        backoff = self.backoff(_Attempt(attempt))
        asked = retry_after_s(exc) if exc is not None else None
        if asked is None:
            return backoff
        return asked + min(backoff, 1.0) * 0.1 + 0.01  # a little after the server's time, never before


def possibly_billed(exc: BaseException) -> bool:
    """Whether a failed attempt may still be billed: the body reached the server and the answer may have been made.

    A timeout or a dropped connection after the request was sent, and a 200 that came back truncated, are billed
    by real providers; an HTTP error status (429, 5xx) and a connection that was never made are not.
    """
    if isinstance(exc, MalformedResponse):
        return True
    if isinstance(exc, openai.APIStatusError) or not isinstance(exc, openai.APIConnectionError):
        return False  # APITimeoutError is an APIConnectionError
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, _NOT_CONNECTED):
            return False
        if type(cause).__name__ in ("ClientConnectorError", "ClientConnectorDNSError", "ClientProxyConnectionError",
                                    "ConnectionTimeoutError"):
            return False  # aiohttp: the connection was never made
        cause = cause.__cause__ or cause.__context__
    return True


def per_second(per_minute: float) -> AsyncLimiter:
    """A limiter holding ``per_minute`` on average: a bucket of per_minute/60 per second (at least 1 per period)."""
    if per_minute >= 60:
        return AsyncLimiter(per_minute / 60, 1)
    return AsyncLimiter(1, 60 / per_minute)


def http_client(timeout_s: float):
    """The SDK's HTTP client and the name of its transport, e.g. ``(client, "aiohttp 3.14.5 (openai 3.57.0)")``.

    aiohttp under the SDK (``openai[aiohttp]``, what ``make setup`` installs): httpx's connection pool scans every
    open connection on each request, which at 64 in flight cost more client CPU than the rest of a call together.
    Without it the client is ``None`` (the SDK's default httpx pool) and the name says why: ``httpx (fallback: ...)``.
    """
    try:
        import aiohttp
    except ImportError:
        return None, "httpx (fallback: aiohttp is not installed; pip install 'openai[aiohttp]')"
    make = getattr(openai, "DefaultAioHttpClient", None)
    if make is None:
        return None, f"httpx (fallback: openai {openai.__version__} has no aiohttp client; it needs openai>=1.97)"
    try:
        client = make(timeout=timeout_s)
    except RuntimeError as exc:  # the SDK's own check: its aiohttp extra is incomplete (httpx_aiohttp for openai 1.x)
        return None, f"httpx (fallback: {exc})"
    return client, f"aiohttp {aiohttp.__version__} (openai {openai.__version__})"


class DirectPost:
    """``POST {base_url}/chat/completions`` of an already encoded JSON body through one aiohttp session.

    The headers are the SDK client's own (``default_headers`` and ``auth_headers``, so the same key, organisation and
    project), taken once; an answer is ``json.loads`` of its bytes. An HTTP error status is raised as the SDK
    raises it (``APIStatusError`` and its subclasses, with the response's headers, so Retry-After is read the same
    way), a timeout as ``APITimeoutError``, any other failure to get an answer as ``APIConnectionError`` (the
    aiohttp error is its cause: ``possibly_billed`` tells a connection never made from one dropped mid-call).
    """

    def __init__(self, sdk: openai.AsyncOpenAI, timeout_s: float):
        self.sdk = sdk
        self.url = str(sdk.base_url).rstrip("/") + "/chat/completions"
        self._url = yarl.URL(self.url)  # parsed once, not on every post
        headers = {**sdk.default_headers, **sdk.auth_headers, "X-Stainless-Async": "async:asyncio"}
        self.headers = {k: v for k, v in headers.items() if isinstance(v, str)}  # the SDK's Omit() means none
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None  # opened in the event loop of the first call

    async def __call__(self, data: bytes):
        if self.session is None:  # no connection limit here: the client's semaphore bounds the calls in flight
            # The headers as the session's defaults: aiohttp copies those in C, per-call headers in a Python loop.
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self.timeout,
                                                 headers=self.headers)
        try:
            async with self.session.post(self._url, data=data) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._status_error(resp.status, resp.headers, raw)
        except asyncio.TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
            raise openai.APITimeoutError(request=self._request()) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(request=self._request()) from exc
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedResponse(str(exc)[:100]) from None

    def _request(self):
        return httpx2.Request("POST", self.url)

    def _status_error(self, status: int, headers, raw: bytes) -> openai.APIStatusError:
        response = httpx2.Response(status, headers=list(headers.items()), content=raw, request=self._request())
        make = getattr(self.sdk, "_make_status_error_from_response", None)  # the SDK's message and error class
        if make is not None:
            return make(response)
        return openai.APIStatusError(f"Error code: {status}", response=response, body=None)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class RetryLayer:
    """The one retry layer of teacher calls (a base of ``TeacherClient``: uses its ``tcfg``, ``base_url``,
    ``scrub``, ``transport_errors``, ``fatal`` and ``_backoff``)."""

    def _retry_allowed(self, exc: BaseException) -> bool:
        if not is_retryable(exc):
            return False
        asked = retry_after_s(exc)
        return asked is None or asked <= self.tcfg.max_wait_s

    async def retrying(self, fn, *args, **kwargs):
        """``await fn(*args, **kwargs)`` under the one retry layer (also used for the Batch API's calls).

        The first attempt is a plain await: a call that succeeds at once builds no retry machinery. After a
        retryable failure, tenacity's ``AsyncRetrying`` runs the rest (``teacher.max_retries`` more attempts, each
        wait from ``Backoff``); every retryable failure is counted in ``transport_errors``, the last one too.
        """
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            self._count_retryable(exc)
            if self.tcfg.max_retries < 1:
                self._give_up(exc)
            first_wait = self._backoff.seconds(1, exc)
        await asyncio.sleep(first_wait)
        retryer = AsyncRetrying(
            retry=retry_if_exception(self._retry_allowed),
            after=lambda state: self._count_retryable(state.outcome.exception()),
            stop=stop_after_attempt(self.tcfg.max_retries),
            # tenacity numbers its attempts from the second call: attempt n here is the call's (n + 1)-th
            wait=lambda state: self._backoff.seconds(state.attempt_number + 1, state.outcome.exception()),
            reraise=True)
        try:
            return await retryer(fn, *args, **kwargs)
        except Exception as exc:
            self._give_up(exc)

    def _count_retryable(self, exc: BaseException) -> None:
        """Count a failed attempt that may be retried; give up at once on one that may not."""
        if not self._retry_allowed(exc):
            self._give_up(exc)
        self.transport_errors[failure_reason(exc)] += 1

    def _give_up(self, exc: Exception):
        """Raise what a failed call means: DistillError (no call can succeed), RequestFailed (this one cannot), or
        ``exc`` itself when it is neither an HTTP nor a transport failure."""
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code in FATAL_STATUS:
                self.fatal = True
                what = FATAL_STATUS[exc.status_code]
                hint = {401: f" from ${self.tcfg.api_key_env}", 404: f" {self.tcfg.model!r}; set teacher.model"}
                raise DistillError(f"the teacher at {self.base_url} {what}{hint.get(exc.status_code, '')} "
                                   f"(HTTP {exc.status_code})") from None
            asked = retry_after_s(exc)
            if asked is not None and asked > self.tcfg.max_wait_s:
                failed = RequestFailed("retry_after_too_long", f"HTTP {exc.status_code} asked to wait {asked:.0f} "
                                       f"s, over teacher.max_wait_s={self.tcfg.max_wait_s:.0f}")
            else:
                failed = RequestFailed(failure_reason(exc), self.scrub(str(exc.message)))
            failed.retry_after_s = asked
            raise failed from None
        if isinstance(exc, (openai.APIConnectionError, MalformedResponse)):
            raise RequestFailed(failure_reason(exc), f"{type(exc).__name__} from {self.base_url}") from None
        raise exc
