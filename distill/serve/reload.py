"""Swapping a newly published run into a running gateway without failing a request.

    curl -X POST 127.0.0.1:8088/admin/reload                                   # the same run_dir, re-published
    curl -X POST 127.0.0.1:8088/admin/reload -d '{"run_dir": "runs/support_tickets/NEW"}'

Order: the new run's config (its own config.yaml with the gateway's ``serve`` settings), its routing rule and task
checked as at start-up, its student started (a new runtime on the new GGUF, or the same ``serve.student_endpoint``),
its ledger and teacher client opened (the gateway's teacher endpoint is kept), caches and watch built. Only then is
the gateway's route set replaced, by plain assignments with no ``await`` between them, so every request runs
wholly on the old set or wholly on the new one. A request in flight keeps the route object it started with; the
old set is closed (shadow queue drained, teacher client and ledger closed, its student runtime stopped) once its
last request has left, or after ``serve.shutdown_timeout_s``. Anything that fails before the swap leaves the old
set serving and is answered with the reason. Each reload is one ``reload`` event in ``serve/events.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import yaml

from distill import DistillError, paths
from distill.config import Config, validate
from distill.serve.drift import append_event
from distill.serve.gateway import TaskRoute
from distill.serve.hub import Gateway, ServePlan
from distill.teacher.client import TeacherClient

log = logging.getLogger("distill")


def reload_config(current: Config, run_dir: str | Path) -> Config:
    """The config of ``run_dir`` (its config.yaml) with the running gateway's ``serve`` settings.

    Raises DistillError for a folder that is not a run or a config that no longer validates."""
    run_dir = Path(run_dir).expanduser()
    saved = run_dir / paths.CONFIG_YAML
    if not saved.is_file():
        raise DistillError(f"{saved} does not exist: reload needs a run directory made by `python -m distill run`")
    data = yaml.safe_load(saved.read_text(encoding="utf-8"))
    data["serve"] = current.serve.model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    return validate(data)


class Reloader:
    """One reload at a time for a gateway (a second while one runs is refused)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    async def reload(self, run_dir: str | None = None) -> dict:
        """Load ``run_dir`` (default: the run being served) and swap it in. Returns what is served now.

        Raises DistillError (nothing swapped) when the run cannot be served."""
        from distill.serve.command import open_plan  # command imports the app, which imports this module

        gw = self.gateway
        if len(gw.plans) > 1:
            raise DistillError(f"reload swaps one run; this gateway serves {len(gw.plans)} "
                               f"({', '.join(str(p.cfg.run_dir) for p in gw.plans)}): restart it to change them")
        async with self.lock:
            target = run_dir or str(gw.cfg.run_dir)
            started = time.perf_counter()
            cfg = await asyncio.to_thread(reload_config, gw.cfg, target)
            stack = contextlib.ExitStack()
            try:
                plan = await asyncio.to_thread(open_plan, cfg, stack, gw.plan.teacher_url)
                ledger, teacher, routes = gw.build(plan)
            except BaseException:
                await asyncio.to_thread(stack.close)
                raise
            old = (gw.plan, gw.ledger, gw.teacher, gw.routes, gw.reload_stack)
            # the swap: no await between these lines
            gw.plan, gw.cfg, gw.ledger, gw.teacher, gw.routes = plan, cfg, ledger, teacher, routes
            gw.plans = [plan]
            gw.reload_stack = stack
            took = time.perf_counter() - started
            rule = plan.rule
            info = {"run_dir": str(cfg.run_dir), "task": rule.task.id, "route_enabled": rule.route.enabled,
                    "threshold": rule.route.confidence_threshold, "rule": routes[0].watch.version if routes and
                    routes[0].watch else None, "took_s": round(took, 3)}
            retire = asyncio.create_task(_retire(*old, timeout_s=cfg.serve.shutdown_timeout_s))
            gw.retiring.add(retire)
            retire.add_done_callback(gw.retiring.discard)
            gw.metrics.reloads.labels("ok").inc()
            log.info("serve: reloaded %s (task %s, route %s) in %.2f s", info["run_dir"], info["task"],
                     "enabled" if rule.route.enabled else "disabled", took)
            with contextlib.suppress(OSError):
                append_event(gw.serve_dir, "reload", **info)
            return info


async def _retire(plan: ServePlan, ledger, teacher: TeacherClient, routes: list[TaskRoute],
                  stack: contextlib.ExitStack | None, *, timeout_s: float) -> None:
    """Close a replaced route set once its requests have left (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while any(r.in_flight for r in routes) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for route in routes:
        if route.watch is not None:
            await route.watch.close(drain_s=min(5.0, timeout_s))
    try:
        await teacher.close()
    finally:
        ledger.close()
        student_stack = plan.student_stack
        if student_stack is not None:
            await asyncio.to_thread(student_stack.close)  # the old student runtime, when this plan started one
        if stack is not None:
            await asyncio.to_thread(stack.close)
