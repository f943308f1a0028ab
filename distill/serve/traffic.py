"""The gateway's traffic log: one record per task request, written off the request path in batches.

    log = open_traffic_log(cfg, run_dir)          # serve/traffic.sqlite (WAL), or the shared store with serve.store=redis
    log.record({"task": ..., "input": ..., "route": "student", ...})   # returns at once: appended to a list
    log.flush(); log.close()
    rows = read_traffic(cfg, run_dir)              # [record, ...] oldest first (status, re-distill from traffic)

A record: ``id`` (the request's), ``ts`` (received, epoch seconds), ``answered_ts``, ``task``, ``input`` (the task
input as the gateway handled it), ``route`` (student | teacher | none), ``reason``, ``confidence``, ``status``,
``student`` (the student's parsed answer, kept or not; null without one), ``teacher`` (the teacher's answer where
one was obtained), ``teacher_source`` (fallback | shadow | null), ``rule`` (the routing rule's results sha256: which
published run answered). A request sent to shadow is recorded once its shadow call ends, with the teacher's answer.

How it is written: ``record`` appends to an in-memory list and returns (no lock, no thread wake-up per request);
one writer thread wakes every ``FLUSH_EVERY_S`` seconds (or at once for ``flush``/``close``), takes what is queued
and stores it with one ``Store.append_many`` per group of at most ``BATCH_MAX`` records (one SQLite transaction,
or one Redis pipeline). What a crash can lose: the records not yet written, that is those of about the last
``FLUSH_EVERY_S`` seconds (at most ``QUEUE_MAX``) and the group being written when the process dies. A graceful stop
(SIGTERM, Ctrl-C: the gateway's shutdown calls ``close``) writes everything queued first. Records beyond
``QUEUE_MAX`` waiting are dropped and counted (``dropped``); a group the store refuses is counted in ``failed`` and
logged, and never fails a request.

With ``generate.redact_pii`` on, the input and every string in the answers go through ``pii.redact`` (generate's
redaction) before they are stored. Retention: ``serve.traffic.max_rows`` (the oldest beyond it are dropped) and
``serve.traffic.max_days``, applied by the writer every ``RETAIN_EVERY`` records and at close.

The log is a stream (``traffic``) of a store (``distill.serve.store``): its own SQLite file by default, so it can be
copied or pointed at on its own (``generate.traffic=PATH``); the shared Redis when replicas share one.
Re-distillation reads it through the same interface (``read_source``: the SQLite file, or with ``serve.store=redis``
the Redis stream), and generate's fingerprint holds ``source_digest``, a sha256 over its records.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from distill import paths
from distill.data import pii
from distill.config import Config
from distill.serve.store import SqliteStore, Store, StoreError, open_store

log = logging.getLogger("distill")

TRAFFIC_SQLITE = "traffic.sqlite"
STREAM = "traffic"
RETAIN_EVERY = 1000       # records between retention passes (the log may pass max_rows by this many meanwhile)
QUEUE_MAX = 10_000        # records waiting for the writer; more are dropped (counted in ``dropped``)
FLUSH_EVERY_S = 0.25      # the writer's period: at most this much of the log is only in memory
BATCH_MAX = 500           # records per store call (one transaction)


class _Flush:
    """A marker in the queue: set once every record queued before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class TrafficLog:
    """An in-memory queue and one writer thread that stores it in batches (module docstring)."""

    def __init__(self, store: Store, *, max_rows: int, max_days: float | None, redact: bool,
                 stream: str = STREAM, own_store: bool = True):
        self.store, self.stream = store, stream
        self.max_rows, self.max_days, self.redact = max_rows, max_days, redact
        self.own_store = own_store
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.batches = 0          # store calls made (each one transaction)
        # deque.append and popleft are atomic: the request path and the writer share it without a lock
        self._pending: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._since = 0           # records written since the last retention pass
        self._thread = threading.Thread(target=self._write_loop, name="distill-traffic", daemon=True)
        self._thread.start()

    def record(self, row: dict) -> None:
        """Queue one record; never blocks and wakes nothing (a full queue drops it and counts it)."""
        if len(self._pending) >= QUEUE_MAX:
            self.dropped += 1
            return
        self._pending.append(row)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every record queued so far is written (tests, shutdown)."""
        marker = _Flush()
        self._pending.append(marker)
        self._wake.set()
        marker.done.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued, apply retention, stop the writer, close the store (when this log opened it)."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=30)
        if self.own_store:
            self.store.close()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            closing = self._closing  # read before draining: everything queued before close() is written
            self._drain()
            if closing:
                self._retain()
                return

    def _drain(self) -> None:
        """Write everything queued now, in groups of at most BATCH_MAX, in order; release flush markers."""
        batch: list[dict] = []
        while True:
            try:
                item = self._pending.popleft()
            except IndexError:
                break
            if isinstance(item, _Flush):
                self._write(batch)
                batch = []
                item.done.set()
                continue
            batch.append(item)
            if len(batch) >= BATCH_MAX:
                self._write(batch)
                batch = []
        self._write(batch)

    def _write(self, batch: list[dict]) -> None:
        if not batch:
            return
        try:
            rows = [self._clean(row) for row in batch]
            self.store.append_many(self.stream, rows)
            self.batches += 1
        except (StoreError, TypeError, ValueError) as exc:
            # the log must never take the gateway down: one record at a time, so one bad record loses only itself
            if len(batch) > 1:
                for row in batch:
                    self._write([row])
                return
            self.failed += 1
            log.warning("serve: a traffic record was not written: %s", exc)
            return
        self.written += len(rows)
        self._since += len(rows)
        if self._since >= RETAIN_EVERY:
            self._since = 0
            self._retain()

    def _clean(self, row: dict) -> dict:
        if not self.redact:
            return row
        out = dict(row)
        if isinstance(out.get("input"), str):
            out["input"] = pii.redact(out["input"])[0]
        for key in ("student", "teacher"):
            out[key] = _redact_strings(out.get(key))
        return out

    def _retain(self) -> None:
        """Drop records older than max_days, then the oldest beyond max_rows."""
        try:
            cutoff = time.time() - self.max_days * 86400 if self.max_days is not None else None
            # the oldest record first: usually it is young, and nothing more is read or decoded
            oldest = self.store.read(self.stream, after=0, limit=1) if cutoff is not None else []
            if oldest and (oldest[0][1].get("ts") or 0) < cutoff:
                old, after = 0, 0
                while True:
                    batch = self.store.read(self.stream, after=after, limit=500)
                    young = [seq for seq, rec in batch if (rec.get("ts") or 0) >= cutoff]
                    old += len(batch) if not young else sum(1 for seq, _ in batch if seq < young[0])
                    if young or len(batch) < 500:
                        break
                    after = batch[-1][0]
                if old:
                    self.store.trim(self.stream, keep=self.store.length(self.stream) - old)
            if self.store.length(self.stream) > self.max_rows:
                self.store.trim(self.stream, keep=self.max_rows)
        except StoreError as exc:
            log.warning("serve: traffic retention failed: %s", exc)


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return pii.redact(value)[0]
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return value


def traffic_path(cfg: Config, run_dir: Path | str) -> Path:
    """``serve.traffic_path``, else ``<run_dir>/serve/traffic.sqlite``."""
    if cfg.serve.traffic_path:
        return Path(cfg.serve.traffic_path).expanduser()
    return paths.stage_dir(Path(run_dir), paths.SERVE_DIR) / TRAFFIC_SQLITE


def _store(cfg: Config, run_dir: Path | str) -> Store:
    if cfg.serve.store == "redis" and not cfg.serve.traffic_path:
        return open_store(cfg, run_dir)
    return SqliteStore(traffic_path(cfg, run_dir), cfg.serve.store_namespace or cfg.recipe.name)


def open_traffic_log(cfg: Config, run_dir: Path | str) -> TrafficLog | None:
    """The traffic log ``serve.traffic`` configures, or None when ``serve.traffic.enabled`` is false."""
    t = cfg.serve.traffic
    if not t.enabled:
        return None
    return TrafficLog(_store(cfg, run_dir), max_rows=t.max_rows, max_days=t.max_days,
                      redact=cfg.generate.redact_pii)


def read_traffic(cfg: Config, run_dir: Path | str, limit: int | None = None) -> list[dict]:
    """Every record of the traffic log, oldest first (at most ``limit``)."""
    path = traffic_path(cfg, run_dir)
    if not (cfg.serve.store == "redis" and not cfg.serve.traffic_path) and not path.is_file():
        return []
    store = _store(cfg, run_dir)
    try:
        return [rec for _, rec in store.read(STREAM, after=0, limit=limit)]
    finally:
        store.close()


def locate(path: str | Path) -> tuple[Path | None, Path]:
    """(the served run dir, its traffic log file) for ``generate.traffic=PATH``: a run dir, or the
    ``serve/traffic.sqlite`` inside one (the run dir is None when the file sits anywhere else)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p, paths.stage_dir(p, paths.SERVE_DIR) / TRAFFIC_SQLITE
    return (p.parent.parent if p.parent.name == paths.SERVE_DIR else None), p


