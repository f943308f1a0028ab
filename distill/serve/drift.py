"""Drift alarms of a served task: live agreement with the teacher falling, and the student's answers changing.

    detector = AgreementDrift(target=0.98, margin=0.05)        # routing.yaml's target_agreement, serve.drift.margin
    change = detector.update(agreed)                            # "alarm" | "cleared" | None, one shadow comparison
    answers = AnswerDrift(reference_answers, enums, window=500)
    change = answers.update(student_answer)                     # a chi-square test every ``window`` answers

**Agreement** (the shadow stream: 1 when the student's kept answer equals the teacher's). river's ADWIN keeps a
window of the recent stream and cuts its older part as soon as the two parts' means differ more than chance allows
(``serve.drift.delta``); after a change the window holds only what came after it, so its mean is today's agreement,
not an average over the whole history. The alarm fires when the Wilson upper bound (at ``serve.drift.confidence``,
one-sided) of the window's agreement is below ``target_agreement - serve.drift.margin`` with at least
``serve.drift.min_samples`` comparisons in the window; it clears when the lower bound is back above that floor. A
stationary stream at or above the target has its upper bound above the floor at almost every step (the benchmark,
``benchmarks/drift.py``, counts false alarms on 5,000 requests).

**Answers** (input drift seen through the student): the student's answers per enum field over a window of
``serve.drift.answer_window`` requests against its answers on the run's held-out items (evaluate's predictions):
scipy's chi-square test of homogeneity on the two count vectors (a two-sample test: the held-out sample's own noise
is not mistaken for drift), Bonferroni-corrected over the fields, alarm below ``serve.drift.answer_p_value``; it
clears when a later window passes.

An alarm is a log line (the caller's), a metric and one line in ``serve/events.jsonl`` (``append_event``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from river.drift import ADWIN
from scipy.stats import chi2_contingency, norm

EVENTS = "events.jsonl"
_events_lock = threading.Lock()


def wilson(successes: float, n: float, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion, each bound one-sided at ``confidence``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z = norm.ppf(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


class AgreementDrift:
    """ADWIN over the 0/1 agreement stream, alarmed by a bound on its window's mean (module docstring)."""

    def __init__(self, target: float, margin: float, *, delta: float = 0.002, confidence: float = 0.99,
                 min_samples: int = 30):
        self.floor = target - margin
        self.confidence, self.min_samples = confidence, min_samples
        self.adwin = ADWIN(delta=delta, clock=1)  # look for a cut after every comparison: they are few and cheap
        self.active = False
        self.seen = 0

    @property
    def window(self) -> int:
        return int(self.adwin.width)

    @property
    def agreement(self) -> float | None:
        return float(self.adwin.estimation) if self.adwin.width else None

    def bounds(self) -> tuple[float, float]:
        """(low, high) of the window's agreement at the configured confidence."""
        width = self.adwin.width
        return wilson(self.adwin.estimation * width, width, self.confidence)

    def update(self, agreed: bool) -> str | None:
        """Add one comparison; returns ``"alarm"`` or ``"cleared"`` when the state changes, else None."""
        self.adwin.update(1.0 if agreed else 0.0)
        self.seen += 1
        if self.adwin.width < self.min_samples:
            return None
        low, high = self.bounds()
        if not self.active and high < self.floor:
            self.active = True
            return "alarm"
        if self.active and low >= self.floor:
            self.active = False
            return "cleared"
        return None

    def detail(self) -> dict:
        low, high = self.bounds()
        return {"agreement": _round(self.agreement), "low": round(low, 4), "high": round(high, 4),
                "window": self.window, "floor": round(self.floor, 4), "comparisons": self.seen}


class AnswerDrift:
    """The student's answer distribution per enum field, window by window, against a reference (docstring)."""

    def __init__(self, reference: Sequence[dict], enums: dict[str, list[Any]], *, window: int = 500,
                 p_value: float = 1e-4):
        self.window, self.p_value = window, p_value
        self.fields = [f for f in enums if any(isinstance(r, dict) and f in r for r in reference)]
        self.values = {f: [_key(v) for v in enums[f]] for f in self.fields}
        self.expected: dict[str, list[int]] = {}
        for f in self.fields:
            counts = Counter(_key(r.get(f)) for r in reference if isinstance(r, dict))
            self.expected[f] = [counts.get(v, 0) for v in self.values[f]]
        self.current: dict[str, Counter] = {f: Counter() for f in self.fields}
        self.n = 0
        self.active = False
        self.last: dict = {}

    def update(self, answer: dict | None) -> str | None:
        """Count one student answer; at the end of a window, test it. Returns "alarm" / "cleared" / None."""
        if not self.fields or not isinstance(answer, dict):
            return None
        for f in self.fields:
            value = _key(answer.get(f))
            if value in self.values[f]:
                self.current[f][value] += 1
        self.n += 1
        if self.n < self.window:
            return None
        p_values = {f: self._test(f) for f in self.fields}
        self.current = {f: Counter() for f in self.fields}
        self.n = 0
        worst = min(p_values, key=p_values.get)
        self.last = {"field": worst, "p_value": float(f"{p_values[worst]:.3g}"), "window": self.window,
                     "level": self.p_value / len(self.fields)}
        drifted = p_values[worst] < self.p_value / len(self.fields)
        if drifted != self.active:
            self.active = drifted
            return "alarm" if drifted else "cleared"
        return None

    def _test(self, f: str) -> float:
        observed = [self.current[f].get(v, 0) for v in self.values[f]]
        if sum(observed) == 0:
            return 1.0
        # two samples, both with their noise: a value neither gave carries no information and is left out
        table = [(o, e) for o, e in zip(observed, self.expected[f]) if o or e]
        if len(table) < 2:
            return 1.0
        return float(chi2_contingency([[o for o, _ in table], [e for _, e in table]], correction=False).pvalue)

    def detail(self) -> dict:
        return dict(self.last)


def append_event(serve_dir: Path, event: str, **fields: Any) -> dict:
    """One line in ``serve/events.jsonl``: ``{"ts", "event", ...}`` (drift alarms, clearings, reloads)."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    serve_dir.mkdir(parents=True, exist_ok=True)
    with _events_lock, open(serve_dir / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return record


def read_events(serve_dir: Path) -> list[dict]:
    """Every event of ``serve/events.jsonl`` in order ([] without the file); unreadable lines are skipped."""
    path = serve_dir / EVENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
