"""The teacher-call ledger: every paid call, keyed by the sha256 of its canonical request, shared safely by processes.

The promise: a request key is paid for at most once, whichever processes share the ledger file, and an answer that
was paid for is never lost. It rests on four rules, each kept inside one SQLite transaction:

1. **Claim before paying.** A process sends a key only after ``claim`` took it (a row in ``claims`` with its owner
   and a lease) in the same IMMEDIATE transaction that found no answer for it. Another process that wants the key
   waits until the answer lands or the lease runs out (its owner died), then takes it over. Owners renew their
   leases while the call is in flight (``Heartbeat``).
2. **One cap for everyone.** A claim also reserves the request's upper-bound price. It is granted only while
   ``spent`` (every dollar the ledger records, kept by triggers in ``totals``) + every live reservation (online
   claims and the lines of open batches) + its own bound fit under the cap of the process asking.
3. **Record, then release.** The answer, the failure, or the raw response the client could not read is written in the
   transaction that releases the claim. A raw response (``responses``) is re-read on the next run and never bought
   again. A write that fails (disk full, read-only file) raises ``LedgerWriteError``: the run stops there instead of
   paying on while nothing is recorded.
4. **Possibly billed failures count.** A request that was sent and then timed out, lost its connection or came back
   truncated may be billed: it is recorded as a failure with ``billed = 1`` at its estimate, counts against the cap,
   and a key gets at most ``teacher.max_billed_attempts`` of them across runs.

What a ``kill -9`` can lose: the answers of the calls in flight at that moment (paid, never received or never
written), at most ``teacher.concurrency`` of them; their claims expire after the lease and the keys are retried.

    python -m distill ledger run_dir=DIR      # calls, tokens, dollars, cache hits, failures by reason
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import DistillError, LedgerWriteError, runio

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
CREATE INDEX IF NOT EXISTS failures_key ON failures (key);
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,           -- a paid response the client could not read: re-read on rerun, never re-bought
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    body TEXT NOT NULL,             -- the response JSON as received
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,           -- a request key some process is paying for right now
    owner TEXT NOT NULL,
    estimate_usd REAL NOT NULL,     -- reserved under the budget until the claim is released
    expires_at REAL NOT NULL        -- renewed while the owner lives, after it anyone may take the key over
);
CREATE TABLE IF NOT EXISTS batches (
    submission TEXT PRIMARY KEY,    -- sha256 of the sorted request keys in the batch + its round
    batch_id TEXT,                  -- null until the create call's answer is recorded
    input_file_id TEXT,
    n INTEGER NOT NULL,
    status TEXT NOT NULL,           -- claimed | uploaded | submitted | done | lost
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_ids (
    submission TEXT NOT NULL,       -- every batch id ever created or found for a submission
    batch_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (submission, batch_id)
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
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    spent_usd REAL NOT NULL         -- every dollar in calls + failures + responses, kept by the triggers below
);
"""

# Columns added since 0.2.0: (table, column, declaration). Opening an older ledger adds them.
_ADDED_COLUMNS = (("failures", "billed", "INTEGER NOT NULL DEFAULT 0"),
                  ("batches", "owner", "TEXT"),
                  ("batches", "claim_expires_at", "REAL NOT NULL DEFAULT 0"),
                  ("batch_lines", "estimate_usd", "REAL NOT NULL DEFAULT 0"))

_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS spend_calls AFTER INSERT ON calls
    BEGIN UPDATE totals SET spent_usd = spent_usd + NEW.cost_usd WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS spend_failures AFTER INSERT ON failures
    BEGIN UPDATE totals SET spent_usd = spent_usd + NEW.cost_usd WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS spend_responses AFTER INSERT ON responses
    BEGIN UPDATE totals SET spent_usd = spent_usd + NEW.cost_usd WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS unspend_responses AFTER DELETE ON responses
    BEGIN UPDATE totals SET spent_usd = spent_usd - OLD.cost_usd WHERE id = 0; END;
"""

OPEN_BATCH = "('claimed', 'uploaded', 'submitted')"


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the canonical request. What goes into a request, and so into its key, is decided in one place:
    ``distill.teacher.client.build_chat_request`` (see its docstring for the rule)."""
    return runio.sha256_obj(request)