def stream_counts(path: Path) -> dict[str, int]:
    """{namespace: records} of the traffic streams in one SQLite traffic log, read only; {} when the file is not
    one (not SQLite, or no streams table)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT stream, COUNT(*) FROM streams GROUP BY stream").fetchall()
    except sqlite3.Error:
        return {}
    out = {}
    for stream, n in rows:
        ns, _, name = stream.rpartition(":")
        if name == STREAM:
            out[ns] = n
    return out


def read_traffic_file(path: Path, namespace: str) -> list[dict]:
    """Every record of the SQLite traffic log at ``path`` under ``namespace``, oldest first (re-distillation)."""
    store = SqliteStore(path, namespace)
    try:
        return [rec for _, rec in store.read(STREAM, after=0)]
    finally:
        store.close()


def in_shared_store(cfg: Config) -> bool:
    """Whether ``generate.traffic=RUN_DIR`` is read from the shared store (``serve.store=redis`` in this run's
    config, the settings the gateway ran with) rather than the run's ``serve/traffic.sqlite``. A file path is always
    read as that SQLite file."""
    given = cfg.generate.traffic
    return (bool(given) and cfg.serve.store == "redis" and not cfg.serve.traffic_path
            and Path(given).expanduser().is_dir())


def source_name(cfg: Config) -> str:
    """Where re-distillation reads the traffic log: the SQLite file, or the Redis URL and namespace."""
    if in_shared_store(cfg):
        return f"{cfg.serve.redis_url} (namespace {cfg.serve.store_namespace or cfg.recipe.name})"
    return str(locate(cfg.generate.traffic)[1])


def read_source(cfg: Config) -> list[dict]:
    """Every record of the traffic log ``generate.traffic`` names, oldest first, through the store interface: the
    SQLite file, or the Redis stream the gateway wrote with ``serve.store=redis``. Raises StoreError when the store
    cannot be reached."""
    namespace = cfg.serve.store_namespace or cfg.recipe.name
    if not in_shared_store(cfg):
        return read_traffic_file(locate(cfg.generate.traffic)[1], namespace)
    store = open_store(cfg, locate(cfg.generate.traffic)[0], namespace)
    try:
        return [rec for _, rec in store.read(STREAM, after=0)]
    finally:
        store.close()


def source_counts(cfg: Config) -> dict[str, int]:
    """{namespace: records} of the traffic log ``generate.traffic`` names (the Redis stream: only this run's
    namespace). Raises StoreError when Redis cannot be reached."""
    if not in_shared_store(cfg):
        return stream_counts(locate(cfg.generate.traffic)[1])
    namespace = cfg.serve.store_namespace or cfg.recipe.name
    store = open_store(cfg, locate(cfg.generate.traffic)[0], namespace)
    try:
        return {namespace: store.length(STREAM)}
    finally:
        store.close()


def source_digest(cfg: Config) -> dict:
    """``{"records", "sha256"}`` of the content of the traffic log ``generate.traffic`` names: part of generate's
    fingerprint, so a changed log (new requests, retention) re-runs generate and the same one skips it."""
    records = read_source(cfg)
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return {"records": len(records), "sha256": digest.hexdigest()}
