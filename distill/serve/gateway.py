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
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from distill import DistillError, dataqa
from distill.config import Config
from distill.ledger import Ledger
from distill.routing import RoutingRule, decide, matches
from distill.serve.metrics import Metrics
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

    def __init__(self, cfg: Config, rule: RoutingRule, task: Task, student: Student, teacher: TeacherClient,
                 metrics: Metrics):
        self.cfg, self.rule, self.task = cfg, rule, task
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
            text = dataqa.redact(text)[0]
        reply: StudentReply | None = None
        if not self.rule.route.enabled:
            reason = "route_disabled"  # the student cannot keep any answer: do not wait for one
        else:
            reply, reason = await self._ask_student(text)
            if reply is not None:
                decision = decide(self.rule, request, reply.answer, reply.confidence)
                if decision.use_student:
                    return Served(200, reply.answer, "student", decision.reason, reply.confidence)
                reason = decision.reason
        confidence = reply.confidence if reply is not None else None
        answer, teacher_error = await self._ask_teacher(text)
        if answer is not None:
            return Served(200, answer, "teacher", reason, confidence)
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

    async def open(self) -> None:
        cfg, plan, s = self.cfg, self.plan, self.cfg.serve
        # No connection cap: the gateway's own admission (serve.max_concurrency) bounds what is in flight.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        self.ledger = Ledger(plan.ledger_path)
        # Retry and timeout knobs are not part of a request key: fewer retries here, since a client is waiting.
        tcfg = cfg.teacher.model_copy(update={"timeout_s": s.teacher_timeout_s, "max_retries": s.teacher_max_retries})
        self.teacher = TeacherClient(tcfg, plan.teacher_url, plan.task.schema, self.ledger, cfg.generate.max_attempts,
                                     votes=cfg.generate.self_consistency, min_vote_share=cfg.generate.min_vote_share)
        if s.confidence == "scored":
            student = ScoredStudent(plan.student_url, plan.task, max_new_tokens=cfg.eval.max_new_tokens,
                                    timeout_s=s.student_timeout_s, session=self.session)
        else:
            student = SequenceStudent(plan.student_url, s.student_model or plan.rule.student.model, plan.task,
                                      max_new_tokens=cfg.eval.max_new_tokens, timeout_s=s.student_timeout_s,
                                      session=self.session)
        self.routes = [TaskRoute(cfg, plan.rule, plan.task, student, self.teacher, self.metrics)]

    async def close(self) -> None:
        if self.teacher is not None:
            await self.teacher.close()
        if self.session is not None:
            await self.session.close()
        if self.ledger is not None:
            self.ledger.close()

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
