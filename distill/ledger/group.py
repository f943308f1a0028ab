"""Group commit: the ledger writes of one turn of the event loop (claims and records) in one SQLite transaction.

    group = grouped(ledger)                       # this ledger's group in the running loop
    claim = await group.add(("claim", (key, owner, estimate), {"cap": cap, "lease_s": 30.0}))
    await group.add(("success", (key, model, request, text), {"owner": owner, ...}))   # back once committed

A paid call is claimed in one transaction and recorded in another (rules 1 and 3 of ``distill.ledger``); at 64
calls in flight, a commit each was most of the ledger's cost. ``add`` queues a write and waits: the queue is
written at the end of the current turn of the loop (``loop.call_soon``), all of it in one transaction, in order, so
every call that claimed or finished in that turn shares one commit and none waits for a timer. Each write sees the
ones before it (a second claim of one key in a group finds it held; the cap counts the group's earlier claims).

What a ``kill -9`` can lose is unchanged: ``add`` returns only after the commit, so a call is sent only once its
claim is in the file, and the client hands an answer on (to the dataset, to the gateway's caller) only after its
record is. A record still queued at the kill belongs to a call still in flight: those answers, at most
``teacher.concurrency``, were paid and never handed on; their claims expire after the lease and the next run pays
for them again. A write that fails fails every write of its group with ``LedgerWriteError``, as a lone write would.
"""

from __future__ import annotations

import asyncio
import weakref

from distill.ledger.store import Ledger


def grouped(ledger: Ledger) -> "GroupCommit":
    """``ledger``'s ``GroupCommit`` for the running event loop (one per ledger and loop)."""
    loop = asyncio.get_running_loop()
    last = ledger.__dict__.get("_group")
    if last is not None and last.loop is loop:  # the common case: one loop uses the ledger
        return last
    groups = ledger.__dict__.setdefault("_groups", weakref.WeakKeyDictionary())
    group = groups.get(loop)
    if group is None:
        group = groups[loop] = GroupCommit(ledger, loop)
    ledger.__dict__["_group"] = group
    return group


class GroupCommit:
    """Writes of one event loop, committed together (see the module docstring). One instance per loop."""

    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop | None = None):
        self.ledger = ledger
        self.loop = loop
        self._queue: list[tuple] = []
        self._futures: list[asyncio.Future] = []
        self._scheduled = False
        self.commits = 0   # transactions written
        self.writes = 0    # writes in them

    async def add(self, write: tuple[str, tuple, dict]):
        """Queue one write, ``(kind, args, kwargs)`` as ``Ledger.together`` takes it; its result, once the
        transaction holding it is committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(write)
        self._futures.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)
        return await future  # a caller cancelled here leaves its write queued: it is still made

    def flush(self) -> None:
        """Write everything queued now, in one transaction (also called on close, so nothing queued is dropped)."""
        self._scheduled = False
        queue, futures = self._queue, self._futures
        if not queue:
            return
        self._queue, self._futures = [], []
        try:
            results = self.ledger.together(queue)
        except Exception as exc:  # LedgerWriteError: every call of the group stops, as a lone write would
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        self.commits += 1
        self.writes += len(queue)
        for future, result in zip(futures, results):
            if not future.done():
                future.set_result(result)
