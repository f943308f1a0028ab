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

**Inputs** (``serve.drift.inputs``, opt-in: it loads the packaged MiniLM into the gateway): each input's cosine
distance to its nearest training input (``nearest_distances``), window by window (``serve.drift.input_window``),
against a reference: the val split's distances to the train split (``input_reference``; with fewer than
``serve.drift.min_val_items`` val items, each train input's distance to its nearest other one). scipy's two-sample
Kolmogorov-Smirnov test, one-sided (``alternative="less"``: the live distances' CDF below the reference's, i.e. the
inputs farther from what the student was trained on; inputs closer to it are not drift), alarm below
``serve.drift.input_p_value``; it clears when a later window passes. The reference is computed once per run and
data (``serve/input_reference.npz``, keyed by the splits' and the encoder's hashes), off the event loop, and the
live embeddings in a thread, in batches of whatever arrived meanwhile: the request path only appends the text.

An alarm is a log line (the caller's), a metric and one line in ``serve/events.jsonl`` (``append_event``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from river.drift import ADWIN
from scipy.stats import chi2_contingency, ks_2samp, norm

from distill import paths, runio

log = logging.getLogger("distill")

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


class InputDrift:
    """Live inputs' nearest-training-input distances, window by window, against a reference (module docstring)."""

    def __init__(self, reference: Sequence[float], *, window: int = 200, p_value: float = 1e-4,
                 source: str = "val"):
        self.reference = np.asarray(reference, dtype=np.float64)
        self.window, self.p_value, self.source = window, p_value, source
        self.current: list[float] = []
        self.active = False
        self.seen = 0
        self.last: dict = {}

    def update(self, distance: float) -> str | None:
        """Add one input's distance; at the end of a window, test it. Returns "alarm" / "cleared" / None."""
        self.current.append(float(distance))
        self.seen += 1
        if len(self.current) < self.window:
            return None
        live, self.current = np.asarray(self.current), []
        test = ks_2samp(live, self.reference, alternative="less")
        self.last = {"p_value": float(f"{test.pvalue:.3g}"), "statistic": round(float(test.statistic), 4),
                     "median_distance": round(float(np.median(live)), 4),
                     "reference_median": round(float(np.median(self.reference)), 4), "window": self.window,
                     "reference": self.source, "level": self.p_value, "inputs": self.seen}
        drifted = test.pvalue < self.p_value
        if drifted != self.active:
            self.active = drifted
            return "alarm" if drifted else "cleared"
        return None

    def detail(self) -> dict:
        return dict(self.last)


def nearest_distances(queries: np.ndarray, train: np.ndarray, *, leave_one_out: bool = False,
                      chunk: int = 1024) -> np.ndarray:
    """Cosine distance (1 - similarity, unit vectors) of each query to its nearest ``train`` row; with
    ``leave_one_out`` the queries are ``train`` itself and each row's own match is skipped. Exact search in
    chunks (a few thousand training inputs: a matrix product, no index needed)."""
    if len(train) == 0 or len(queries) == 0:
        return np.zeros(len(queries))
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ train.T
        if leave_one_out:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        out[start:start + chunk] = 1.0 - sims.max(axis=1)
    return np.clip(out, 0.0, 2.0)


@dataclass
class InputReference:
    """The training inputs' embeddings and the reference distances the live ones are tested against."""

    train: np.ndarray
    distances: np.ndarray
    source: str           # "val" (val -> train) or "train" (train leave-one-out, too few val items)


REFERENCE_FILE = "input_reference.npz"


def input_reference(run_dir: Path, embedder: Callable[[list[str]], np.ndarray], *, encoder_id: str,
                    min_val_items: int, cache_dir: Path | None = None) -> InputReference | None:
    """The run's train embeddings and val->train distances (train leave-one-out below ``min_val_items`` val
    items), read from ``cache_dir/input_reference.npz`` when it was built from the same splits and encoder.
    None when the run has fewer than two training inputs."""
    train_file, val_file = paths.split_path(run_dir, "train"), paths.split_path(run_dir, "val")
    key = runio.sha256_obj({"train": runio.sha256_file(train_file) if train_file.is_file() else None,
                            "val": runio.sha256_file(val_file) if val_file.is_file() else None,
                            "encoder": encoder_id})
    cached = cache_dir / REFERENCE_FILE if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                if str(npz["key"]) == key:
                    return InputReference(npz["train"], npz["distances"], str(npz["source"]))
        except (OSError, KeyError, ValueError):
            pass  # rebuilt below
    train_texts = [r["input"] for r in runio.read_jsonl(train_file)] if train_file.is_file() else []
    val_texts = [r["input"] for r in runio.read_jsonl(val_file)] if val_file.is_file() else []
    if len(train_texts) < 2:
        return None
    train = np.asarray(embedder(train_texts), dtype=np.float32)
    if len(val_texts) >= min_val_items:
        ref = InputReference(train, nearest_distances(np.asarray(embedder(val_texts), dtype=np.float32), train), "val")
    else:
        ref = InputReference(train, nearest_distances(train, train, leave_one_out=True), "train")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.npz")
        np.savez(tmp, key=np.array(key), train=ref.train, distances=ref.distances, source=np.array(ref.source))
        os.replace(tmp, cached)
    return ref


INPUT_PENDING = 1024  # inputs waiting to be embedded for the input-drift test; more are skipped (counted)
ENCODER_ID = "all-MiniLM-L6-v2"  # the packaged encoder input drift uses (part of its reference's cache key)


def input_embedder() -> Callable[[list[str]], np.ndarray]:
    """The packaged MiniLM as ``texts -> unit vectors`` (the semantic cache's encoder)."""
    from distill.serve.cache import default_embedder  # loads torch on first use, only with serve.drift.inputs

    return default_embedder()


class InputWatch:
    """``InputDrift`` fed from the gateway without waiting: ``offer`` only appends the text (at most
    ``INPUT_PENDING`` wait; more are skipped and counted); one background task embeds whatever has arrived, in a
    thread, and reports each state change to ``on_change(kind, change, detail)``. The reference is built (or read
    from ``serve/input_reference.npz``) in a thread at ``start``; inputs wait until it is ready."""

    def __init__(self, run_dir: Path, serve_dir: Path, name: str, window: int, p_value: float, min_val_items: int,
                 *, on_change: Callable, embedder: Callable[[list[str]], np.ndarray] | None = None,
                 encoder_id: str = ENCODER_ID):
        self.run_dir, self.serve_dir, self.name = run_dir, serve_dir, name
        self.window, self.p_value, self.min_val_items = window, p_value, min_val_items
        self.on_change, self.embedder, self.encoder_id = on_change, embedder, encoder_id
        self.drift: InputDrift | None = None
        self.pending: list[str] = []
        self.skipped = 0
        self._train: np.ndarray | None = None
        self._tasks: set[asyncio.Task] = set()
        self._embedding: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return bool(self.drift and self.drift.active)

    def offer(self, text: str) -> None:
        """Queue one input for the test (never waits)."""
        if len(self.pending) >= INPUT_PENDING:
            self.skipped += 1
            return
        self.pending.append(text)
        if self.drift is not None and (self._embedding is None or self._embedding.done()):
            self._embedding = self._spawn(self._embed(), "distill-input-drift")

    def start(self) -> None:
        """Build the reference in the background (on the running loop)."""
        if not self._tasks and self.drift is None:
            self._spawn(self._load(), "distill-input-reference")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load(self) -> None:
        try:
            self.embedder = self.embedder or await asyncio.to_thread(input_embedder)
            ref = await asyncio.to_thread(input_reference, self.run_dir, self.embedder, encoder_id=self.encoder_id,
                                          min_val_items=self.min_val_items, cache_dir=self.serve_dir)
        except Exception as exc:  # no input-drift test, but the gateway serves on
            log.error("serve: no input-drift test for %s: %s", self.name, exc)
            return
        if ref is None:
            log.info("serve: no input-drift test for %s: fewer than two training inputs", self.name)
            return
        self._train = ref.train
        self.drift = InputDrift(ref.distances, window=self.window, p_value=self.p_value, source=ref.source)
        log.info("serve: input drift for %s: %d training inputs, reference %s (%d distances, median %.3f), "
                 "windows of %d", self.name, len(ref.train), ref.source, len(ref.distances),
                 float(np.median(ref.distances)), self.window)
        await self._embed()

    async def _embed(self) -> None:
        while self.pending:
            texts, self.pending = self.pending, []
            try:
                distances = await asyncio.to_thread(self._distances, texts)
            except Exception as exc:  # a failed batch is skipped, never the gateway
                log.warning("serve: input-drift embeddings of %d inputs failed: %s", len(texts), exc)
                self.skipped += len(texts)
                continue
            for distance in distances:
                self.on_change("inputs", self.drift.update(float(distance)), self.drift.detail)

    def _distances(self, texts: list[str]) -> np.ndarray:
        return nearest_distances(np.asarray(self.embedder(texts), dtype=np.float32), self._train)


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
