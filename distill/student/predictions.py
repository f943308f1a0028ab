"""What every student predictor returns, aligned with the rows it answered, and how two answer lists compare.

In-process (distill.student.predict) and served (distill.student.endpoint) predictors return the same
``Predictions``: a bad answer or a failed request is counted by reason, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

DOWN = ("connection_error", "timeout")   # the endpoint could not be reached at all
TRANSPORT = (*DOWN, "bad_response", "not_sent_endpoint_down")  # no answer came back to parse


def answered(reason: str | None) -> bool:
    """Whether a response came back (valid or not): not a transport failure and not an HTTP error."""
    return reason not in TRANSPORT and not str(reason).startswith("http_")


@dataclass
class Predictions:
    """One predictor's answers to a list of rows, aligned with the rows."""

    answers: list[dict | None]
    raw: list[str]
    invalid_reason: list[str | None]
    confidence: list[float | None]   # probability of the whole answer, 0..1 (None: no answer or no logprobs)
    latency_s: list[float]           # seconds until this item's answer was ready (its batch or its request)
    failures: dict[str, int]         # counts by reason: transport errors and invalid answers
    field_confidence: list[dict | None] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def items_per_s(self) -> float | None:
        """Answers that came back per second (requests that never got a response do not count)."""
        n = sum(answered(r) for r in self.invalid_reason)
        return round(n / self.wall_s, 4) if self.wall_s > 0 and n else None


def agreement(a: list[dict | None], b: list[dict | None]) -> float:
    """Share of items whose whole answers are equal; None never equals anything (not even None)."""
    if len(a) != len(b):
        raise ValueError(f"agreement needs aligned lists, got {len(a)} and {len(b)} items")
    if not a:
        return 0.0
    return sum(x is not None and y is not None and x == y for x, y in zip(a, b)) / len(a)


def count_reasons(reasons: Iterable[str | None]) -> dict[str, int]:
    """How many items failed for each reason (None: no failure, not counted)."""
    out: dict[str, int] = {}
    for r in reasons:
        if r:
            out[r] = out.get(r, 0) + 1
    return out
