"""The teacher-call ledger: every paid call, keyed by the sha256 of its canonical request.

A success row is written only after the answer validated, in its own transaction, so a crash at any moment loses
at most the calls in flight. A key with a success row is never sent to the teacher again: not on a re-run, not after
a crash, not from another run that shares the ledger file. Failures go to their own table and are retried.

    python -m distill ledger run_dir=DIR      # calls, tokens, dollars, cache hits, failures by reason
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from distill import runio

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,          -- canonical JSON of the request (no credentials)
    response TEXT NOT NULL,         -- the validated answer text
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    submission TEXT PRIMARY KEY,    -- sha256 of the sorted request keys in the batch
    batch_id TEXT,                  -- null between upload and the create call's answer
    input_file_id TEXT,
    n INTEGER NOT NULL,
    status TEXT NOT NULL,           -- uploaded | submitted | done
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_lines (
    submission TEXT NOT NULL,       -- the request bodies of a submission, so any run sharing the ledger can join it
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (submission, key)
);
CREATE TABLE IF NOT EXISTS hits (
    run TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the canonical request: model, messages, sampling parameters, schema, sample index."""
    return runio.sha256_obj(request)


class Ledger:
    """SQLite ledger in WAL mode; one short transaction per write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a committed row survives the process being killed (kill -9 included); only an OS crash
        # can lose the last commits. FULL would fsync on every call and stall the labelling loop on slow disks.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT response, prompt_tokens, completion_tokens, cost_usd, latency_s FROM calls "
                              "WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"response": row[0], "prompt_tokens": row[1], "completion_tokens": row[2], "cost_usd": row[3],
                "latency_s": row[4]}

    def record_success(self, key: str, model: str, request: dict, response: str, *, prompt_tokens: int = 0,
                       cached_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0,
                       latency_s: float = 0.0) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
            (key, model, runio.canonical_json(request), response, prompt_tokens, cached_tokens, completion_tokens,
             cost_usd, latency_s, time.time()))

    def record_failure(self, key: str, reason: str, detail: str = "", *, prompt_tokens: int = 0,
                       completion_tokens: int = 0, cost_usd: float = 0.0) -> None:
        self.db.execute(
            "INSERT INTO failures (key, reason, detail, prompt_tokens, completion_tokens, cost_usd, created_at) "
            "VALUES (?,?,?,?,?,?,?)", (key, reason, detail[:500], prompt_tokens, completion_tokens, cost_usd,
                                       time.time()))

    def record_hits(self, run: str, count: int) -> None:
        self.db.execute("INSERT INTO hits VALUES (?, ?) ON CONFLICT(run) DO UPDATE SET count = count + ?",
                        (run, count, count))

    def last_failure(self, key: str) -> str | None:
        row = self.db.execute("SELECT reason FROM failures WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return row[0] if row else None

    def cost_of(self, key: str) -> float:
        """Dollars paid for one request key: its success row, or its failed answers."""
        ok = self.db.execute("SELECT cost_usd FROM calls WHERE key = ?", (key,)).fetchone()
        failed = self.db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM failures WHERE key = ?", (key,)).fetchone()
        return (ok[0] if ok else 0.0) + failed[0]

    def batch(self, submission: str) -> dict | None:
        row = self.db.execute("SELECT batch_id, input_file_id, status FROM batches WHERE submission = ?",
                              (submission,)).fetchone()
        return None if row is None else {"batch_id": row[0], "input_file_id": row[1], "status": row[2]}

    def record_batch_lines(self, submission: str, bodies: dict[str, dict]) -> None:
        with self.db:  # one transaction: all lines or none
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO batch_lines VALUES (?,?,?)",
                                [(submission, k, runio.canonical_json(b)) for k, b in bodies.items()])

    def batch_lines(self, submission: str) -> dict[str, dict]:
        import json

        return {k: json.loads(b) for k, b in
                self.db.execute("SELECT key, body FROM batch_lines WHERE submission = ?", (submission,))}

    def open_batches(self) -> list[tuple[str, str | None]]:
        """(submission, batch_id) of batches submitted and not yet joined: a restarted run polls these."""
        return self.db.execute("SELECT submission, batch_id FROM batches WHERE status != 'done' "
                               "ORDER BY created_at").fetchall()

    def record_batch(self, submission: str, *, n: int = 0, input_file_id: str | None = None,
                     batch_id: str | None = None, status: str) -> None:
        self.db.execute(
            "INSERT INTO batches (submission, batch_id, input_file_id, n, status, created_at) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(submission) DO UPDATE SET batch_id = COALESCE(excluded.batch_id, batch_id), "
            "input_file_id = COALESCE(excluded.input_file_id, input_file_id), status = excluded.status",
            (submission, batch_id, input_file_id, n, status, time.time()))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def summary(self) -> dict[str, Any]:
        """Calls, tokens, dollars, cache hits and failures by reason."""
        calls, prompt, cached, completion, cost, latency = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(cached_tokens),0), "
            "COALESCE(SUM(completion_tokens),0), COALESCE(SUM(cost_usd),0), COALESCE(AVG(latency_s),0) "
            "FROM calls").fetchone()
        fail_rows = self.db.execute("SELECT reason, COUNT(*), COALESCE(SUM(cost_usd),0) FROM failures "
                                    "GROUP BY reason ORDER BY reason").fetchall()
        hits = self.db.execute("SELECT COALESCE(SUM(count),0) FROM hits").fetchone()[0]
        batches = self.db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        fail_cost = sum(r[2] for r in fail_rows)
        return {
            "successful_calls": calls,
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "completion_tokens": completion,
            "cost_usd": round(cost + fail_cost, 6),
            "mean_latency_s": round(latency, 4),
            "cache_hits": hits,
            "failures": {r[0]: r[1] for r in fail_rows},
            "batches": batches,
        }
