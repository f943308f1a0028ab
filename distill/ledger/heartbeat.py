"""Lease renewal: a live owner's claims never expire while its process runs."""

from __future__ import annotations

import sqlite3
import threading
import time

from distill.ledger.store import Ledger


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
