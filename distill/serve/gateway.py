"""One task request through the cascade: the student answers with a confidence, routing.decide keeps it or the
teacher answers through the run's ledger.

    route = TaskRoute(cfg, rule, task, student, teacher, metrics)
    served = await route.handle(request_body, input_text)   # Served(status, answer, route, reason, confidence, ...)

Prompts: the student's are ``Task.student_messages`` (rendered with the artifact's chat template by the student
runtime, as train rendered them); the teacher's are ``Task.teacher_messages`` sent by ``TeacherClient.label``, whose
request (``build_chat_request``) and ledger key are generate's, so a fallback for an input generate already labelled
is answered from ``generate/ledger.sqlite`` and costs nothing. Inputs are redacted first when generate redacted
them (``generate.redact_pii``): the student was trained on, and the ledger keyed by, the redacted text.

Limits of that key match, said at start-up: a run labelled with ``teacher.method=score`` (per-field log-prob
scoring, calibrated over the whole input set) or ``generate.few_shot=nearest`` asked the teacher other requests;
the gateway's fallbacks are then fresh chat requests, paid once each and kept in the same ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from distill import DistillError, paths
from distill.data import pii
from distill.config import Config
from distill.ledger import Ledger
from distill.routing import RoutingRule, decide, matches
from distill.serve.cache import ExactCache, SemanticCache, load_threshold, route_digest
from distill.serve.metrics import Metrics
from distill.serve.shadow import Watch
from distill.serve.traffic import TrafficLog, open_traffic_log
from distill.serve.store import StoreError, open_store
from distill.serve.student import (Breaker, ScoredStudent, SequenceStudent, Student, StudentFailed,
                                   StudentReply)
from distill.task import Task
from distill.teacher.client import BUDGET, NO_KEY, TeacherClient, resolve_api_key

log = logging.getLogger("distill")

# Teacher failures that mean "it did not answer" (the request may be sent again later) rather than a bad answer.
TEACHER_DOWN = frozenset({"connection_error", "timeout", "malformed_response", "retry_after_too_long",
                          "max_billed_attempts", "unreadable_response", "teacher_refused"})


@dataclass
class Served:
    """The gateway's reply to one task request."""

    status: int
    answer: dict | None
    route: str                       # student | teacher (| none on an error)
    reason: str                      # routing.decide's reason, or the gateway's (student_unavailable, ...)
    confidence: float | None
    message: str | None = None       # the error message when status != 200
    code: str | None = None          # the OpenAI error code when status != 200
    teacher_error: str | None = None # why the teacher failed, when it did
    cache: str | None = None         # exact | semantic: answered from that cache (x-distill-cache)
    student_answer: dict | None = None  # the student's parsed answer, kept or not (traffic log, drift)


def ledger_key_limits(cfg: Config, method: str) -> list[str]:
    """Why fallbacks for inputs generate labelled would not be found in the ledger ([]: they will be).

    ``method`` is the teacher method generate used (its DONE.json summary)."""
    out = []
    if method != "generate":
        out.append(f"generate labelled with teacher.method={method}; the gateway's fallbacks are chat requests "
                   f"(teacher.method=generate), paid once each")
    if cfg.generate.few_shot == "nearest":
        out.append("generate used generate.few_shot=nearest; the gateway's fallbacks use the recipe's fixed "
                   "few-shot set")
    return out


