"""The hard cap on teacher spend (``generate.budget_usd``), counted over the whole ledger.

Every paid request is admitted at its upper-bound price (3 characters per token, every completion token used) and
settled at what it really cost. A request is admitted only if what the ledger already holds, what is in flight and
its own upper bound fit under the cap; when they do not, it waits for the requests in flight to settle before
deciding. So the cap is never crossed, and the run stops short of it by less than one request's upper bound. The
spend already in the ledger counts, so a rerun with the same cap continues where the last one stopped and a higher
cap buys exactly the difference.
"""

from __future__ import annotations

import asyncio


class Budget:
    def __init__(self, cap: float | None, already_spent: float = 0.0):
        self.cap = cap
        self.spent = already_spent
        self.already_spent = already_spent
        self.reserved = 0.0
        self.in_flight = 0
        self.stopped = False
        self._cond: asyncio.Condition | None = None
        self._loop = None

    @property
    def spent_this_run(self) -> float:
        return self.spent - self.already_spent

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()  # one Budget may serve several event loops in turn (synthesis, labels)
        if self._cond is None or self._loop is not loop:
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    async def admit(self, estimate: float) -> bool:
        """Wait until the request fits under the cap or nothing is left in flight; False once the cap is reached."""
        if self.cap is None:
            self.in_flight += 1
            return True
        cond = self._condition()
        async with cond:
            while not self.stopped:
                if self.spent + self.reserved + estimate <= self.cap:
                    self.reserved += estimate
                    self.in_flight += 1
                    return True
                if self.in_flight == 0:
                    self.stopped = True
                    break
                await cond.wait()
            return False

    def try_admit(self, estimate: float) -> bool:
        """Admit without waiting (a batch is assembled before anything in it is paid)."""
        if self.cap is not None and (self.stopped or self.spent + self.reserved + estimate > self.cap):
            self.stopped = True
            return False
        self.reserved += estimate if self.cap is not None else 0.0
        self.in_flight += 1
        return True

    async def settle(self, estimate: float, actual: float) -> None:
        if self.cap is None:
            self.spent += actual
            self.in_flight -= 1
            return
        cond = self._condition()
        async with cond:
            self.spent += actual
            self.reserved = max(0.0, self.reserved - estimate)
            self.in_flight -= 1
            cond.notify_all()
