"""The transport rules of teacher calls: which failures are retried, how long to wait, which may be billed.

Only 408, 409, 429, 5xx, timeouts, connection errors and a garbled 200 are retried, with exponential backoff and
jitter (tenacity), never sooner than the server's ``Retry-After`` / ``retry-after-ms``. 401, 403 and 404 end the run
(``FATAL_STATUS``). ``possibly_billed`` decides which failed attempts count against the budget.
"""

from __future__ import annotations

import email.utils
import time

import httpx
import openai
from aiolimiter import AsyncLimiter
from tenacity import RetryCallState, wait_exponential_jitter

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


class Backoff:
    """Exponential backoff with full jitter, but never shorter than the server's Retry-After."""

    def __init__(self, initial: float, cap: float):
        self.backoff = wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        backoff = self.backoff(state)
        asked = retry_after_s(state.outcome.exception()) if state.outcome else None
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
        if type(cause).__name__ in ("ClientConnectorError", "ClientConnectorDNSError", "ClientProxyConnectionError"):
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
