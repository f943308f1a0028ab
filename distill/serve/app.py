"""The gateway's OpenAI-compatible HTTP API (Starlette on uvicorn).

    POST /v1/chat/completions   task requests (model = a task alias, or metadata.distill_task) and pass-through
    GET  /v1/models             the task aliases, then the teacher's model (pass-through)
    GET  /v1/models/{id}        one task alias, or the teacher's answer for any other model (pass-through)
    POST /v1/{endpoint}         completions, embeddings, moderations, responses: forwarded to the teacher unchanged
    GET  /healthz               student circuit and reachability, teacher reachability: ok | degraded
    GET  /metrics               Prometheus text format
    POST /admin/reload          swap in a newly published run (body {} or {"run_dir": DIR}; distill.serve.reload)

A task reply is a chat.completion whose content is the JSON answer, with headers ``x-distill-route`` (student |
teacher), ``x-distill-confidence`` (the student's confidence, ``none`` without one) and ``x-distill-reason``
(routing.decide's reason, or ``student_unavailable`` / ``student_error`` / ``input_too_long`` / ``route_disabled`` /
``teacher_down``).
A cached answer adds ``x-distill-cache`` (exact | semantic; distill.serve.cache) and keeps the route, reason and
confidence it was first served with.
``stream: true`` sends the same answer as one SSE content chunk, a finish chunk and ``[DONE]``.

Errors are OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) and never a traceback:
400 malformed JSON or no user message, 401 without a valid bearer key (when ``serve.api_keys_env`` names keys),
413 a body over ``serve.max_body_kb``, 429 over ``serve.max_concurrency`` task requests in flight (with
Retry-After), 502 when the teacher cannot answer, 503 when it is rate-limited for longer than
``serve.teacher_max_wait_s`` (with its Retry-After) or the day's budget is spent. The access log is one JSON line per request (task, route,
reason, status, latency), without keys or bodies.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import random
import time
from urllib.parse import quote

import aiohttp
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from distill import DistillError
from distill.collector import tune_for_good
from distill.serve.budget import seconds_to_midnight
from distill.serve.gateway import Served, TaskRoute
from distill.serve.hub import Gateway, ServePlan
from distill.serve.reload import Reloader
from distill.task import dump_answer
from distill.teacher.client import NO_KEY, content_text

log = logging.getLogger("distill")
access_log = logging.getLogger("distill.serve.access")


class ClientError(Exception):
    """A request the gateway refuses: its status, OpenAI error message and code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error JSON."""
    kind = _TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(plan: "ServePlan | list[ServePlan]", api_keys: list[str] | None = None, *,
               own_process: bool = False) -> Starlette:
    """The ASGI app; the gateway's live objects are built when the server starts and closed when it stops.

    Args:
        plan: what to serve, one plan per run directory (command.prepare builds them).
        api_keys: the bearer keys clients must send on /v1 routes (None or empty: no auth).
        own_process: the process serves nothing else (``python -m distill serve``): the collector is tuned for it
            once the gateway is up (``distill.collector.tune_for_good``: the start-up heap frozen, the youngest
            generation collected less often; a full collection's walk of that heap was the gateway's longest pause). Off for a gateway in a thread of a test or a notebook.
    """
    keys = [k.encode() for k in api_keys or []]
    gateway = Gateway(plan)
    plan = gateway.plan
    reloader = Reloader(gateway)
    max_body = plan.cfg.serve.max_body_kb * 1024

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            await gateway.open()
        except BaseException as exc:
            app.state.startup_error = exc  # serve reports it (not "could not listen") once uvicorn gives up
            with contextlib.suppress(Exception):
                await gateway.close()  # what open made before it failed: the HTTP session, the traffic log
            raise
        app.state.gateway = gateway
        if own_process:
            tune_for_good()
        try:
            yield
        finally:
            await gateway.close()

    def authorise(request: Request) -> None:
        if not keys:
            return
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        # compare_digest against every key: the time taken does not tell which key, or how much of one, matched
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(sent.strip().encode(), k) for k in keys):
            raise ClientError(401, "missing or invalid API key: send Authorization: Bearer <key> (one of the keys "
                              "in the variable serve.api_keys_env names)", "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        task, route_name, reason, confidence, stream = "", "error", "", None, False
        try:
            authorise(request)
            raw = await _read_body(request, max_body)
            body = _parse(raw)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ClientError(400, f"'stream' must be true or false, not {type(stream).__name__}", "invalid_type",
                                  "stream")
            route = gateway.route_for(body)
            if route is None:
                task, route_name, reason = "", "passthrough", "not_this_task"
                response = await _passthrough(gateway, raw, stream)
            else:
                task = route.name
                text = _task_input(body)
                if not route.try_enter():
                    raise ClientError(429, f"too many requests in flight for task {task!r} (serve.max_concurrency="
                                      f"{plan.cfg.serve.max_concurrency}); retry shortly", "rate_limit_exceeded",
                                      headers={"Retry-After": "1"})
                try:
                    served = await route.handle(body, text)
                finally:
                    route.leave()
                _observe(route, text, served, time.time() - (time.perf_counter() - started))
                if served.status == 200:
                    gateway.metrics.answered(task, served.route, route.teacher_price)
                route_name, reason, confidence = served.route, served.reason, served.confidence
                response = _task_response(served, body.get("model") or task, stream)
        except ClientError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)
            reason = reason or exc.code
        except Exception as exc:  # a bug: logged for the operator (keys scrubbed), one line for the client
            log.error("serve: unexpected error on a chat request (task %s)", task or "-", exc_info=exc)
            response = error_response(500, "internal error in the gateway; it is logged", "internal_error")
            route_name, reason = "error", "internal_error"
        done(task, route_name, reason, confidence, response.status_code, stream, started)
        return response

    def done(task: str, route_name: str, reason: str, confidence, status: int, stream: bool, started: float) -> None:
        """Metrics and the access line of one request (never its body or key)."""
        took = time.perf_counter() - started
        gateway.metrics.request_done(task, route_name, reason, status, took)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({"ts": round(time.time(), 3), "task": task or None, "route": route_name,
                                        "reason": reason or None, "confidence": confidence, "status": status,
                                        "stream": stream, "latency_ms": round(took * 1000, 2)}))

    async def relayed(call) -> Response:
        """A request for the teacher, not a task: ``await call()`` -> (response, stream), a ClientError answered as
        one; then its metrics and access line."""
        started, route_name, reason, stream = time.perf_counter(), "passthrough", "not_this_task", False
        try:
            response, stream = await call()
        except ClientError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)
            route_name, reason = "error", exc.code
        done("", route_name, reason, None, response.status_code, stream, started)
        return response

    async def forward(request: Request) -> Response:
        """Another OpenAI endpoint of an app that uses the gateway as its base URL: sent to the teacher unchanged
        (its key, never the client's). A task alias there is refused: a task answers chat completions only."""
        endpoint = request.path_params["endpoint"]

        async def call():
            authorise(request)
            if endpoint not in PASS_THROUGH:
                raise ClientError(404, f"POST /v1/{endpoint}: not an endpoint of the gateway; it answers POST "
                                  f"/v1/chat/completions and forwards POST /v1/{{{','.join(PASS_THROUGH)}}} to the "
                                  f"teacher", "not_found")
            raw = await _read_body(request, max_body)
            body = _parse_object(raw)
            stream = body.get("stream") is True
            if gateway.route_for(body) is not None:
                raise ClientError(400, f"{body.get('model')!r} is a distill task: it answers POST "
                                  f"/v1/chat/completions with the task's input as the user message, not POST "
                                  f"/v1/{endpoint}", "unsupported_endpoint", "model")
            return await _passthrough(gateway, raw, stream, f"/{endpoint}"), stream

        return await relayed(call)

    async def model_info(request: Request) -> Response:
        """GET /v1/models/{id}: a task alias's model object, or the teacher's answer for any other id."""
        model = request.path_params["model"]
        route = next((r for r in gateway.routes if model in r.aliases), None)
        if route is not None:  # answered here, as GET /v1/models is
            try:
                authorise(request)
            except ClientError as exc:
                return error_response(exc.status, exc.message, exc.code, headers=exc.headers)
            return JSONResponse({"id": model, "object": "model", "created": 0, "owned_by": f"distill:{route.name}"})

        async def call():
            authorise(request)
            return await _passthrough(gateway, b"", False, f"/models/{quote(model, safe='/:@')}", method="GET"), False

        return await relayed(call)

    async def models(request: Request) -> Response:
        try:
            authorise(request)
        except ClientError as exc:
            return error_response(exc.status, exc.message, exc.code, headers=exc.headers)
        data = [{"id": alias, "object": "model", "created": 0, "owned_by": f"distill:{r.name}"}
                for r in gateway.routes for alias in r.aliases]
        if plan.cfg.teacher.model:
            data.append({"id": plan.cfg.teacher.model, "object": "model", "created": 0,
                         "owned_by": "teacher (pass-through)"})
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        student_up = await gateway.students_reachable()  # the plans a reload swapped in
        teacher_up = await gateway.reachable(gateway.plan.teacher_url, gateway.teacher_headers())
        circuits = {r.name: r.breaker.state for r in gateway.routes}
        ok = student_up and teacher_up and all(state == "closed" for state in circuits.values())
        return JSONResponse({"status": "ok" if ok else "degraded",
                             "student": {"reachable": student_up, "circuit": circuits},
                             "teacher": {"reachable": teacher_up},
                             "tasks": {r.name: {"route_enabled": r.rule.route.enabled,
                                                "threshold": r.rule.route.confidence_threshold,
                                                "in_flight": r.in_flight} for r in gateway.routes}})

    async def metrics(request: Request) -> Response:
        gateway.refresh_store_metrics()
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    async def reload(request: Request) -> Response:
        try:
            authorise(request)
            raw = await _read_body(request, max_body)
            try:
                body = json.loads(raw) if raw.strip() else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("run_dir", ""), str):
                raise ClientError(400, 'the reload body is {} or {"run_dir": "DIR"} (a run whose publish stage '
                                  'finished)', "invalid_json", "run_dir")
        except ClientError as exc:
            return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)
        if reloader.busy:
            return error_response(409, "a reload is already running; retry when it ends", "reload_in_progress")
        try:
            info = await reloader.reload(body.get("run_dir") or None)
        except DistillError as exc:  # nothing was swapped: the old run keeps serving
            gateway.metrics.reloads.labels("failed").inc()
            log.error("serve: reload refused: %s", exc)
            return error_response(400, f"reload refused, the current run keeps serving: {exc}", "reload_failed")
        return JSONResponse({"status": "reloaded", **info})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              "not_found" if exc.status_code == 404 else "method_not_allowed")

    async def server_error(request: Request, exc: Exception) -> Response:
        # Logged for the operator (the log handlers scrub keys); the client gets one line, never the traceback.
        log.error("serve: unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error in the gateway; it is logged", "internal_error")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
              Route("/v1/models/{model:path}", model_info, methods=["GET"]),
              Route("/v1/{endpoint}", forward, methods=["POST"]),
              Route("/healthz", healthz), Route("/metrics", metrics),
              Route("/admin/reload", reload, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _observe(route: TaskRoute, text: str, served: Served, started: float) -> None:
    """Hand the reply to the route's watch (traffic log, shadow, drift); a failure there never fails the reply."""
    if route.watch is None:
        return
    try:
        route.watch.observe(text, served, started)
    except Exception as exc:
        log.error("serve: the traffic log / shadow step failed for %s", route.name, exc_info=exc)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_big = ClientError(413, f"request body over serve.max_body_kb={limit // 1024} KB", "request_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise ClientError(400, "request body is not UTF-8 text", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ClientError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          "invalid_json") from None
    if not isinstance(body, dict):
        raise ClientError(400, f"request body must be a JSON object, not {type(body).__name__}", "invalid_json")
    return body


def _parse(raw: bytes) -> dict:
    """A chat request's body: a JSON object with a model and messages."""
    body = _parse_object(raw)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ClientError(400, "'model' is required: a task alias (see GET /v1/models) or the teacher's model",
                          "missing_model", "model")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ClientError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                          "missing_messages", "messages")
    return body


def _task_input(body: dict) -> str:
    """The task's input: the content of the last user message (the gateway builds both prompts around it).

    What a task request cannot honour is refused by name rather than ignored: several choices (``n``; it has one
    answer, the student's or the teacher's) and tools or functions (its answer is the task's JSON)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ClientError(400, f"n={json.dumps(n)}: a task request has one answer (the student's or the teacher's); "
                          f"send n=1 or leave n out", "unsupported_parameter", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise ClientError(400, f"'{name}' is not used by task model {body['model']!r}: its answer is the task's "
                              f"JSON; call the teacher's model (GET /v1/models) for {name}", "unsupported_parameter",
                              name)
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    problem = "a task request needs a user message whose content is the task input"
    if not users:
        raise ClientError(400, f"no user message: {problem}", "missing_user_message", "messages")
    try:
        text = content_text(users[-1].get("content"))
    except (TypeError, AttributeError):
        text = None
    if not isinstance(text, str) or not text.strip():
        raise ClientError(400, f"the last user message has no text content: {problem}", "missing_user_message",
                          "messages")
    return text


_ids = random.Random()  # seeded from os.urandom once, at import
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_COMPLETION = ('{"id":"%s","object":"chat.completion","created":%d,"model":%s,"choices":[{"index":0,"message":'
               '{"role":"assistant","content":%s},"finish_reason":"stop","logprobs":null}]}')


def _task_response(served: Served, model: str, stream: bool) -> Response:
    if served.status != 200:
        headers = {"x-distill-reason": served.reason}
        if served.code == "teacher_budget":
            headers["Retry-After"] = str(seconds_to_midnight())
        elif served.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(served.retry_after_s)))
        if served.teacher_error:
            headers["x-distill-teacher-error"] = served.teacher_error
        return error_response(served.status, served.message or "not served", served.code or "not_served",
                              headers=headers)
    headers = {"x-distill-route": served.route, "x-distill-reason": served.reason,
               "x-distill-confidence": "none" if served.confidence is None else f"{served.confidence:.6g}"}
    if served.cache:
        headers["x-distill-cache"] = served.cache
    if served.teacher_error:
        headers["x-distill-teacher-error"] = served.teacher_error
    content = dump_answer(served.answer)
    # an id only has to be unique, not unguessable: the PRNG, not uuid4's os.urandom call on every reply
    ident, created = f"chatcmpl-distill-{_ids.getrandbits(96):024x}", int(time.time())
    if not stream:
        # JSONResponse's own rendering of the same object, from a template: only the id, time, model and content vary
        body = _COMPLETION % (ident, created, _dumps(model), _dumps(content))
        return Response(body.encode(), headers=headers, media_type="application/json")

    def chunk(delta: dict, finish: str | None) -> str:
        return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish}]}) + "\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": content}, None)
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


# The endpoints besides chat completions that the gateway forwards to the teacher (POST /v1/<endpoint>), so an app
# can use it as its whole OpenAI base URL: inference only. Files, batches, fine-tuning and other account calls are
# not forwarded: a gateway client must not reach them with the teacher's key.
PASS_THROUGH = ("completions", "embeddings", "moderations", "responses")


async def _passthrough(gateway: Gateway, raw: bytes, stream: bool, path: str = "/chat/completions", *,
                       method: str = "POST") -> Response:
    """Send the body unchanged to the teacher's ``path`` with the teacher's key; relay status and body."""
    url = f"{gateway.plan.teacher_url}{path}"
    timeout = aiohttp.ClientTimeout(total=None if stream else gateway.cfg.serve.teacher_timeout_s,
                                    sock_connect=10)
    try:
        upstream = await gateway.session.request(method, url, data=raw if method == "POST" else None,
                                                 headers=gateway.teacher_headers(), timeout=timeout)
    except (aiohttp.ClientError, TimeoutError):
        raise ClientError(502, "the teacher (pass-through for models that are not a task) did not answer",
                          "teacher_unavailable") from None
    media = upstream.headers.get("Content-Type", "application/json")
    if upstream.status in (401, 403):  # the client authenticated with the gateway; this is the gateway's problem
        upstream.release()
        log.error("serve: the teacher refused the gateway's key on a pass-through (HTTP %d)", upstream.status)
        raise ClientError(502, f"the teacher refused the gateway's credentials (HTTP {upstream.status}); the "
                          f"operator must check teacher.api_key_env", "teacher_unavailable")
    if not stream or upstream.status != 200:
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            raise ClientError(502, "the teacher's pass-through answer was cut off", "teacher_unavailable") from None
        finally:
            upstream.release()
        if gateway.teacher_key != NO_KEY:  # some providers echo the key they were sent in an error body
            data = data.replace(gateway.teacher_key.encode(), b"***")
        return Response(data, status_code=upstream.status, media_type=media)

    async def relay():
        try:
            async for piece in upstream.content.iter_any():
                yield piece
        except (aiohttp.ClientError, TimeoutError):
            log.warning("serve: the teacher's pass-through stream was cut off")

    return StreamingResponse(relay(), status_code=upstream.status, media_type=media,
                             background=BackgroundTask(upstream.release))
