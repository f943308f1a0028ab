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

import logging
from dataclasses import dataclass

from distill import DistillError
from distill.data import pii
from distill.config import Config
from distill.ledger import request_key
from distill.routing import RoutingRule, decide
from distill.serve.budget import DailyBudget
from distill.serve.cache import ExactCache, SemanticCache
from distill.serve.metrics import Metrics
from distill.serve.shadow import Watch
from distill.serve.store import StoreError
from distill.serve.student import Breaker, Student, StudentFailed, StudentReply
from distill.task import Task
from distill.teacher.client import BUDGET, TeacherClient

log = logging.getLogger("distill")

# Teacher failures that mean "it did not answer" (the request may be sent again later) rather than a bad answer.
TEACHER_DOWN = frozenset({"connection_error", "timeout", "malformed_response", "retry_after_too_long",
                          "max_billed_attempts", "unreadable_response", "teacher_refused"})
# ... of them, those where the teacher asked for a wait (Retry-After): the client gets 503 with it
RATE_LIMITED = frozenset({"retry_after_too_long", "http_429", "http_503"})


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
    retry_after_s: float | None = None  # a teacher that refused for now: when the client may try again (Retry-After)


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
                 store=None, budget: DailyBudget | None = None):
        self.cfg, self.rule, self.task = cfg, rule, task
        self.exact, self.semantic, self.store, self.budget = exact, semantic, store, budget
        # what one task request costs on the teacher, as the run's cost case priced it (results.json cost)
        per_1k = rule.cost.teacher_usd_per_1k
        self.teacher_price = per_1k / 1000 if per_1k is not None else None
        self.student, self.teacher, self.metrics = student, teacher, metrics
        self.name = rule.task.id
        self.breaker = Breaker(cfg.serve.breaker_failures, cfg.serve.breaker_cooldown_s)
        self.in_flight = 0
        self.max_in_flight = cfg.serve.max_concurrency
        self.redact = cfg.generate.redact_pii
        # the series every request touches, bound once (Metrics.request_done says why)
        self._in_flight_gauge = metrics.in_flight.labels(self.name)
        self._student_up = metrics.student_up.labels(self.name)
        self._student_up.set(1)
        if self.teacher_price is not None:
            self.metrics.teacher_price.labels(self.name).set(self.teacher_price)

    @property
    def aliases(self) -> list[str]:
        return list(self.rule.task.match.model_aliases) or [self.name]

    def try_enter(self) -> bool:
        """Admit one more request unless ``serve.max_concurrency`` are in flight (the caller answers 429)."""
        if self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        self._in_flight_gauge.set(self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self._in_flight_gauge.set(self.in_flight)

    async def handle(self, request: dict, text: str) -> Served:
        """Answer one task request (``text`` is the user message: the task input). Never raises for a student or
        teacher failure: those are a fallback or an error status in ``Served``."""
        if self.redact:
            text = pii.redact(text)[0]
        key = None
        if self.exact is not None:
            key = self.exact.key(request, text)
            hit = self._cache_op(self.exact.get, key)
            if hit is not None and hit["route"] == "student" and self.watch and self.watch.drifted():
                hit = None  # serve.on_drift=fallback while a drift alarm holds: no kept student answer, cached or not
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
                # the student client validated the answer against the same schema (None when it failed; open_plan
                # refuses a recipe whose schema differs from the rule's): decide does not validate it again
                decision = decide(self.rule, request, reply.answer, reply.confidence, checked=True)
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
        answer, teacher_error, retry_after = await self._ask_teacher(text)
        if answer is not None:
            if vector is not None:
                self._cache_op(self.semantic.add, vector, answer)
            return Served(200, answer, "teacher", reason, confidence, student_answer=reply and reply.answer)
        if self.cfg.serve.on_teacher_down == "student":
            if reply is None and reason == "route_disabled":
                reply, _ = await self._ask_student(text)
            if reply is not None and reply.answer is not None:
                return Served(200, reply.answer, "student", "teacher_budget" if teacher_error == BUDGET
                              else "teacher_down", reply.confidence, teacher_error=teacher_error)
        if teacher_error == BUDGET:
            cap = self.cfg.serve.teacher_budget_usd_per_day
            return Served(503, None, "none", reason, confidence, f"the gateway's teacher budget for today is spent "
                          f"(serve.teacher_budget_usd_per_day={cap}); the request was not served. It resets at 00:00 "
                          f"UTC; raise the cap, or set serve.on_teacher_down=student to serve the student's answer",
                          "teacher_budget", teacher_error)
        if reason == "input_too_long" and teacher_error == "http_400":
            return Served(400, None, "none", reason, confidence, "the task input is too long: it does not fit the "
                          "student's context, and the teacher refused it too (http_400); send a shorter input",
                          "context_length_exceeded", teacher_error)
        if retry_after is not None and teacher_error in RATE_LIMITED:
            # the teacher asked for a wait longer than serve.teacher_max_wait_s (or its retries ran out): the client
            # hears it at once, with the wait, instead of being held for it
            return Served(503, None, "none", reason, confidence, f"the teacher is rate-limited ({teacher_error}) and "
                          f"asked to wait {retry_after:.0f} s; the request was not served: retry after the "
                          f"Retry-After", "teacher_rate_limited", teacher_error,
                          retry_after_s=retry_after)
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
            if exc.kind == "input_too_long":  # this input's problem: the runtime is well, so no breaker count
                self.breaker.release()
                self.metrics.student_errors.labels(self.name, exc.kind).inc()
                return None, "input_too_long"
            self.breaker.failure()
            self.metrics.student_errors.labels(self.name, exc.kind).inc()
            if self.breaker.state != "closed":
                self._student_up.set(0)
                log.warning("serve: student for %s failed (%s); circuit open for %.0f s, the teacher answers",
                            self.name, exc.kind, self.breaker.cooldown_s)
            return None, "student_error"
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        self._student_up.set(1)
        return reply, "answered"

    async def _ask_teacher(self, text: str) -> tuple[dict | None, str | None, float | None]:
        """(answer, None, None) or (None, why the teacher failed, the Retry-After it gave if any), through the
        ledger and the day's budget."""
        messages = self.task.teacher_messages(text)
        hold, bound, refused = None, None, False
        capped = self.budget is not None and self.budget.cap is not None
        if capped:
            # admitted at its upper bound: every vote, every attempt (pricing.upper_bound_usd). Without a cap there
            # is nothing to admit against: the spend is counted when the call settles (one store write, or none
            # for a free call, instead of a reservation and its settlement on every fallback).
            bound = self._bound(messages)
            hold = self.budget.reserve(bound)
            if hold is None and not self._in_ledger(messages):
                self.metrics.teacher_calls.labels(self.name, "budget").inc()
                return None, BUDGET, None
        outcome = None
        try:
            outcome = await self.teacher.label(messages)
        except DistillError as exc:
            # 401/403/404 end a generate run; a gateway keeps serving and tries again on the next request.
            self.teacher.fatal = False
            refused = True  # refused (401/403/404): not billed
            log.error("serve: the teacher refused a fallback for %s: %s", self.name, self.teacher.scrub(str(exc)))
            self.metrics.teacher_calls.labels(self.name, "failed").inc()
            return None, "teacher_refused", None
        finally:
            if self.budget is not None:  # a call that raised may have been billed: it keeps its bound
                if outcome is not None:
                    spent = outcome.cost_usd
                elif refused:
                    spent = 0.0
                else:
                    spent = bound if bound is not None else self._bound(messages)
                self.budget.settle(hold, spent)
        if outcome.cost_usd:
            self.metrics.teacher_spend.labels(self.name).inc(outcome.cost_usd)
        if outcome.answer is None:
            self.metrics.teacher_calls.labels(self.name, "failed").inc()
            return None, outcome.reason or "no_answer", outcome.retry_after_s
        self.metrics.teacher_calls.labels(self.name, "ledger" if outcome.cache_hit and not outcome.paid_calls
                                          else "paid").inc()
        return outcome.answer, None, None

    def _bound(self, messages: list[dict]) -> float:
        """The most one fallback for ``messages`` can cost: every vote, every attempt at its upper-bound price."""
        return (self.teacher.estimate(self.teacher.build_request(messages, 0)) * self.teacher.votes
                * self.teacher.max_attempts)

    def _in_ledger(self, messages: list[dict]) -> bool:
        """Whether the ledger already answers this input (free, whatever the day's budget); one vote only."""
        if self.teacher.votes != 1:
            return False
        return self.teacher.ledger.get(request_key(self.teacher.build_request(messages, 0))) is not None
