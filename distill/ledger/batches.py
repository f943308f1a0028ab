"""The Batch API's submissions in the ledger: claimed, uploaded, created and joined, each in one transaction.

    python -m distill generate recipe=support_tickets teacher=openai generate.mode=batch

``BatchRecords`` is the part of ``Ledger`` that ``distill.teacher.batch`` uses; see that module for the protocol.
"""

from __future__ import annotations

import itertools
import json
import time

from distill import runio
from distill.ledger.db import OPEN_BATCH, writes


class BatchRecords:
    """Batch submissions, their ids and their lines (a base of ``Ledger``: uses its connection and lock)."""

    # -- batches --------------------------------------------------------------------------------------------------

    def batch(self, submission: str) -> dict | None:
        row = self.db.execute("SELECT batch_id, input_file_id, status, owner, claim_expires_at FROM batches "
                              "WHERE submission = ?", (submission,)).fetchone()
        return None if row is None else {"batch_id": row[0], "input_file_id": row[1], "status": row[2],
                                         "owner": row[3], "claim_expires_at": row[4]}

    def keys_in_open_batches(self) -> set[str]:
        return {r[0] for r in self.db.execute(f"SELECT key FROM batch_lines WHERE submission IN "
                                              f"(SELECT submission FROM batches WHERE status IN {OPEN_BATCH})")}

    @writes
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

    @writes
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

    @writes
    def record_batch(self, submission: str, *, input_file_id: str | None = None, batch_id: str | None = None,
                     status: str) -> None:
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE batches SET batch_id = COALESCE(?, batch_id), "
                            "input_file_id = COALESCE(?, input_file_id), status = ? WHERE submission = ?",
                            (batch_id, input_file_id, status, submission))
            if batch_id:
                self.db.execute("INSERT OR IGNORE INTO batch_ids VALUES (?,?,?)", (submission, batch_id, time.time()))

    @writes
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
