"""Watching a served task: the traffic log record, shadow calls to the teacher, live agreement, and drift.

    watch = Watch(route, store, traffic, serve_dir, reference)   # one per TaskRoute; Gateway.open builds it
    watch.start()                                              # shadow workers on the server's event loop
    watch.observe(text, served)                                # after each reply: never waits for the teacher
    python -m distill status run_dir=DIR                       # live agreement, shadow counts, alarms, traffic

**Shadow traffic.** ``serve.shadow_rate`` of the answers the student kept are queued (``serve.shadow_queue``; a full
queue drops and counts, ``distill_shadow_dropped{why="queue_full"}``) and sent to the teacher by
``serve.shadow_concurrency`` background workers through the route's own ``TeacherClient``: the same ledger and
request key as a fallback, so an input generate already labelled costs nothing and a re-distillation from traffic
finds every shadow answer paid for. The reply has already gone when a shadow call starts. Its own budget,
``serve.shadow_budget_usd_per_day`` (UTC days, counted in the store so replicas share it): once the day's spend
reaches it, shadow requests are dropped (``why="budget"``) until the next day; the calls in flight at that moment
(at most ``serve.shadow_concurrency``) may pass it by one call each.

**Live agreement.** Each comparison (the student's kept answer vs the teacher's, field by field and whole) adds to
counters in the store (``shadow.<task>.<rule>.*``, summed over replicas; ``<rule>`` is the routing rule's results
sha256, so a reload starts a new series) and to the drift detectors (``distill.serve.drift``). ``/metrics`` shows
the value and its 95% Wilson interval per field. With ``serve.on_drift=fallback`` the task's answers go to the
teacher while an alarm is active; the student is still asked, so each of those requests is a free comparison and
the alarm clears on its own once agreement is back.

**Input drift** (``serve.drift.inputs``): each input goes to ``distill.serve.drift.InputWatch``, which only
appends it to a list on the request path and embeds in the background.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill import DistillError
from distill.data import pii
from distill.serve.drift import AgreementDrift, AnswerDrift, InputWatch, append_event, wilson
from distill.serve.store import Store, StoreError
from distill.serve.traffic import TrafficLog

if TYPE_CHECKING:
    from distill.serve.gateway import Served, TaskRoute

log = logging.getLogger("distill")

ALL = "_all"          # the whole answer (every field equal)
INTERVAL = 0.975      # one-sided level of each Wilson bound: a 95% interval


def rule_version(rule) -> str:
    """The short id of a routing rule's evidence (its results.json sha256), naming its shadow series."""
    sha = getattr(getattr(rule, "evidence", None), "results_sha256", None)
    return (sha or "unversioned")[:12]


def live_agreement(store: Store, task: str, version: str, fields: list[str]) -> dict[str, dict]:
    """``{field: {"value", "low", "high", "n"}}`` (and ``_all``) from the store's shadow counters; {} before any."""
    prefix = f"shadow.{task}.{version}."
    counters = store.counters(prefix)
    n = counters.get(f"{prefix}n", 0.0)
    if not n:
        return {}
    out = {}
    for field in [ALL, *fields]:
        agree = counters.get(f"{prefix}agree.{field}", 0.0)
        low, high = wilson(agree, n, INTERVAL)
        out[field] = {"value": agree / n, "low": low, "high": high, "n": int(n)}
    return out


