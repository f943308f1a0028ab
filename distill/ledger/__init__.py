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

Writes from the event loop are group-committed (``group``): every claim and record queued in one turn of the loop
goes into one transaction, and each caller goes on only once its write is committed, so a call is sent only after
its claim is in the file and an answer is handed on (to the dataset, to a gateway's caller) only after its row is.

What a ``kill -9`` can lose: the answers of the calls in flight at that moment (paid, and never received, or
received and not yet committed; none of them was handed on), at most ``teacher.concurrency`` of them; their claims
expire after the lease and the keys are paid for again by the next run.

    python -m distill ledger run_dir=DIR      # calls, tokens, dollars, cache hits, failures by reason

Where each part lives: ``db`` (the tables, their migration, the write-error rule), ``store`` (``Ledger``: look-ups,
claims, records, reporting), ``group`` (group commit), ``batches`` (the Batch API's submissions), ``heartbeat``
(lease renewal).
"""

from distill import LedgerWriteError
from distill.ledger.group import GroupCommit, grouped
from distill.ledger.heartbeat import Heartbeat
from distill.ledger.store import Claim, Ledger, new_owner, request_key

__all__ = ["Claim", "GroupCommit", "Heartbeat", "Ledger", "LedgerWriteError", "grouped", "new_owner", "request_key"]
