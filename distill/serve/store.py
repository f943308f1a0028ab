"""The gateway's shared state behind one interface: cache entries with a TTL, counters that several replicas add to,
and append-only streams (the traffic log, the semantic cache's entries, shadow records).

    store = open_store(cfg, run_dir)            # SqliteStore (serve/store.sqlite, WAL) or RedisStore (serve.store=redis)
    store.put("exact:3f2a...", json_text, ttl_s=86400)
    store.get("exact:3f2a...")                  # the text, or None when absent or expired
    store.incr("shadow.agree.support_tickets", 1)
    store.counters("shadow.")                   # {"shadow.agree.support_tickets": 1.0, ...} summed over replicas
    seq = store.append("traffic", {"input": ..., "route": "student"})
    store.append_many("traffic", [record, ...])  # several at once: one transaction (the traffic log's writer)
    store.read("traffic", after=0, limit=100)   # [(seq, record), ...] oldest first, seq > after
    store.trim("traffic", keep=100_000)         # retention: drop the oldest records beyond ``keep``
    store.close()

The contract every implementation keeps (callers rely on it, the tests check it on both):

- **Entries** (``get``/``put``/``delete``): a key maps to a text value (callers serialise: JSON); ``ttl_s=None``
  keeps it until deleted; an expired entry reads as absent. ``put`` overwrites.
- **Counters** (``incr``/``counters``): float totals, created at 0 by their first ``incr``; ``incr`` returns the
  new total. Increments from every process on the same store add up (SQLite: one transaction each; Redis:
  HINCRBYFLOAT). ``counters(prefix)`` returns every counter whose name starts with ``prefix``.
- **Streams** (``append``/``read``/``trim``/``length``): ``append`` stores a JSON-serialisable dict and returns its
  sequence number, increasing within a stream across every process on the store; ``read(stream, after, limit)``
  returns ``(seq, record)`` pairs with ``seq > after``, oldest first, so a reader keeps the last seq it saw and
  polls for what is new (this is how each replica keeps its semantic index in step with the others).
- Names (keys, counters, streams) are free text; the store prefixes them with its namespace (``serve.store_namespace``,
  default the task id), so runs sharing one Redis do not see each other's state.
- Calls are synchronous and short (SQLite: tens of microseconds; Redis on loopback: about one round trip), so the
  gateway calls them on its event loop; a bulk reader (a re-distillation from the traffic log) may use a thread.
  Both implementations are safe to share between threads.
- Failures raise ``StoreError`` naming the store and the fix (a Redis that is not running, a URL that is not loopback).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from distill import DistillError, paths

STORE_SQLITE = "store.sqlite"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class StoreError(DistillError):
    """The store cannot be reached or refused an operation."""


class Store(Protocol):
    """What the gateway's caches, shadow statistics and traffic log call (see the module docstring)."""

    def get(self, key: str) -> str | None: ...
    def put(self, key: str, value: str, ttl_s: float | None = None) -> None: ...
    def delete(self, key: str) -> None: ...
    def incr(self, name: str, n: float = 1) -> float: ...
    def counters(self, prefix: str = "") -> dict[str, float]: ...
    def append(self, stream: str, record: dict) -> int: ...
    def append_many(self, stream: str, records: list[dict]) -> int: ...
    def read(self, stream: str, after: int = 0, limit: int | None = None) -> list[tuple[int, dict]]: ...
    def trim(self, stream: str, keep: int) -> int: ...
    def length(self, stream: str) -> int: ...
    def close(self) -> None: ...