def new_owner() -> str:
    """A name for this process's claims: host, pid and a random part (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _writes(method):
    """A ledger write that fails is fatal for the run, with one line that says what to do."""

    @functools.wraps(method)
    def wrapper(self: "Ledger", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.rollback()
            raise LedgerWriteError(
                f"cannot write the teacher ledger {self.path} ({exc}); the run stops so that nothing more is paid "
                f"without a record. Free disk space or make the file writable, then rerun: every answer already "
                f"recorded is kept and not paid again") from None

    return wrapper


@dataclass(frozen=True)
class Claim:
    """What ``Ledger.claim`` found. status: hit | raw | claimed | busy | wait | over_cap | exhausted."""

    status: str
    row: dict | None = None       # the answer (hit) or the raw response (raw)
    billed_failures: int = 0


class Ledger:
    """SQLite ledger in WAL mode; every write is one short transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                # Switching a new file to WAL takes an exclusive lock that the busy timeout does not wait for:
                # two processes creating one shared ledger at once retry here.
                self.db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a committed row survives the process being killed (kill -9 included); only an OS
                # crash can lose the last commits. FULL would fsync on every call and stall labelling on slow disks.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
                break
            except sqlite3.Error as exc:
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.db.close()
                raise LedgerWriteError(f"cannot open the teacher ledger {self.path} ({exc}); check that the folder "
                                       f"is writable and the file is an SQLite database") from None
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            for table, column, decl in _ADDED_COLUMNS:
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if self.db.execute("SELECT COUNT(*) FROM totals").fetchone()[0] == 0:
                self.db.execute("INSERT INTO totals VALUES (0, (SELECT COALESCE(SUM(cost_usd), 0) FROM calls) + "
                                "(SELECT COALESCE(SUM(cost_usd), 0) FROM failures) + "
                                "(SELECT COALESCE(SUM(cost_usd), 0) FROM responses))")
            for statement in _TRIGGERS.split("END;"):
                if statement.strip():
                    self.db.execute(statement + "END;")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.rollback()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------------------------

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT response, prompt_tokens, completion_tokens, cost_usd, latency_s FROM calls "
                              "WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"response": row[0], "prompt_tokens": row[1], "completion_tokens": row[2], "cost_usd": row[3],
                "latency_s": row[4]}

    def raw(self, key: str) -> dict | None:
        """A paid response that was kept unread (the client could not interpret it when it arrived)."""
        row = self.db.execute("SELECT body, prompt_tokens, cached_tokens, completion_tokens, cost_usd, latency_s "
                              "FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"body": json.loads(row[0]), "tokens": (row[1], row[2], row[3]), "cost_usd": row[4],
                "latency_s": row[5]}

    def last_failure(self, key: str) -> str | None:
        row = self.db.execute("SELECT reason FROM failures WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return row[0] if row else None

    def billed_failures(self, key: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM failures WHERE key = ? AND billed = 1", (key,)).fetchone()[0]

    def cost_of(self, key: str) -> float:
        """Dollars paid for one request key: its success row, its raw response, its failed attempts."""
        return self.db.execute(
            "SELECT (SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE key = ?1) + "
            "(SELECT COALESCE(SUM(cost_usd), 0) FROM responses WHERE key = ?1) + "
            "(SELECT COALESCE(SUM(cost_usd), 0) FROM failures WHERE key = ?1)", (key,)).fetchone()[0]

    def spent(self) -> float:
        """Every dollar the ledger records (answers, unread responses, failures that were or may have been billed)."""
        return self.db.execute("SELECT spent_usd FROM totals WHERE id = 0").fetchone()[0]

    def reserved(self, now: float | None = None, *, except_key: str | None = None) -> tuple[float, int]:
        """(dollars, count) reserved by live claims and by the lines of open batches, of every process."""
        now = time.time() if now is None else now
        online = self.db.execute("SELECT COALESCE(SUM(estimate_usd), 0), COUNT(*) FROM claims "
                                 "WHERE expires_at > ? AND key IS NOT ?", (now, except_key)).fetchone()
        batch = self.db.execute(f"SELECT COALESCE(SUM(estimate_usd), 0), COUNT(*) FROM batch_lines WHERE submission IN "
                                f"(SELECT submission FROM batches WHERE status IN {OPEN_BATCH})").fetchone()
        return online[0] + batch[0], online[1] + batch[1]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    # -- claiming and recording a paid call -----------------------------------------------------------------------

    @_writes
    def claim(self, key: str, owner: str, estimate: float, *, cap: float | None, lease_s: float,
              max_billed: int | None = None) -> Claim:
        """Look the key up and, when nobody answered or holds it, take it for ``owner`` under the cap (atomically)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                return self._claim(key, owner, estimate, cap, lease_s, max_billed)
            finally:
                self.db.execute("COMMIT")

    def _claim(self, key, owner, estimate, cap, lease_s, max_billed) -> Claim:
        if (row := self.get(key)) is not None:
            return Claim("hit", row)
        if (raw := self.raw(key)) is not None:
            return Claim("raw", raw)
        now = time.time()
        held = self.db.execute("SELECT owner, expires_at FROM claims WHERE key = ?", (key,)).fetchone()
        if held is not None and held[0] != owner and held[1] > now:
            return Claim("busy")
        billed = self.billed_failures(key)
        if max_billed is not None and billed >= max_billed:
            return Claim("exhausted", billed_failures=billed)
        if cap is not None:
            reserved, live = self.reserved(now, except_key=key)
            if self.spent() + reserved + estimate > cap:
                return Claim("wait" if live else "over_cap")
        self.db.execute("INSERT INTO claims VALUES (?,?,?,?) ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, "
                        "estimate_usd = excluded.estimate_usd, expires_at = excluded.expires_at",
                        (key, owner, estimate, now + lease_s))
        return Claim("claimed", billed_failures=billed)

    @_writes
    def readmit(self, key: str, owner: str, estimate: float, *, cap: float | None, lease_s: float,
                max_billed: int | None) -> str:
        """Before re-sending a claimed key: 'ok', 'over_cap' or 'exhausted' (its billed failures reached the cap)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if max_billed is not None and self.billed_failures(key) >= max_billed:
                    return "exhausted"
                if cap is not None:
                    reserved, _ = self.reserved(except_key=key)
                    if self.spent() + reserved + estimate > cap:
                        return "over_cap"
                self.db.execute("UPDATE claims SET expires_at = ? WHERE key = ? AND owner = ?",
                                (time.time() + lease_s, key, owner))
                return "ok"
            finally:
                self.db.execute("COMMIT")

    @_writes
    def release(self, key: str, owner: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    @_writes
    def release_all(self, owner: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    @_writes
    def record_success(self, key: str, model: str, request: dict, response: str, *, prompt_tokens: int = 0,
                       cached_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0,
                       latency_s: float = 0.0, owner: str | None = None) -> None:
        """The validated answer; also releases ``owner``'s claim and drops a raw response it was read from."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (key, model, runio.canonical_json(request), response, prompt_tokens, cached_tokens,
                             completion_tokens, cost_usd, latency_s, time.time()))
            self._settled(key, owner)

    @_writes
    def record_failure(self, key: str, reason: str, detail: str = "", *, prompt_tokens: int = 0,
                       completion_tokens: int = 0, cost_usd: float = 0.0, billed: bool = False,
                       owner: str | None = None, release: bool = True) -> None:
        """A failed attempt (``billed``: it may have been billed, charged at ``cost_usd``); releases the claim."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO failures (key, reason, detail, prompt_tokens, completion_tokens, cost_usd, created_at, "
                "billed) VALUES (?,?,?,?,?,?,?,?)", (key, reason, detail[:500], prompt_tokens, completion_tokens,
                                                     cost_usd, time.time(), int(billed)))
            if release:
                self._settled(key, owner)

    @_writes
    def record_raw(self, key: str, model: str, request: dict, body: dict, *, tokens: tuple[int, int, int],
                   cost_usd: float, latency_s: float, owner: str | None = None) -> None:
        """A paid response the client could not interpret: kept as received, so a rerun reads it instead of paying."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (key, model, runio.canonical_json(request), json.dumps(body, ensure_ascii=False),
                             *tokens, cost_usd, latency_s, time.time()))
            if owner is not None:
                self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def _settled(self, key: str, owner: str | None) -> None:
        self.db.execute("DELETE FROM responses WHERE key = ?", (key,))  # its cost moved to the row just written
        if owner is not None:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    @_writes
    def record_hits(self, run: str, count: int) -> None:
        self.db.execute("INSERT INTO hits VALUES (?, ?) ON CONFLICT(run) DO UPDATE SET count = count + ?",
                        (run, count, count))

    # -- batches --------------------------------------------------------------------------------------------------

    def batch(self, submission: str) -> dict | None:
        row = self.db.execute("SELECT batch_id, input_file_id, status, owner, claim_expires_at FROM batches "
                              "WHERE submission = ?", (submission,)).fetchone()
        return None if row is None else {"batch_id": row[0], "input_file_id": row[1], "status": row[2],
                                         "owner": row[3], "claim_expires_at": row[4]}

    def keys_in_open_batches(self) -> set[str]:
        return {r[0] for r in self.db.execute(f"SELECT key FROM batch_lines WHERE submission IN "
                                              f"(SELECT submission FROM batches WHERE status IN {OPEN_BATCH})")}

    @_writes
    def claim_batch_round(self, owner: str, candidates: list[tuple[str, dict, float]], *, cap: float | None,
                          lease_s: float) -> tuple[str | None, list[str], list[str], bool]:
        """Claim the next batch in one transaction: of ``candidates`` ``(key, body, estimate)``, the keys nobody
        answered, batched or claimed, each admitted under the cap at its estimate.

        Returns (submission id or None, its keys, keys that did not fit under the cap, whether ``owner`` must upload
        and create it). The id is the hash of the keys and a round number: the same keys after a failed, lost or
        expired batch make a new submission, while runs that race on the same keys find one submission.
        """
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            now = time.time()
            busy = self.keys_in_open_batches() | {r[0] for r in self.db.execute(
                "SELECT key FROM claims WHERE expires_at > ?", (now,))}
            room = None
            if cap is not None:
                room = cap - self.spent() - self.reserved(now)[0]
            lines, over_cap = {}, []
            for key, body, estimate in candidates:
                if key in busy or key in lines or self.get(key) is not None or self.raw(key) is not None:
                    continue
                if room is not None:
                    if estimate > room:
                        over_cap.append(key)
                        continue
                    room -= estimate
                lines[key] = (body, estimate)
            if not lines:
                return None, [], over_cap, False
            keys = sorted(lines)
            for round_no in itertools.count():
                submission = runio.sha256_obj([keys, round_no])
                if self.batch(submission) is None:
                    break
            self.db.execute("INSERT INTO batches (submission, n, status, created_at, owner, claim_expires_at) "
                            "VALUES (?,?,'claimed',?,?,?)", (submission, len(lines), now, owner, now + lease_s))
            self.db.executemany("INSERT INTO batch_lines (submission, key, body, estimate_usd) VALUES (?,?,?,?)",
                                [(submission, k, runio.canonical_json(b), e) for k, (b, e) in lines.items()])
            return submission, keys, over_cap, True

    @_writes
    def take_over_batch(self, submission: str, owner: str, lease_s: float) -> bool:
        """Whether ``owner`` may upload or create a submission that has no batch id yet: it is its own, or its
        owner's claim lapsed (that process died); the claim then passes to ``owner``."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            now = time.time()
            return self.db.execute(
                "UPDATE batches SET owner = ?, claim_expires_at = ? WHERE submission = ? AND batch_id IS NULL "
                "AND status IN ('claimed', 'uploaded') AND (owner IS ? OR owner IS NULL OR claim_expires_at <= ?)",
                (owner, now + lease_s, submission, owner, now)).rowcount == 1

    def batch_lines(self, submission: str) -> dict[str, dict]:
        return {k: json.loads(b) for k, b in
                self.db.execute("SELECT key, body FROM batch_lines WHERE submission = ?", (submission,))}

    def open_batches(self) -> list[tuple[str, str | None]]:
        """(submission, batch_id) of batches recorded and not yet joined: a restarted run polls these."""
        return self.db.execute(f"SELECT submission, batch_id FROM batches WHERE status IN {OPEN_BATCH} "
                               f"ORDER BY created_at").fetchall()

    def batch_ids(self, submission: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT batch_id FROM batch_ids WHERE submission = ? "
                                              "ORDER BY created_at", (submission,))]

    @_writes
    def record_batch(self, submission: str, *, input_file_id: str | None = None, batch_id: str | None = None,
                     status: str) -> None:
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE batches SET batch_id = COALESCE(?, batch_id), "
                            "input_file_id = COALESCE(?, input_file_id), status = ? WHERE submission = ?",
                            (batch_id, input_file_id, status, submission))
            if batch_id:
                self.db.execute("INSERT OR IGNORE INTO batch_ids VALUES (?,?,?)", (submission, batch_id, time.time()))

    @_writes
    def join_batch(self, submission: str, successes: list[tuple], failures: list[tuple],
                   raws: list[tuple]) -> bool:
        """Write a finished batch's results and mark it done, all at once. False (nothing written) when another
        process joined it first. Rows: ``record_success`` / ``record_failure`` / ``record_raw`` argument tuples."""
        now = time.time()
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if (self.batch(submission) or {}).get("status") not in ("claimed", "uploaded", "submitted"):
                return False
            self.db.executemany("INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                                [(*row, now) for row in successes])
            self.db.executemany("INSERT INTO failures (key, reason, detail, prompt_tokens, completion_tokens, "
                                "cost_usd, created_at, billed) VALUES (?,?,?,?,?,?,?,0)",
                                [(*row[:6], now) for row in failures])
            self.db.executemany("INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)",
                                [(*row, now) for row in raws])
            self.db.execute("UPDATE batches SET status = 'done' WHERE submission = ?", (submission,))
            return True

    # -- reporting ------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Calls, tokens, dollars, cache hits and failures by reason."""
        calls, prompt, cached, completion, latency = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(cached_tokens),0), "
            "COALESCE(SUM(completion_tokens),0), COALESCE(AVG(latency_s),0) FROM calls").fetchone()
        fail_rows = self.db.execute("SELECT reason, COUNT(*) FROM failures GROUP BY reason ORDER BY reason").fetchall()
        billed, billed_cost = self.db.execute("SELECT COUNT(*), COALESCE(SUM(cost_usd), 0) FROM failures "
                                              "WHERE billed = 1").fetchone()
        unread = self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        hits = self.db.execute("SELECT COALESCE(SUM(count),0) FROM hits").fetchone()[0]
        batches = self.db.execute("SELECT COUNT(*) FROM batch_ids").fetchone()[0]
        return {
            "successful_calls": calls,
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "completion_tokens": completion,
            "cost_usd": round(self.spent(), 6),
            "mean_latency_s": round(latency, 4),
            "cache_hits": hits,
            "failures": {r[0]: r[1] for r in fail_rows},
            "possibly_billed_failures": billed,
            "possibly_billed_usd": round(billed_cost, 6),
            "unread_responses": unread,
            "batches": batches,
        }


class Heartbeat:
    """Renews one owner's claims every ``lease_s / 4`` seconds from a daemon thread, so that a long call (retries,
    backoff) keeps its key while its process lives, and a dead process's keys free up one lease after it died."""

    def __init__(self, ledger: Ledger, owner: str, lease_s: float):
        self.path, self.owner, self.lease_s = ledger.path, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ledger-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # its own connection: no shared state
        try:
            while not self._stop.wait(self.lease_s / 4):
                try:
                    db.execute("UPDATE claims SET expires_at = ? WHERE owner = ?", (time.time() + self.lease_s,
                                                                                    self.owner))
                except sqlite3.Error:  # the labelling loop meets the same error on its next write and stops the run
                    return
        finally:
            db.close()