class TaskRoute:
    """One published task: its rule, prompts, student (behind a circuit breaker) and teacher."""

    watch: "Watch | None" = None  # traffic log, shadow calls, drift (distill.serve.shadow); Gateway.open sets it

    def __init__(self, cfg: Config, rule: RoutingRule, task: Task, student: Student, teacher: TeacherClient,
                 metrics: Metrics, *, exact: ExactCache | None = None, semantic: SemanticCache | None = None,
                 store=None):
        self.cfg, self.rule, self.task = cfg, rule, task
        self.exact, self.semantic, self.store = exact, semantic, store
        self.student, self.teacher, self.metrics = student, teacher, metrics
        self.name = rule.task.id
        self.breaker = Breaker(cfg.serve.breaker_failures, cfg.serve.breaker_cooldown_s)
        self.in_flight = 0
        self.metrics.student_up.labels(self.name).set(1)

    @property
    def aliases(self) -> list[str]:
        return list(self.rule.task.match.model_aliases) or [self.name]

    def try_enter(self) -> bool:
        """Admit one more request unless ``serve.max_concurrency`` are in flight (the caller answers 429)."""
        if self.in_flight >= self.cfg.serve.max_concurrency:
            return False
        self.in_flight += 1
        self.metrics.in_flight.labels(self.name).set(self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.name).set(self.in_flight)

    async def handle(self, request: dict, text: str) -> Served:
        """Answer one task request (``text`` is the user message: the task input). Never raises for a student or
        teacher failure: those are a fallback or an error status in ``Served``."""
        if self.cfg.generate.redact_pii:
            text = pii.redact(text)[0]
        key = None
        if self.exact is not None:
            key = self.exact.key(request, text)
            hit = self._cache_op(self.exact.get, key)
            self._count("exact", hit is not None)
            if hit is not None:
                return Served(200, hit["answer"], hit["route"], hit["reason"], hit["confidence"], cache="exact")
        served = await self._answer(request, text)
        if key is not None and served.status == 200 and served.reason != "teacher_down" and served.cache is None:
            self._cache_op(self.exact.put, key, served.answer, served.route, served.reason, served.confidence)
        return served

    def _count(self, cache: str, hit: bool) -> None:
        if self.store is not None:
            self._cache_op(self.store.incr, f"cache.{cache}.{'hit' if hit else 'miss'}.{self.name}")

    def _cache_op(self, fn, *args):
        """A store call that never fails a request: a store that is down serves as a cache miss (logged)."""
        try:
            return fn(*args)
        except StoreError as exc:
            log.warning("serve: cache skipped for %s: %s", self.name, exc)
            return None

    async def _semantic(self, text: str):
        """(cached teacher answer or None, the input's embedding or None when the cache is off or failed)."""
        try:
            vector = await self.semantic.embed(text)
        except Exception as exc:  # the cache is an optimisation: the teacher answers instead
            log.warning("serve: semantic cache skipped for %s: the embedding failed (%s)", self.name, exc)
            return None, None
        found = self._cache_op(self.semantic.lookup, vector)
        answer = found[0] if found else None
        self._count("semantic", answer is not None)
        return answer, vector

    async def _answer(self, request: dict, text: str) -> Served:
        reply: StudentReply | None = None
        if not self.rule.route.enabled:
            reason = "route_disabled"  # the student cannot keep any answer: do not wait for one
        else:
            reply, reason = await self._ask_student(text)
            if reply is not None:
                decision = decide(self.rule, request, reply.answer, reply.confidence)
                if decision.use_student and not (self.watch and self.watch.drifted()):
                    return Served(200, reply.answer, "student", decision.reason, reply.confidence)
                # serve.on_drift=fallback while a drift alarm holds: the teacher answers what the student would keep
                reason = "drift" if decision.use_student else decision.reason
        confidence = reply.confidence if reply is not None else None
        vector = None
        if self.semantic is not None:
            cached, vector = await self._semantic(text)
            if cached is not None:
                return Served(200, cached, "teacher", reason, confidence, cache="semantic",
                              student_answer=reply and reply.answer)
        answer, teacher_error = await self._ask_teacher(text)
        if answer is not None:
            if vector is not None:
                self._cache_op(self.semantic.add, vector, answer)
            return Served(200, answer, "teacher", reason, confidence, student_answer=reply and reply.answer)
        if self.cfg.serve.on_teacher_down == "student":
            if reply is None and reason == "route_disabled":
                reply, _ = await self._ask_student(text)
            if reply is not None and reply.answer is not None:
                return Served(200, reply.answer, "student", "teacher_down", reply.confidence,
                              teacher_error=teacher_error)
        if teacher_error == BUDGET:
            return Served(503, None, "none", reason, confidence, "the gateway's teacher budget is spent; the "
                          "request was not served", "teacher_budget", teacher_error)
        if teacher_error in TEACHER_DOWN or str(teacher_error).startswith("http_"):
            message = f"the teacher did not answer ({teacher_error}); the request was not served"
        else:
            message = f"the teacher gave no valid answer ({teacher_error}); the request was not served"
        return Served(502, None, "none", reason, confidence, message, "teacher_unavailable", teacher_error)

    async def _ask_student(self, text: str) -> tuple[StudentReply | None, str]:
        """(reply, reason): no reply when the circuit is open or the call failed."""
        if not self.breaker.allow():
            return None, "student_unavailable"
        try:
            reply = await self.student.answer(text)
        except StudentFailed as exc:
            self.breaker.failure()
            self.metrics.student_errors.labels(self.name, exc.kind).inc()
            if self.breaker.state != "closed":
                self.metrics.student_up.labels(self.name).set(0)
                log.warning("serve: student for %s failed (%s); circuit open for %.0f s, the teacher answers",
                            self.name, exc.kind, self.breaker.cooldown_s)
            return None, "student_error"
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        self.metrics.student_up.labels(self.name).set(1)
        return reply, "answered"

    async def _ask_teacher(self, text: str) -> tuple[dict | None, str | None]:
        """(answer, None) or (None, why the teacher failed), through the ledger."""
        try:
            outcome = await self.teacher.label(self.task.teacher_messages(text))
        except DistillError as exc:
            # 401/403/404 end a generate run; a gateway keeps serving and tries again on the next request.
            self.teacher.fatal = False
            log.error("serve: the teacher refused a fallback for %s: %s", self.name, self.teacher.scrub(str(exc)))
            self.metrics.teacher_calls.labels(self.name, "failed").inc()
            return None, "teacher_refused"
        if outcome.cost_usd:
            self.metrics.teacher_spend.labels(self.name).inc(outcome.cost_usd)
        if outcome.answer is None:
            self.metrics.teacher_calls.labels(self.name, "failed").inc()
            return None, outcome.reason or "no_answer"
        self.metrics.teacher_calls.labels(self.name, "ledger" if outcome.cache_hit and not outcome.paid_calls
                                          else "paid").inc()
        return outcome.answer, None


