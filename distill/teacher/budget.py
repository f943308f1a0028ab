"""The hard cap on teacher spend (``generate.budget_usd``), counted over the whole ledger and shared by every process.

The cap is never crossed, however many processes share the ledger. Every paid attempt is admitted at its upper-bound
price (every prompt byte a token, every completion token used: ``pricing.prompt_token_bound``) by a claim in the
ledger, granted only while what the ledger records + what every process has reserved + this bound fit under the
cap (``Ledger.claim``, one transaction). It is settled at what it really cost when the claim is released; a failure
that may have been billed settles at its bound. When the bound does not fit but something is still in flight
(anywhere), the request waits for that to settle before deciding; when nothing is in flight, the run stops short of
the cap by less than one request's bound. The spend already in the ledger counts, so a rerun with the same cap
continues where the last one stopped and a higher cap buys exactly the difference.
"""

from __future__ import annotations

import asyncio
import contextlib

from distill.ledger import Claim, Heartbeat, Ledger, LedgerWriteError, grouped, new_owner

LEASE_S = 30.0  # how long a claim outlives a silent owner; the heartbeat renews it every LEASE_S / 4


class Budget:
    def __init__(self, cap: float | None, ledger: Ledger, *, max_billed: int | None = None,
                 lease_s: float = LEASE_S, owner: str | None = None):
        self.cap = cap
        self.ledger = ledger
        self.max_billed = max_billed
        self.lease_s = lease_s
        self.owner = owner or new_owner()
        self.spent_this_run = 0.0  # dollars this process paid (answers and possibly billed failures)
        self.stopped = False       # the cap was reached with nothing in flight: ask for nothing more
        self._heartbeat: Heartbeat | None = None  # renews this owner's claims; started with the first one

    def __enter__(self) -> "Budget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop renewing, and free every key this owner still holds (a stopped run's keys need not wait out a lease)."""
        if self._heartbeat is not None:
            self._heartbeat.__exit__()
            self._heartbeat = None
        with contextlib.suppress(LedgerWriteError):
            self.ledger.release_all(self.owner)

    @property
    def spent(self) -> float:
        """Every dollar the shared ledger records, from every run."""
        return self.ledger.spent()

    async def claim(self, key: str, estimate: float) -> Claim:
        """The ledger's answer for ``key``, or the right to pay for it (waits while another process holds the key
        or while the cap is full of reservations in flight)."""
        delay = 0.005
        while True:
            if self.stopped:
                return self._lookup(key)
            # committed with every other ledger write of this turn of the loop (distill.ledger.group)
            claim = await grouped(self.ledger).add(("claim", (key, self.owner, estimate), {
                "cap": self.cap, "lease_s": self.lease_s, "max_billed": self.max_billed}))
            if claim.status == "over_cap":
                self.stopped = True
            if claim.status == "claimed" and self._heartbeat is None:
                self._heartbeat = Heartbeat(self.ledger, self.owner, self.lease_s).__enter__()
            if claim.status not in ("busy", "wait"):
                return claim
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def readmit(self, key: str, estimate: float) -> str:
        """Before a retry of a claimed key: 'ok', 'over_cap' or 'exhausted'. Waits while the cap is full of
        reservations that may still settle below their bound."""
        delay = 0.005
        while True:
            status = self.ledger.readmit(key, self.owner, estimate, cap=self.cap, lease_s=self.lease_s,
                                         max_billed=self.max_billed)
            if status != "over_cap" or self.ledger.reserved(except_key=key)[1] == 0:
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def charged(self, usd: float) -> None:
        self.spent_this_run += usd

    def _lookup(self, key: str) -> Claim:
        if (row := self.ledger.get(key)) is not None:
            return Claim("hit", row)
        if (raw := self.ledger.raw(key)) is not None:
            return Claim("raw", raw)
        return Claim("over_cap")
