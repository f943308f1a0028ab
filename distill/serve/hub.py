"""The gateway's live objects: one ``ServePlan`` per run directory served, and the ``Gateway`` that holds their
task routes side by side (``python -m distill serve run_dir=A run_dir=B``: each run's task aliases on one port).

    gateway = Gateway([plan_a, plan_b])    # plans from distill.serve.command.prepare
    await gateway.open()                   # HTTP session, one ledger + teacher client per run, routes, store
    gateway.route_for(request_body)        # the TaskRoute whose rule matches, or None (pass-through)
    await gateway.close()

Each run keeps its own rule, prompts, student, ledger and teacher client; the gateway shares one HTTP session,
one metrics registry, one store (caches and counters are keyed by task) and the first run's ``serve/`` folder
(traffic log, events). Requests for any model that is not a task pass through to the first run's teacher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from distill import DistillError, paths
from distill.config import Config
from distill.ledger import Ledger
from distill.routing import RoutingRule, matches
from distill.serve.budget import DailyBudget
from distill.serve.cache import ExactCache, SemanticCache, load_threshold, route_digest
from distill.serve.gateway import TaskRoute
from distill.serve.metrics import Metrics
from distill.serve.shadow import Watch
from distill.serve.store import StoreError, open_store
from distill.serve.student import ClassifierStudent, ScoredStudent, SequenceStudent
from distill.serve.traffic import TrafficLog, open_traffic_log
from distill.task import Task
from distill.teacher.client import NO_KEY, TeacherClient, resolve_api_key

log = logging.getLogger("distill")

IN_PROCESS = "in-process"  # student_url of a plan whose student runs in the gateway (the embedding classifier)


@dataclass
class ServePlan:
    """What one run contributes to a gateway, resolved before its event loop starts (child servers already up)."""

    cfg: Config
    rule: RoutingRule
    task: Task
    student_url: str
    teacher_url: str
    ledger_path: Path
    teacher_method: str = "generate"
    artifact_sha256: str | None = None  # the served GGUF's or head's (None: a student endpoint the user runs)
    student_stack: contextlib.ExitStack | None = None  # the student runtime this plan started (a reload stops it)
    classifier: object | None = None    # the loaded EmbedClassifier when the student runs in process


class Gateway:
    """The live objects of one gateway: HTTP session, ledgers, teacher clients, task routes, metrics. Built inside
    the server's event loop (``open``) and closed when it stops (``close``)."""

    def __init__(self, plans: "ServePlan | list[ServePlan]"):
        self.plans = list(plans) if isinstance(plans, (list, tuple)) else [plans]
        self.plan = self.plans[0]  # the pass-through teacher, the loop's folder; what a reload replaces
        self.cfg = self.plan.cfg
        self.metrics = Metrics()
        self.routes: list[TaskRoute] = []
        self.teacher_key = resolve_api_key(self.plan.cfg.teacher)
        self.session: aiohttp.ClientSession | None = None
        self.ledger: Ledger | None = None
        self.teacher: TeacherClient | None = None
        self.others: list[tuple[Ledger, TeacherClient]] = []  # the other runs' ledgers and teacher clients
        self.store = None
        self.traffic: TrafficLog | None = None
        self.budget: DailyBudget | None = None
        # the loop's state (events.jsonl, the traffic log) stays in the first run's serve/ across reloads
        self.serve_dir = paths.stage_dir(Path(self.plan.cfg.run_dir), paths.SERVE_DIR)
        self.retiring: set[asyncio.Task] = set()  # route sets replaced by a reload, closing once they drain
        self.reload_stack: contextlib.ExitStack | None = None  # what the last reload started (its student)
        self.metrics.budget_cap.set(-1 if self.cfg.serve.teacher_budget_usd_per_day is None
                                    else self.cfg.serve.teacher_budget_usd_per_day)

    async def open(self) -> None:
        # No connection cap: the gateway's own admission (serve.max_concurrency) bounds what is in flight.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        self.traffic = open_traffic_log(self.cfg, self.cfg.run_dir)
        built = [self.build(plan) for plan in self.plans]
        self.ledger, self.teacher, self.routes = built[0]
        for ledger, teacher, routes in built[1:]:
            self.others.append((ledger, teacher))
            self.routes = self.routes + routes

    def build(self, plan: ServePlan) -> tuple[Ledger, TeacherClient, list[TaskRoute]]:
        """The live objects that serve ``plan``: its ledger, teacher client and task routes (caches, watch)."""
        cfg, s = plan.cfg, plan.cfg.serve
        ledger = Ledger(plan.ledger_path)
        # Retry and timeout knobs are not part of a request key: fewer retries here, since a client is waiting.
        tcfg = cfg.teacher.model_copy(update={"timeout_s": s.teacher_timeout_s, "max_retries": s.teacher_max_retries,
                                              "max_wait_s": s.teacher_max_wait_s})
        teacher = TeacherClient(tcfg, plan.teacher_url, plan.task.schema, ledger, cfg.generate.max_attempts,
                                votes=cfg.generate.self_consistency, min_vote_share=cfg.generate.min_vote_share)
        if plan.classifier is not None:
            student = ClassifierStudent(plan.classifier, plan.task)
        elif s.confidence == "scored":
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
        """The store, the day's teacher budget and the caches serve.exact_cache / serve.semantic_cache turn on."""
        plan = plan or self.plan
        s = plan.cfg.serve
        if self.store is None:
            self.store = open_store(self.cfg, self.cfg.run_dir)
            self.budget = DailyBudget(self.store, s.teacher_budget_usd_per_day)
        base = route_digest(plan.cfg, rule, plan.artifact_sha256)
        out = {"store": self.store, "budget": self.budget}
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
        for ledger, teacher in [(self.ledger, self.teacher), *self.others]:
            if teacher is not None:
                await teacher.close()
            if ledger is not None:
                ledger.close()
        if self.session is not None:
            await self.session.close()
        if self.store is not None:
            self.store.close()

    def route_for(self, request: dict) -> TaskRoute | None:
        """The task a request belongs to (its model is a task alias, or its metadata names the task), or None."""
        return next((r for r in self.routes if matches(r.rule, request)), None)

    def refresh_store_metrics(self) -> None:
        """Gauges read from the store at scrape time: cache lookups and the day's teacher spend (every replica)."""
        if self.store is None:
            return
        try:
            self.metrics.cache_counts(self.store.counters("cache."))
        except StoreError as exc:
            log.warning("serve: cache counts not read: %s", exc)
        if self.budget is not None:
            self.metrics.budget_spent.set(self.budget.spent_today())

    def teacher_headers(self) -> dict[str, str]:
        """Headers for a pass-through request: the teacher's key, never the client's."""
        headers = {"Content-Type": "application/json"}
        if self.teacher_key != NO_KEY:
            headers["Authorization"] = f"Bearer {self.teacher_key}"
        return headers

    async def students_reachable(self) -> bool:
        """Whether every served student answers (an in-process one always does)."""
        urls = {p.student_url for p in self.plans if p.student_url != IN_PROCESS}
        found = await asyncio.gather(*(self.reachable(u, timeout_s=1.0) for u in urls))
        return all(found)

    async def reachable(self, url: str, headers: dict | None = None, timeout_s: float = 2.0) -> bool:
        """Whether ``GET {url}/models`` answers (any status below 500: the server is up)."""
        try:
            async with self.session.get(f"{url}/models", headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status < 500
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


def check_aliases(plans: list[ServePlan]) -> None:
    """Refuse two runs answering the same model alias or task: a request must name one task."""
    seen: dict[str, str] = {}
    for plan in plans:
        rule = plan.rule
        for name in {rule.task.id, *rule.task.match.model_aliases}:
            if name in seen and seen[name] != str(plan.cfg.run_dir):
                raise DistillError(f"run_dir={seen[name]} and run_dir={plan.cfg.run_dir} both serve the model "
                                   f"{name!r}; serve runs of different tasks side by side (or one of them)")
            seen[name] = str(plan.cfg.run_dir)


def held_out_answers(run_dir: Path) -> list[dict]:
    """The student's answers on the run's held-out items (evaluate's predictions): the reference the
    answer-distribution drift test compares live answers with ([] when evaluate wrote none)."""
    from distill import runio

    path = paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS
    if not path.is_file():
        return []
    return [p["student"] for p in runio.read_jsonl(path) if isinstance(p.get("student"), dict)]