class Watch:
    """Traffic record, shadow sampling, live agreement and drift for one TaskRoute (module docstring)."""

    def __init__(self, route: "TaskRoute", store: Store | None, traffic: TrafficLog | None, serve_dir: Path,
                 reference: list[dict], *, rng: random.Random | None = None):
        cfg = route.cfg
        s, d = cfg.serve, cfg.serve.drift
        self.route, self.store, self.traffic, self.serve_dir = route, store, traffic, serve_dir
        self.task, self.name = route.task, route.name
        self.fields = list(route.task.schema.fields)
        self.version = rule_version(route.rule)
        self.rate, self.budget = s.shadow_rate, s.shadow_budget_usd_per_day
        self.fallback_on_drift = s.on_drift == "fallback"
        self.redact = cfg.generate.redact_pii
        self.rng = rng or random.Random()
        self.queue: asyncio.Queue | None = None
        self.workers: list[asyncio.Task] = []
        self.queue_size, self.concurrency = s.shadow_queue, s.shadow_concurrency
        self.agreement = AgreementDrift(route.rule.route.target_agreement, d.margin, delta=d.delta,
                                        confidence=d.confidence, min_samples=d.min_samples)
        self.answers = None
        if len(reference) >= d.min_val_items:
            self.answers = AnswerDrift(reference, route.task.schema.enums, window=d.answer_window,
                                       p_value=d.answer_p_value)
        elif route.task.schema.enums:
            log.info("serve: no answer-distribution drift test for %s: %d held-out predictions, fewer than "
                     "serve.drift.min_val_items=%d", self.name, len(reference), d.min_val_items)
        self.in_shadow = 0
        self.inputs = InputWatch(Path(cfg.run_dir), serve_dir, self.name, d.input_window, d.input_p_value,
                                 d.min_val_items, on_change=self._change) if d.inputs else None
        for kind in ("agreement", "answers", *(("inputs",) if self.inputs else ())):
            route.metrics.drift_active.labels(self.name, kind).set(0)

    # -- the request path: nothing here waits --------------------------------------------------------------------

    def drifted(self) -> bool:
        """Whether the task's answers go to the teacher now (``serve.on_drift=fallback`` and an active alarm)."""
        return self.fallback_on_drift and (self.agreement.active or bool(self.answers and self.answers.active)
                                           or bool(self.inputs and self.inputs.active))

    def observe(self, text: str, served: "Served", started: float | None = None) -> None:
        """After a reply: the traffic record, the answer-distribution test, a comparison or a shadow request."""
        now = time.time()
        record = {"id": uuid.uuid4().hex, "ts": round(started or now, 3), "answered_ts": round(now, 3),
                  "task": self.name, "input": text, "route": served.route, "reason": served.reason,
                  "confidence": served.confidence, "status": served.status,
                  "student": served.answer if served.route == "student" else served.student_answer,
                  "teacher": served.answer if served.route == "teacher" else None,
                  "teacher_source": "fallback" if served.route == "teacher" and served.answer is not None else None,
                  "cache": served.cache, "rule": self.version}
        if served.cache is None and self.answers is not None:
            self._change("answers", self.answers.update(record["student"]), self.answers.detail)
        if self.inputs is not None:
            self.inputs.offer(text)
        if served.route == "teacher" and served.reason == "drift" and served.student_answer is not None:
            self._compare(served.student_answer, served.answer)  # a free comparison while the alarm holds
        elif served.route == "student" and served.cache is None and self.rate and self.rng.random() < self.rate:
            if self._offer(text, served.answer, record):
                return  # the shadow worker writes the record, with the teacher's answer
        self._record(record)

    def _offer(self, text: str, student: dict, record: dict) -> bool:
        if self.queue is None:
            return False
        try:
            self.queue.put_nowait((text, student, record))
        except asyncio.QueueFull:
            self.route.metrics.shadow_dropped.labels(self.name, "queue_full").inc()
            return False
        return True

    def _record(self, record: dict) -> None:
        if self.traffic is not None:
            self.traffic.record(record)

    # -- background ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the shadow workers on the running event loop (no-op with ``serve.shadow_rate=0``)."""
        if self.rate and self.queue is None:
            self.queue = asyncio.Queue(self.queue_size)
            self.workers = [asyncio.create_task(self._work(), name=f"distill-shadow-{i}")
                            for i in range(self.concurrency)]
        if self.inputs is not None:
            self.inputs.start()

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop the workers (after up to ``drain_s`` for queued shadow calls); unsent records are still logged."""
        if self.queue is not None and drain_s:
            deadline = time.monotonic() + drain_s
            while (not self.queue.empty() or self.in_shadow) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []
        if self.inputs is not None:
            await self.inputs.close()
        while self.queue is not None and not self.queue.empty():
            self._record(self.queue.get_nowait()[2])

    async def _work(self) -> None:
        while True:
            text, student, record = await self.queue.get()
            self.in_shadow += 1
            try:
                await self._shadow(text, student, record)
            except asyncio.CancelledError:
                self._record(record)
                raise
            except Exception as exc:  # a shadow call must never take a worker down
                log.warning("serve: a shadow call for %s failed: %s", self.name, self.route.teacher.scrub(str(exc)))
                self._record(record)
            finally:
                self.in_shadow -= 1

    async def _shadow(self, text: str, student: dict, record: dict) -> None:
        metrics, day = self.route.metrics, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        spend_key = f"shadow.{self.name}.spend.{day}"
        if self.budget is not None and self._counter(spend_key) >= self.budget:
            metrics.shadow_dropped.labels(self.name, "budget").inc()
            self._record(record)
            return
        teacher_text = pii.redact(text)[0] if self.redact else text
        try:
            outcome = await self.route.teacher.label(self.task.teacher_messages(teacher_text))
        except DistillError as exc:
            self.route.teacher.fatal = False  # a gateway keeps serving after a refused call
            log.error("serve: the teacher refused a shadow call for %s: %s", self.name,
                      self.route.teacher.scrub(str(exc)))
            metrics.shadow_calls.labels(self.name, "failed").inc()
            self._record(record)
            return
        if outcome.cost_usd:
            metrics.shadow_spend.labels(self.name).inc(outcome.cost_usd)
            self._incr(spend_key, outcome.cost_usd)
        if outcome.answer is None:
            metrics.shadow_calls.labels(self.name, "failed").inc()
            self._record(record)
            return
        metrics.shadow_calls.labels(self.name, "ledger" if outcome.cache_hit and not outcome.paid_calls
                                    else "paid").inc()
        self._record({**record, "teacher": outcome.answer, "teacher_source": "shadow"})
        self._compare(student, outcome.answer)

    # -- statistics ----------------------------------------------------------------------------------------------

    def _compare(self, student: dict, teacher: dict) -> None:
        prefix = f"shadow.{self.name}.{self.version}."
        same = {f: student.get(f) == teacher.get(f) for f in self.fields}
        self._incr(f"{prefix}n", 1)
        self._incr(f"{prefix}agree.{ALL}", float(all(same.values())))
        for field, equal in same.items():
            self._incr(f"{prefix}agree.{field}", float(equal))
        self._change("agreement", self.agreement.update(all(same.values())), self.agreement.detail)
        self.refresh_metrics()

    def refresh_metrics(self) -> None:
        """The live-agreement gauges from the store's counters (every replica's comparisons)."""
        if self.store is None:
            return
        try:
            stats = live_agreement(self.store, self.name, self.version, self.fields)
        except StoreError as exc:
            log.warning("serve: live agreement not read: %s", exc)
            return
        for field, st in stats.items():
            for bound in ("value", "low", "high"):
                self.route.metrics.agreement.labels(self.name, field, bound).set(st[bound])
        if stats:
            self.route.metrics.comparisons.labels(self.name).set(stats[ALL]["n"])

    def _change(self, kind: str, change: str | None, detail) -> None:
        if change is None:
            return
        info = detail()
        metrics = self.route.metrics
        if change == "alarm":
            metrics.drift_alarms.labels(self.name, kind).inc()
            metrics.drift_active.labels(self.name, kind).set(1)
            log.warning("serve: drift alarm (%s) on %s: %s%s", kind, self.name, _describe(info),
                        "; its requests go to the teacher until it clears" if self.fallback_on_drift else "")
        else:
            metrics.drift_active.labels(self.name, kind).set(0)
            log.info("serve: drift alarm (%s) on %s cleared: %s", kind, self.name, _describe(info))
        try:
            append_event(self.serve_dir, f"drift_{change}", task=self.name, kind=kind, rule=self.version,
                         on_drift="fallback" if self.fallback_on_drift else "alarm", **info)
        except OSError as exc:
            log.warning("serve: could not write %s: %s", self.serve_dir / "events.jsonl", exc)

    def _incr(self, name: str, n: float) -> None:
        if self.store is not None:
            try:
                self.store.incr(name, n)
            except StoreError as exc:
                log.warning("serve: shadow counter %s not written: %s", name, exc)

    def _counter(self, name: str) -> float:
        if self.store is None:
            return 0.0
        try:
            return self.store.counters(name).get(name, 0.0)
        except StoreError:
            return 0.0


def _describe(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items())


def status_text(cfg) -> str:
    """``python -m distill status run_dir=DIR``: what the gateway over DIR has seen, from its store, traffic log
    and events (a gateway need not be running): live agreement per field with its interval, shadow counts, drift
    alarms of the rule published now, and the traffic log's routes."""
    from collections import Counter as Tally

    from distill import paths
    from distill.metrics.stats import format_interval
    from distill.routing import load_rule
    from distill.serve.drift import read_events
    from distill.serve.store import open_store
    from distill.serve.traffic import read_traffic, traffic_path
    from distill.task import Task

    run_dir = Path(cfg.run_dir)
    rule = load_rule(paths.stage_dir(run_dir, "publish") / paths.ROUTING)
    task, version, d = rule.task.id, rule_version(rule), cfg.serve.drift
    route = (f"enabled at confidence >= {rule.route.confidence_threshold}" if rule.route.enabled else "disabled")
    lines = [f"task {task}: rule {version}, route {route}, target agreement {rule.route.target_agreement:.1%} "
             f"(drift alarm below {rule.route.target_agreement - d.margin:.1%})"]
    rows = read_traffic(cfg, run_dir)
    routes = Tally(r.get("route") if not r.get("cache") else "cache" for r in rows)
    lines.append(f"traffic: {len(rows)} requests logged in {traffic_path(cfg, run_dir)}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in routes.most_common())})" if rows else ""))
    store = open_store(cfg, run_dir)
    try:
        stats = live_agreement(store, task, version, list(Task(cfg).schema.fields))
        counters = store.counters(f"shadow.{task}.spend.")
    finally:
        store.close()
    if not stats:
        lines.append("live agreement: no shadow comparisons yet for this rule (serve.shadow_rate > 0 sends the "
                     "student's kept answers to the teacher too)")
    else:
        lines.append(f"live agreement: {format_interval(stats[ALL])} over {stats[ALL]['n']} shadow comparisons "
                     f"(95% interval)")
        lines += [f"  {field:<20s} {format_interval(st)}" for field, st in stats.items() if field != ALL]
    if counters:
        today = max(counters)
        lines.append(f"shadow spend {today.rsplit('.', 1)[-1]}: ${counters[today]:.4f}")
    state: dict[str, dict] = {}
    for event in read_events(paths.stage_dir(run_dir, paths.SERVE_DIR)):
        if event.get("event") in ("drift_alarm", "drift_cleared") and event.get("rule") == version:
            state[event.get("kind", "?")] = event
    active = [e for e in state.values() if e["event"] == "drift_alarm"]
    if not active:
        lines.append("drift: no active alarm")
    for e in active:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        detail = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "event", "task", "kind", "rule"))
        lines.append(f"drift: {e['kind']} alarm active since {when} ({detail})")
    return "\n".join(lines)
