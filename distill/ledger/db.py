"""The ledger's SQLite layer: its tables, how an older file is brought up to date, and what a failed write means.

    sqlite3 generate/ledger.sqlite '.schema'
"""

from __future__ import annotations

import functools
import sqlite3

from distill import LedgerWriteError

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


def migrate(db: sqlite3.Connection) -> None:
    """Create the tables, add the columns newer versions added, and the spend triggers (one transaction)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        if db.execute("SELECT COUNT(*) FROM totals").fetchone()[0] == 0:
            db.execute("INSERT INTO totals VALUES (0, (SELECT COALESCE(SUM(cost_usd), 0) FROM calls) + "
                       "(SELECT COALESCE(SUM(cost_usd), 0) FROM failures) + "
                       "(SELECT COALESCE(SUM(cost_usd), 0) FROM responses))")
        for statement in _TRIGGERS.split("END;"):
            if statement.strip():
                db.execute(statement + "END;")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


def writes(method):
    """A ledger write that fails is fatal for the run, with one line that says what to do."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
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
