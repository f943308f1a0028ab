"""The gateway's answer caches, both kept in the store (distill.serve.store) so gateway replicas share them.

**Exact** (``serve.exact_cache.enabled=true``; off by default, so repeats reach the ledger as before): the key is a sha256 over the whole request fingerprint: the task,
the normalized input, the student's and the teacher's prompts as the gateway builds them, every other field of the
request (every generation parameter, the other messages, metadata; not ``stream``, which changes only the framing),
the generation settings of the student and the teacher, the routing rule's hash and the served artifact's sha256.
A changed rule or artifact changes every key, so a republished run never answers from the old one's entries. A hit
returns the answer with the route, reason and confidence it was first served with, marked ``x-distill-cache: exact``.
Only full answers are kept (a student answer kept because the teacher was down is not).

**Semantic** (``serve.semantic_cache``, opt-in): a teacher answer is reused for a new input whose MiniLM embedding
has cosine similarity >= the calibrated threshold with an input the teacher already answered (serve only consults it
where the teacher would be asked). Entries are appended to a store stream; every replica keeps an in-memory index in
step with that stream, exact numpy search below ``CROSSOVER`` entries and a usearch HNSW index above it (the
crossover measured by benchmarks/semantic_cache.py). Entries older than ``ttl_s`` are not served; the stream is cut
to ``max_entries``. The threshold comes from ``serve/cache_calibration.json`` (``python -m distill calibrate-cache``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np

from distill import DistillError

log = logging.getLogger("distill")

CACHE_CALIBRATION = "cache_calibration.json"
CROSSOVER = 20_000          # entries above which HNSW (usearch) beats exact numpy search on 2 cores
_UNKEYED = frozenset({"stream", "stream_options"})
PLACEHOLDER = "\x00input\x00"


def normalize_input(text: str) -> str:
    """The input as keyed: Unicode NFC, CRLF as LF, trailing spaces of each line and the ends stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def route_digest(cfg, rule, artifact_sha256: str | None) -> str:
    """What every key of one served task shares: the rule's hash, the artifact and the generation settings."""
    teacher = cfg.teacher.model_dump(mode="json", exclude={"timeout_s", "max_retries", "api_key_env"})
    g = cfg.generate
    return _digest({"task": rule.task.id, "rule": _digest(rule.model_dump(mode="json")),
                    "artifact": artifact_sha256, "student": {"model": cfg.serve.student_model or rule.student.model,
                                                             "endpoint": cfg.serve.student_endpoint,
                                                             "confidence": cfg.serve.confidence,
                                                             "max_new_tokens": cfg.eval.max_new_tokens},
                    "teacher": teacher, "generate": {"max_attempts": g.max_attempts, "votes": g.self_consistency,
                                                     "min_vote_share": g.min_vote_share, "redact": g.redact_pii}})


class ExactCache:
    """Answers by request fingerprint (see the module docstring)."""

    def __init__(self, store, base: str, ttl_s: float, task=None):
        self.store, self.ttl_s = store, ttl_s
        # The prompts are a function of the input: keying their templates (rendered around a placeholder) and the
        # normalized input covers them, and inputs that normalize alike share an entry.
        prompts = ({"student": task.student_messages(PLACEHOLDER), "teacher": task.teacher_messages(PLACEHOLDER)}
                   if task is not None else None)
        self.base = _digest({"route": base, "prompts": prompts})

    def key(self, request: dict, text: str) -> str:
        messages = list(request.get("messages") or [])
        last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                        default=None)
        if last_user is not None:  # the task input is keyed normalized; every other message verbatim
            messages[last_user] = {**messages[last_user], "content": None}
        params = {k: v for k, v in request.items() if k not in _UNKEYED and k != "messages"}
        return _digest({"base": self.base, "input": normalize_input(text), "messages": messages, "params": params})

    def get(self, key: str) -> dict | None:
        text = self.store.get(f"exact:{key}")
        return json.loads(text) if text else None

    def put(self, key: str, answer: dict, route: str, reason: str, confidence: float | None) -> None:
        value = {"answer": answer, "route": route, "reason": reason, "confidence": confidence}
        self.store.put(f"exact:{key}", json.dumps(value, ensure_ascii=False), ttl_s=self.ttl_s)