@dataclass
class ServePlan:
    """What one gateway serves, resolved before its event loop starts (child servers already up)."""

    cfg: Config
    rule: RoutingRule
    task: Task
    student_url: str
    teacher_url: str
    ledger_path: Path
    teacher_method: str = "generate"
    artifact_sha256: str | None = None  # the served GGUF's (None: a student endpoint the user runs); in cache keys
    student_stack: contextlib.ExitStack | None = None  # the student runtime this plan started (a reload stops it)


class Gateway:
    """The live objects of one gateway: HTTP session, ledger, teacher client, task routes, metrics. Built inside
    the server's event loop (``open``) and closed when it stops (``close``)."""

    def __init__(self, plan: ServePlan):
        self.plan = plan
        self.cfg = plan.cfg
        self.metrics = Metrics()
        self.routes: list[TaskRoute] = []
        self.teacher_key = resolve_api_key(plan.cfg.teacher)
        self.session: aiohttp.ClientSession | None = None
        self.ledger: Ledger | None = None
        self.teacher: TeacherClient | None = None
        self.store = None
        self.traffic: TrafficLog | None = None
        # the loop's state (events.jsonl, the traffic log) stays in the first run's serve/ across reloads
        self.serve_dir = paths.stage_dir(Path(plan.cfg.run_dir), paths.SERVE_DIR)
        self.retiring: set[asyncio.Task] = set()  # route sets replaced by a reload, closing once they drain
        self.reload_stack: contextlib.ExitStack | None = None  # what the last reload started (its student)

    async def open(self) -> None:
        # No connection cap: the gateway's own admission (serve.max_concurrency) bounds what is in flight.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        self.traffic = open_traffic_log(self.cfg, self.cfg.run_dir)
        self.ledger, self.teacher, self.routes = self.build(self.plan)

    def build(self, plan: ServePlan) -> tuple[Ledger, TeacherClient, list[TaskRoute]]:
        """The live objects that serve ``plan``: its ledger, teacher client and task routes (caches, watch)."""
        cfg, s = plan.cfg, plan.cfg.serve
        ledger = Ledger(plan.ledger_path)
        # Retry and timeout knobs are not part of a request key: fewer retries here, since a client is waiting.
        tcfg = cfg.teacher.model_copy(update={"timeout_s": s.teacher_timeout_s, "max_retries": s.teacher_max_retries})
        teacher = TeacherClient(tcfg, plan.teacher_url, plan.task.schema, ledger, cfg.generate.max_attempts,
                                votes=cfg.generate.self_consistency, min_vote_share=cfg.generate.min_vote_share)
        if s.confidence == "scored":
            student = ScoredStudent(plan.student_url, plan.task, max_new_tokens=cfg.eval.max_new_tokens,
                                    timeout_s=s.student_timeout_s, session=self.session)
        else:
            student = SequenceStudent(plan.student_url, s.student_model or plan.rule.student.model, plan.task,
                                      max_new_tokens=cfg.eval.max_new_tokens, timeout_s=s.student_timeout_s,
                                      session=self.session)
        routes = [TaskRoute(cfg, plan.rule, plan.task, student, teacher, self.metrics,
                            **self._caches(plan.rule, plan))]
        reference = held_out_answers(Path(cfg.run_dir))
        for route in routes:
            route.watch = Watch(route, self.store, self.traffic, self.serve_dir, reference)
            route.watch.start()
            route.watch.refresh_metrics()
        return ledger, teacher, routes

    def _caches(self, rule: RoutingRule, plan: ServePlan | None = None) -> dict:
        """The store and the caches serve.exact_cache / serve.semantic_cache turn on, for one task's rule."""
        plan = plan or self.plan
        s = plan.cfg.serve
        if self.store is None:
            self.store = open_store(self.cfg, self.cfg.run_dir)
        base = route_digest(self.cfg, rule, plan.artifact_sha256)
        out = {"store": self.store}
        if s.exact_cache.enabled:
            out["exact"] = ExactCache(self.store, base, s.exact_cache.ttl_s, plan.task)
        if s.semantic_cache.enabled:
            threshold = load_threshold(plan.cfg, paths.stage_dir(Path(plan.cfg.run_dir), paths.SERVE_DIR))
            if threshold is None:
                log.warning("serve: semantic cache off for %s: calibrate-cache found no threshold whose false-hit "
                            "bound is within serve.semantic_cache.max_false_hit", rule.task.id)
            else:
                sc = s.semantic_cache
                out["semantic"] = SemanticCache(self.store, base, threshold, sc.ttl_s, sc.max_entries)
                log.info("serve: semantic cache on for %s at similarity >= %.3f", rule.task.id, threshold)
        return out

    async def close(self) -> None:
        for task in list(self.retiring):  # a reload's old routes: let them finish closing
            with contextlib.suppress(Exception):
                await task
        for route in self.routes:
            if route.watch is not None:
                await route.watch.close(drain_s=min(5.0, self.cfg.serve.shutdown_timeout_s))
        if self.traffic is not None:
            await asyncio.to_thread(self.traffic.close)
        if self.reload_stack is not None:
            await asyncio.to_thread(self.reload_stack.close)
        if self.teacher is not None:
            await self.teacher.close()
        if self.session is not None:
            await self.session.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.store is not None:
            self.store.close()

    def route_for(self, request: dict) -> TaskRoute | None:
        """The task a request belongs to (its model is a task alias, or its metadata names the task), or None."""
        return next((r for r in self.routes if matches(r.rule, request)), None)

    def teacher_headers(self) -> dict[str, str]:
        """Headers for a pass-through request: the teacher's key, never the client's."""
        headers = {"Content-Type": "application/json"}
        if self.teacher_key != NO_KEY:
            headers["Authorization"] = f"Bearer {self.teacher_key}"
        return headers

    async def reachable(self, url: str, headers: dict | None = None, timeout_s: float = 2.0) -> bool:
        """Whether ``GET {url}/models`` answers (any status below 500: the server is up)."""
        try:
            async with self.session.get(f"{url}/models", headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status < 500
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


def held_out_answers(run_dir: Path) -> list[dict]:
    """The student's answers on the run's held-out items (evaluate's predictions): the reference the
    answer-distribution drift test compares live answers with ([] when evaluate wrote none)."""
    from distill import runio

    path = paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS
    if not path.is_file():
        return []
    return [p["student"] for p in runio.read_jsonl(path) if isinstance(p.get("student"), dict)]