class SqliteStore:
    """One SQLite file (WAL), shared by the processes on one machine; the default store."""

    def __init__(self, path: Path | str, namespace: str = ""):
        self.path, self.ns = Path(path), namespace
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL);"
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);"
                "CREATE TABLE IF NOT EXISTS streams (seq INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,"
                " record TEXT NOT NULL);"
                "CREATE INDEX IF NOT EXISTS streams_by_name ON streams (stream, seq);")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the gateway store {self.path}: {exc}; check the folder is writable") from None
        self._puts = 0

    def _k(self, name: str) -> str:
        return f"{self.ns}:{name}" if self.ns else name

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"the gateway store {self.path} refused an operation: {exc}") from None

    def get(self, key: str) -> str | None:
        rows = self._run("SELECT value, expires FROM entries WHERE key = ?", (self._k(key),))
        if not rows or (rows[0][1] is not None and rows[0][1] <= time.time()):
            return None
        return rows[0][0]

    def put(self, key: str, value: str, ttl_s: float | None = None) -> None:
        expires = time.time() + ttl_s if ttl_s is not None else None
        self._run("INSERT OR REPLACE INTO entries (key, value, expires) VALUES (?, ?, ?)", (self._k(key), value, expires))
        self._puts += 1
        if self._puts % 1000 == 0:  # expired entries read as absent; drop them now and then so the file stays small
            self._run("DELETE FROM entries WHERE expires IS NOT NULL AND expires <= ?", (time.time(),))

    def delete(self, key: str) -> None:
        self._run("DELETE FROM entries WHERE key = ?", (self._k(key),))

    def incr(self, name: str, n: float = 1) -> float:
        rows = self._run("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                         "value = value + excluded.value RETURNING value", (self._k(name), float(n)))
        return float(rows[0][0])

    def counters(self, prefix: str = "") -> dict[str, float]:
        full = self._k(prefix)
        rows = self._run("SELECT name, value FROM counters WHERE substr(name, 1, ?) = ?", (len(full), full))
        cut = len(self._k(""))
        return {name[cut:]: float(value) for name, value in rows}

    def append(self, stream: str, record: dict) -> int:
        rows = self._run("INSERT INTO streams (stream, record) VALUES (?, ?) RETURNING seq",
                         (self._k(stream), json.dumps(record, ensure_ascii=False)))
        return int(rows[0][0])

    def append_many(self, stream: str, records: list[dict]) -> int:
        """Append ``records`` in order in one transaction (all or none); returns how many."""
        name = self._k(stream)
        rows = [(name, json.dumps(record, ensure_ascii=False)) for record in records]  # before the lock: may raise
        with self._lock:
            try:
                with self._db:  # BEGIN ... COMMIT, or ROLLBACK on an error
                    self._db.executemany("INSERT INTO streams (stream, record) VALUES (?, ?)", rows)
            except sqlite3.Error as exc:
                raise StoreError(f"the gateway store {self.path} refused an operation: {exc}") from None
        return len(rows)

    def read(self, stream: str, after: int = 0, limit: int | None = None) -> list[tuple[int, dict]]:
        rows = self._run("SELECT seq, record FROM streams WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (self._k(stream), after, -1 if limit is None else limit))
        return [(int(seq), json.loads(record)) for seq, record in rows]

    def trim(self, stream: str, keep: int) -> int:
        """Drop the oldest records beyond ``keep``; returns how many were dropped."""
        with self._lock:
            cur = self._db.execute("DELETE FROM streams WHERE stream = ? AND seq NOT IN (SELECT seq FROM streams "
                                   "WHERE stream = ? ORDER BY seq DESC LIMIT ?)",
                                   (self._k(stream), self._k(stream), max(keep, 0)))
            return cur.rowcount

    def length(self, stream: str) -> int:
        return int(self._run("SELECT COUNT(*) FROM streams WHERE stream = ?", (self._k(stream),))[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisStore:
    """A Redis server shared by several gateway replicas (``serve.store=redis``, ``serve.redis_url``).

    Entries are Redis strings with PX expiry; counters are one hash (HINCRBYFLOAT); a stream is a sorted set
    scored by a per-stream INCR sequence (so ``read(after=seq)`` is one ZRANGEBYSCORE)."""

    def __init__(self, url: str, namespace: str = "distill", *, allow_remote: bool = False,
                 password: str | None = None):
        import redis

        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise StoreError(f"serve.redis_url={url!r} is not a Redis URL; write redis://127.0.0.1:6379/0")
        if parsed.password or parsed.username:
            raise StoreError("serve.redis_url carries credentials; put the password in an environment variable "
                             "and name it with serve.redis_password_env")
        if parsed.scheme != "unix" and parsed.hostname not in LOOPBACK and not allow_remote:
            raise StoreError(f"serve.redis_url points at {parsed.hostname}, not loopback; set "
                             f"serve.redis_allow_remote=true to share a Redis across machines (use rediss:// and a "
                             f"password then)")
        self.url, self.ns = url, namespace or "distill"
        self._r = redis.Redis.from_url(url, password=password, decode_responses=True, socket_timeout=5,
                                       socket_connect_timeout=5)
        try:
            self._r.ping()
        except redis.RedisError as exc:
            raise StoreError(f"cannot reach Redis at {url} ({exc}); start redis-server (make setup installs it) or "
                             f"set serve.store=sqlite") from None
        self._errors = redis.RedisError

    def _k(self, name: str) -> str:
        return f"{self.ns}:{name}"

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StoreError(f"Redis at {self.url} failed: {exc}") from None

    def get(self, key: str) -> str | None:
        return self._call(self._r.get, self._k(f"e:{key}"))

    def put(self, key: str, value: str, ttl_s: float | None = None) -> None:
        px = max(int(ttl_s * 1000), 1) if ttl_s is not None else None
        self._call(self._r.set, self._k(f"e:{key}"), value, px=px)

    def delete(self, key: str) -> None:
        self._call(self._r.delete, self._k(f"e:{key}"))

    def incr(self, name: str, n: float = 1) -> float:
        return float(self._call(self._r.hincrbyfloat, self._k("counters"), name, float(n)))

    def counters(self, prefix: str = "") -> dict[str, float]:
        found = self._call(lambda: dict(self._r.hscan_iter(self._k("counters"), match=_glob(prefix) + "*")))
        return {name: float(value) for name, value in found.items()}

    def append(self, stream: str, record: dict) -> int:
        seq = int(self._call(self._r.incr, self._k(f"seq:{stream}")))
        member = f"{seq}:{json.dumps(record, ensure_ascii=False)}"
        self._call(self._r.zadd, self._k(f"s:{stream}"), {member: seq})
        return seq

    def append_many(self, stream: str, records: list[dict]) -> int:
        """Append ``records`` in order: one INCRBY reserves their sequence numbers, one ZADD stores them."""
        if not records:
            return 0
        texts = [json.dumps(record, ensure_ascii=False) for record in records]  # before any call: may raise
        last = int(self._call(self._r.incrby, self._k(f"seq:{stream}"), len(texts)))
        first = last - len(texts) + 1
        self._call(self._r.zadd, self._k(f"s:{stream}"),
                   {f"{first + i}:{text}": first + i for i, text in enumerate(texts)})
        return len(texts)

    def read(self, stream: str, after: int = 0, limit: int | None = None) -> list[tuple[int, dict]]:
        kwargs = {"start": 0, "num": limit} if limit is not None else {}
        members = self._call(self._r.zrangebyscore, self._k(f"s:{stream}"), f"({after}", "+inf", **kwargs)
        out = []
        for member in members:
            seq, _, text = member.partition(":")
            out.append((int(seq), json.loads(text)))
        return out

    def trim(self, stream: str, keep: int) -> int:
        return int(self._call(self._r.zremrangebyrank, self._k(f"s:{stream}"), 0, -max(keep, 0) - 1))

    def length(self, stream: str) -> int:
        return int(self._call(self._r.zcard, self._k(f"s:{stream}")))

    def close(self) -> None:
        self._r.close()


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped (a counter prefix is literal)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def open_store(cfg, run_dir: Path | str, namespace: str | None = None) -> Store:
    """The store ``serve.store`` names: SQLite under ``<run_dir>/serve/`` or the Redis at ``serve.redis_url``.

    ``namespace`` (default ``serve.store_namespace``, else the recipe's task name) prefixes every name."""
    import os

    s = cfg.serve
    ns = namespace or s.store_namespace or cfg.recipe.name
    if s.store == "redis":
        password = os.environ.get(s.redis_password_env) if s.redis_password_env else None
        if s.redis_password_env and not password:
            raise StoreError(f"serve.redis_password_env={s.redis_password_env} names an environment variable that "
                             f"is not set; export it or set serve.redis_password_env=null")
        return RedisStore(s.redis_url, ns, allow_remote=s.redis_allow_remote, password=password)
    return SqliteStore(paths.stage_dir(Path(run_dir), paths.SERVE_DIR) / STORE_SQLITE, ns)
