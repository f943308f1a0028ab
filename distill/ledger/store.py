"""``Ledger``: the teacher-call ledger's look-ups, claims, records and totals (the promise is in ``distill.ledger``).

    with Ledger(paths.ledger_path(run_dir)) as ledger:
        ledger.summary()
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from distill import DistillError, LedgerWriteError, runio
from distill.ledger.batches import BatchRecords
from distill.ledger.db import OPEN_BATCH, migrate, writes


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the canonical request. What goes into a request, and so into its key, is decided in one place:
    ``distill.teacher.request.build_chat_request`` (see ``teacher_identity`` for the rule)."""
    return runio.sha256_obj(request)


def _canonical(request: dict | str) -> str:
    """A request's canonical JSON for its ledger row; a str is one already (the client hashed it for the key)."""
    return request if isinstance(request, str) else runio.canonical_json(request)


def new_owner() -> str:
    """A name for this process's claims: host, pid and a random part (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Claim:
    """What ``Ledger.claim`` found. status: hit | raw | claimed | busy | wait | over_cap | exhausted."""

    status: str
    row: dict | None = None       # the answer (hit) or the raw response (raw)
    billed_failures: int = 0
    last_failure: str | None = None  # claimed: the reason of the key's latest failed attempt, if any


class Ledger(BatchRecords):
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
                migrate(self.db)
                break
            except sqlite3.Error as exc:
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.db.close()
                raise LedgerWriteError(f"cannot open the teacher ledger {self.path} ({exc}); check that the folder "
                                       f"is writable and the file is an SQLite database") from None
        self._lock = threading.Lock()

    @classmethod
    def read_only(cls, path: Path) -> "Ledger":
        """Open an existing ledger for reading only (notebooks, evaluate's cost case): no table is created, no
        column added, nothing written; every write method fails with ``LedgerWriteError``."""
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"no teacher ledger at {path}; run the generate stage first (or set "
                               f"generate.shared_ledger to the ledger it used)")
        ledger = cls.__new__(cls)
        ledger.path = path
        ledger.db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=60, isolation_level=None,
                                    check_same_thread=False)
        ledger._lock = threading.Lock()
        return ledger

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

    def usage(self, keys: Iterable[str]) -> dict[str, tuple[int, int, int, float]]:
        """(prompt, cached prompt, completion tokens, latency s) of each answered key among ``keys``."""
        wanted = sorted(set(keys))
        found = {}
        for i in range(0, len(wanted), 500):  # SQLite caps the host parameters of one statement
            chunk = wanted[i:i + 500]
            found.update((key, tuple(vals)) for key, *vals in self.db.execute(
                "SELECT key, prompt_tokens, cached_tokens, completion_tokens, latency_s FROM calls "
                f"WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def calls(self) -> list[dict[str, Any]]:
        """Every answered call in the order it was recorded: created_at (unix s), model, prompt_tokens,
        cached_tokens, completion_tokens, cost_usd, latency_s."""
        columns = ("created_at", "model", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
                   "latency_s")
        return [dict(zip(columns, row)) for row in
                self.db.execute(f"SELECT {', '.join(columns)} FROM calls ORDER BY created_at")]

    # -- claiming and recording a paid call -----------------------------------------------------------------------

    @writes
    def claim(self, key: str, owner: str, estimate: float, *, cap: float | None, lease_s: float,
              max_billed: int | None = None) -> Claim:
        """Look the key up and, when nobody answered or holds it, take it for ``owner`` under the cap (atomically)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                return self._claim(key, owner, estimate, cap, lease_s, max_billed)
            finally:
                self.db.execute("COMMIT")

    def _claim(self, key, owner, estimate, cap=None, lease_s=30.0, max_billed=None) -> Claim:
        if (row := self.get(key)) is not None:
            return Claim("hit", row)
        if (raw := self.raw(key)) is not None:
            return Claim("raw", raw)
        now = time.time()
        held = self.db.execute("SELECT owner, expires_at FROM claims WHERE key = ?", (key,)).fetchone()
        if held is not None and held[0] != owner and held[1] > now:
            return Claim("busy")
        failures = self.db.execute("SELECT billed, reason FROM failures WHERE key = ? ORDER BY id", (key,)).fetchall()
        billed = sum(f[0] for f in failures)
        if max_billed is not None and billed >= max_billed:
            return Claim("exhausted", billed_failures=billed)
        if cap is not None:
            reserved, live = self.reserved(now, except_key=key)
            if self.spent() + reserved + estimate > cap:
                return Claim("wait" if live else "over_cap")
        self.db.execute("INSERT INTO claims VALUES (?,?,?,?) ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, "
                        "estimate_usd = excluded.estimate_usd, expires_at = excluded.expires_at",
                        (key, owner, estimate, now + lease_s))
        return Claim("claimed", billed_failures=billed, last_failure=failures[-1][1] if failures else None)

    @writes
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

    @writes
    def release(self, key: str, owner: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    @writes
    def release_all(self, owner: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    def record_success(self, key: str, model: str, request: dict, response: str, **kw) -> None:
        """The validated answer; also releases ``owner``'s claim and drops a raw response it was read from.
        Keywords: prompt_tokens, cached_tokens, completion_tokens, cost_usd, latency_s, owner."""
        self.together([("success", (key, model, request, response), kw)])

    def record_failure(self, key: str, reason: str, detail: str = "", **kw) -> None:
        """A failed attempt (``billed``: it may have been billed, charged at ``cost_usd``); releases the claim unless
        ``release=False``. Keywords: prompt_tokens, completion_tokens, cost_usd, billed, owner, release."""
        self.together([("failure", (key, reason, detail), kw)])

    def record_raw(self, key: str, model: str, request: dict, body: dict, **kw) -> None:
        """A paid response the client could not interpret: kept as received, so a rerun reads it instead of paying.
        Keywords: tokens (prompt, cached, completion), cost_usd, latency_s, owner."""
        self.together([("raw", (key, model, request, body), kw)])

    @writes
    def together(self, writes: list[tuple[str, tuple, dict]]) -> list:
        """Several writes in one transaction (``distill.ledger.group``), in order; their results. Each is
        ``(kind, args, kwargs)``: ``claim`` with the arguments of ``claim``, or ``success`` / ``failure`` /
        ``raw`` with those of ``record_<kind>``. All of them are in the file once this returns, or none is."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            return [self._WRITES[kind](self, *args, **kwargs) for kind, args, kwargs in writes]

    def _success(self, key: str, model: str, request: dict | str, response: str, *, prompt_tokens: int = 0,
                 cached_tokens: int = 0, completion_tokens: int = 0, cost_usd: float = 0.0, latency_s: float = 0.0,
                 owner: str | None = None) -> None:
        self.db.execute("INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (key, model, _canonical(request), response, prompt_tokens, cached_tokens,
                         completion_tokens, cost_usd, latency_s, time.time()))
        self._settled(key, owner)

    def _failure(self, key: str, reason: str, detail: str = "", *, prompt_tokens: int = 0,
                 completion_tokens: int = 0, cost_usd: float = 0.0, billed: bool = False, owner: str | None = None,
                 release: bool = True) -> None:
        self.db.execute(
            "INSERT INTO failures (key, reason, detail, prompt_tokens, completion_tokens, cost_usd, created_at, "
            "billed) VALUES (?,?,?,?,?,?,?,?)", (key, reason, detail[:500], prompt_tokens, completion_tokens,
                                                 cost_usd, time.time(), int(billed)))
        if release:
            self._settled(key, owner)

    def _raw(self, key: str, model: str, request: dict | str, body: dict, *, tokens: tuple[int, int, int],
             cost_usd: float, latency_s: float, owner: str | None = None) -> None:
        self.db.execute("INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (key, model, _canonical(request), json.dumps(body, ensure_ascii=False),
                         *tokens, cost_usd, latency_s, time.time()))
        if owner is not None:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    _WRITES = {"claim": _claim, "success": _success, "failure": _failure, "raw": _raw}

    def _settled(self, key: str, owner: str | None) -> None:
        self.db.execute("DELETE FROM responses WHERE key = ?", (key,))  # its cost moved to the row just written
        if owner is not None:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    @writes
    def record_hits(self, run: str, count: int) -> None:
        self.db.execute("INSERT INTO hits VALUES (?, ?) ON CONFLICT(run) DO UPDATE SET count = count + ?",
                        (run, count, count))

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
