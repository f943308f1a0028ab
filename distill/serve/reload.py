"""Swapping a newly published run into a running gateway without failing a request.

    curl -X POST 127.0.0.1:8088/admin/reload                                   # the same run_dir, re-published
    curl -X POST 127.0.0.1:8088/admin/reload -d '{"run_dir": "runs/support_tickets/NEW"}'
    python -m distill serve run_dir=DIR serve.watch_interval_s=2               # and on its own, by file watch

**File watch** (``serve.watch_interval_s``, default 2 s; null turns it off): the gateway stats the served run's
``publish/DONE.json`` and ``publish/routing.yaml`` every interval (two ``stat`` calls, no thread, no watcher
library: inotify would lose a folder that publish swaps in whole). When either changed (modification time, size or
inode), it waits until they read the same at the next poll and ``DONE.json`` is there (publish writes it last), then
reloads as ``POST /admin/reload`` does, under the same lock, so the two never run at once. A reload that fails is
logged, counted and recorded like a refused request, and the watch waits for the next change. It follows the run
served now: after ``POST /admin/reload`` onto another directory it watches that one.

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
import os
import time
import weakref
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


_LOCKS: "weakref.WeakKeyDictionary[Gateway, asyncio.Lock]" = weakref.WeakKeyDictionary()


class Reloader:
    """One reload at a time for a gateway (a second while one runs is refused): every Reloader of one gateway
    (the admin route's, the file watch's) holds the same lock."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.lock = _LOCKS.setdefault(gateway, asyncio.Lock())

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    async def reload(self, run_dir: str | None = None, via: str = "request") -> dict:
        """Load ``run_dir`` (default: the run being served) and swap it in. Returns what is served now;
        ``via`` (request | watch) is recorded in the reload event.

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
                    routes[0].watch else None, "took_s": round(took, 3), "via": via}
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


# -- file watch ---------------------------------------------------------------------------------------------------


def publish_stamp(run_dir: Path) -> tuple:
    """(mtime_ns, size, inode) of ``publish/DONE.json`` and ``publish/routing.yaml`` (None for a missing one)."""
    publish = paths.stage_dir(Path(run_dir), "publish")
    out = []
    for name in (paths.DONE, paths.ROUTING):
        try:
            st = os.stat(publish / name)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


async def watch_publish(gateway: Gateway, interval_s: float) -> None:
    """Reload the gateway whenever the served run is published again (module docstring); runs until cancelled."""
    reloader = Reloader(gateway)
    if len(gateway.plans) > 1:
        log.info("serve: no file watch: this gateway serves %d runs, and reload swaps one", len(gateway.plans))
        return
    run_dir = Path(gateway.cfg.run_dir)
    served = publish_stamp(run_dir)
    seen = served
    while True:
        await asyncio.sleep(interval_s)
        if Path(gateway.cfg.run_dir) != run_dir:  # a POST /admin/reload moved the gateway to another run
            run_dir = Path(gateway.cfg.run_dir)
            served = seen = publish_stamp(run_dir)
            continue
        now = publish_stamp(run_dir)
        settled, seen = now == seen, now
        if now == served or not settled or now[0] is None or reloader.busy:
            continue  # unchanged, still being written, DONE.json not there yet, or a reload is running
        served = now
        try:
            await reloader.reload(str(run_dir), via="watch")
        except DistillError as exc:
            gateway.metrics.reloads.labels("failed").inc()
            log.error("serve: %s was published again but the reload failed, the current run keeps serving: %s",
                      run_dir, exc)
            with contextlib.suppress(OSError):
                append_event(gateway.serve_dir, "reload_failed", run_dir=str(run_dir), via="watch", error=str(exc))
        except Exception as exc:  # the watch must outlive any one failure
            gateway.metrics.reloads.labels("failed").inc()
            log.exception("serve: the file-watch reload of %s failed: %s", run_dir, exc)


def with_file_watch(app, cfg: Config):
    """``app`` whose lifespan also runs ``watch_publish`` once the gateway is open (``serve.watch_interval_s``;
    null: ``app`` unchanged). Returns the app."""
    interval = cfg.serve.watch_interval_s
    if interval is None:
        return app
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            task = asyncio.create_task(watch_publish(a.state.gateway, interval), name="distill-publish-watch")
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
    return app