class VectorIndex:
    """Inner-product search over unit vectors: exact numpy below ``crossover`` entries, usearch HNSW from there on."""

    def __init__(self, dim: int, crossover: int = CROSSOVER):
        self.dim, self.crossover = dim, crossover
        self._vecs = np.zeros((0, dim), dtype=np.float32)
        self._n = 0
        self._hnsw = None

    def __len__(self) -> int:
        return self._n

    def add(self, vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32).reshape(-1, self.dim)
        need = self._n + len(vecs)
        if need > len(self._vecs):  # amortised growth: a copy per doubling, not per entry
            grown = np.zeros((max(need, 2 * len(self._vecs), 64), self.dim), dtype=np.float32)
            grown[:self._n] = self._vecs[:self._n]
            self._vecs = grown
        self._vecs[self._n:need] = vecs
        if self._hnsw is not None:
            self._hnsw.add(np.arange(self._n, need), vecs, threads=1)
        elif need >= self.crossover:
            self._hnsw = _hnsw(self.dim)
            self._hnsw.add(np.arange(need), self._vecs[:need], threads=1)
        self._n = need

    def search(self, query: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(ids, similarities) of the ``k`` nearest entries, most similar first."""
        if self._n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        query = np.asarray(query, dtype=np.float32).reshape(self.dim)
        k = min(k, self._n)
        if self._hnsw is not None:
            found = self._hnsw.search(query, k)
            ids = np.asarray(found.keys, dtype=np.int64)
            return ids, 1.0 - np.asarray(found.distances, dtype=np.float32)  # usearch "ip" distance is 1 - dot
        sims = self._vecs[:self._n] @ query
        ids = np.argpartition(-sims, k - 1)[:k] if k < self._n else np.arange(self._n)
        ids = ids[np.argsort(-sims[ids], kind="stable")]
        return ids, sims[ids]


def _hnsw(dim: int):
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)


def default_embedder() -> Callable[[list[str]], np.ndarray]:
    try:
        from distill.data.embed import embed
    except ImportError:
        from distill.embed import embed
    return lambda texts: embed(texts, batch_size=32)


class SemanticCache:
    """Teacher answers reused for near-identical inputs (see the module docstring)."""

    def __init__(self, store, base: str, threshold: float, ttl_s: float, max_entries: int,
                 embedder: Callable[[list[str]], np.ndarray] | None = None, dim: int = 384):
        self.store, self.threshold, self.ttl_s, self.max_entries = store, threshold, ttl_s, max_entries
        self.stream = f"semantic:{base[:24]}"
        self.embedder = embedder or default_embedder()
        self.dim = dim
        self._reset()
        self._appends = 0

    def _reset(self) -> None:
        self.index = VectorIndex(self.dim)
        self.entries: list[tuple[float, dict]] = []  # (stored at, answer) by index id
        self.last_seq = 0

    def sync(self) -> None:
        """Add the entries other replicas (or this one) appended since the last sync; rebuild once past the cap."""
        if len(self.entries) > self.max_entries * 1.25:  # the store dropped the oldest: follow it
            self._reset()
        rows = self.store.read(self.stream, after=self.last_seq)
        if not rows:
            return
        vecs = np.stack([np.frombuffer(base64.b64decode(r["v"]), dtype=np.float32) for _, r in rows])
        self.index.add(vecs)
        self.entries.extend((r["t"], r["answer"]) for _, r in rows)
        self.last_seq = rows[-1][0]

    async def embed(self, text: str) -> np.ndarray:
        """The input's unit embedding, computed off the event loop."""
        vecs = await asyncio.to_thread(self.embedder, [normalize_input(text)])
        return np.asarray(vecs, dtype=np.float32).reshape(self.dim)

    def lookup(self, vector: np.ndarray) -> tuple[dict | None, float | None]:
        """(answer, similarity) of the most similar live entry at or above the threshold, else (None, best)."""
        self.sync()
        ids, sims = self.index.search(vector, k=4)
        now, best = time.time(), None
        for i, sim in zip(ids.tolist(), sims.tolist()):
            best = sim if best is None else max(best, sim)
            stored_at, answer = self.entries[i]
            if sim >= self.threshold and now - stored_at <= self.ttl_s:
                return answer, sim
        return None, best

    def add(self, vector: np.ndarray, answer: dict) -> None:
        record = {"v": base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode(),
                  "answer": answer, "t": time.time()}
        self.store.append(self.stream, record)
        self._appends += 1
        if self._appends % 100 == 0 or self.max_entries < 100:
            self.store.trim(self.stream, self.max_entries)


def load_threshold(cfg, serve_dir: Path) -> float | None:
    """The semantic cache's threshold: ``serve.semantic_cache.threshold``, else the calibration's choice.

    None when calibration found no safe threshold (the cache stays off). Raises DistillError when the cache is
    enabled and never calibrated."""
    sc = cfg.serve.semantic_cache
    if sc.threshold is not None:
        return sc.threshold
    path = Path(serve_dir) / CACHE_CALIBRATION
    if not path.is_file():
        raise DistillError(f"serve.semantic_cache.enabled=true but {path} does not exist: run `python -m distill "
                           f"calibrate-cache run_dir={Path(serve_dir).parent}` first (or set "
                           f"serve.semantic_cache.threshold=T to choose one yourself)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("max_false_hit") is not None and data["max_false_hit"] != sc.max_false_hit:
        raise DistillError(f"{path} was calibrated for serve.semantic_cache.max_false_hit={data['max_false_hit']}, "
                           f"not {sc.max_false_hit}; re-run calibrate-cache with the bound you serve with")
    return data.get("threshold")
