"""``serve.teacher_budget_usd_per_day``: the gateway's teacher spend per UTC day, capped across replicas.

    budget = DailyBudget(store, cap_usd=5.0)
    hold = budget.reserve(bound_usd)      # None: the day's cap is reached; the teacher is not asked
    ...                                   # the teacher call
    budget.settle(hold, cost_usd)         # the reservation becomes what the call really cost

The day's spend is one store counter (``teacher.spend.<YYYY-MM-DD>``), so every gateway sharing the store (SQLite
on one machine, Redis across machines) adds to the same total. A call is admitted at its upper-bound price
(``TeacherClient.estimate``, ``pricing.upper_bound_usd``, times the votes and attempts it may take): the increment
and the check are one atomic ``incr``, so concurrent calls never take the day past the cap; a refused reservation
is taken back at once. An answer already in the ledger costs nothing and is served whatever the day's spend.
Without a cap (``cap_usd`` None) nothing is reserved: the gateway only settles what each call cost (``settle(None,
cost)``), so the day's total is still counted, without two store writes on every fallback.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Callable

from distill.serve.store import StoreError

log = logging.getLogger("distill")


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d")


def seconds_to_midnight(now: dt.datetime | None = None) -> int:
    """Seconds until the next UTC day (a Retry-After for a spent budget)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()) + 1)


@dataclass(frozen=True)
class Hold:
    key: str
    usd: float


class DailyBudget:
    """Reservations against the day's cap in the store (module docstring). ``cap_usd`` None: no cap, spend counted."""

    def __init__(self, store, cap_usd: float | None, clock: Callable[[], str] = utc_day):
        self.store, self.cap, self.clock = store, cap_usd, clock

    def key(self) -> str:
        return f"teacher.spend.{self.clock()}"

    def spent_today(self) -> float:
        key = self.key()
        try:
            return self.store.counters(key).get(key, 0.0)
        except StoreError as exc:
            log.warning("serve: the teacher budget was not read: %s", exc)
            return 0.0

    def reserve(self, usd: float) -> Hold | None:
        """Admit a call at ``usd`` (its upper bound), or None when that would take the day past the cap.

        A store that cannot be reached refuses (None) when a cap is set: the cap is never crossed unseen."""
        key = self.key()
        try:
            total = self.store.incr(key, usd)
            if self.cap is not None and total > self.cap + 1e-12:
                self.store.incr(key, -usd)
                return None
        except StoreError as exc:
            log.warning("serve: the teacher budget could not be counted: %s", exc)
            return None if self.cap is not None else Hold(key, 0.0)
        return Hold(key, usd)

    def settle(self, hold: Hold | None, cost_usd: float) -> None:
        """Replace the reservation by what the call cost (``hold`` None: add ``cost_usd`` to today's spend)."""
        key, held = (hold.key, hold.usd) if hold is not None else (self.key(), 0.0)
        if abs(cost_usd - held) < 1e-15:
            return
        try:
            self.store.incr(key, cost_usd - held)
        except StoreError as exc:
            log.warning("serve: the teacher spend of a call was not counted: %s", exc)
