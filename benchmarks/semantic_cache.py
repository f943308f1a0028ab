"""The semantic cache on the Bitext customer-support sample: its calibration table, the chosen threshold checked on
a disjoint sample, and lookup latency at 10k and 100k entries.

    python benchmarks/semantic_cache.py [--sample 1000] [--max-false-hit 0.01] [--runs 5] [--answer intent]

Gold categories (or intents, ``--answer intent``) stand in for the teacher's answers. The messages (duplicates dropped, shuffled with seed 0) split
into a calibration sample and a check sample of ``--sample`` each and a pool of the rest (the cached entries, as
calibrate-cache uses a run's train items), all disjoint. The calibration sample's table picks the threshold exactly as ``calibrate-cache`` does
(distill.serve.calibrate: lowest threshold whose Clopper-Pearson 95% upper bound on the false-hit rate is within
``--max-false-hit``); the check sample then measures the false-hit rate at that threshold.

Latency: ``SemanticCache.lookup`` as the gateway calls it (a sync read of the SQLite store, the index search, the
TTL check) over random unit vectors (384-d, as MiniLM's), at 10k and 100k entries, 1,000 lookups per run, p50/p99,
median of ``--runs``; plus exact numpy search against usearch HNSW at several sizes (the crossover the cache uses),
and the MiniLM embedding of one query, which every semantic lookup also pays.
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_data as bitext  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from distill.metrics.stats import format_interval  # noqa: E402
from distill.serve import calibrate  # noqa: E402
from distill.serve.cache import SemanticCache, VectorIndex, default_embedder  # noqa: E402
from distill.serve.store import SqliteStore  # noqa: E402

DIM = 384


def samples(n_pool: int | None, n_sample: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    rows, seen = [], set()
    for r in bitext.load_rows():
        if r["text"].lower() not in seen:
            seen.add(r["text"].lower())
            rows.append(r)
    random.Random(seed).shuffle(rows)
    n_pool = n_pool or len(rows) - 2 * n_sample
    if len(rows) < n_pool + 2 * n_sample:
        raise SystemExit(f"the sample has {len(rows)} distinct messages; ask for fewer (--pool, --sample)")
    return rows[:n_pool], rows[n_pool:n_pool + n_sample], rows[n_pool + n_sample:n_pool + 2 * n_sample]


def quality(n_pool: int | None, n_sample: int, max_false_hit: float, answer: str = "category") -> None:
    pool, cal, check = samples(n_pool, n_sample)
    embed = default_embedder()
    started = time.perf_counter()
    p = np.asarray(embed([r["text"] for r in pool]), dtype=np.float32)
    took = time.perf_counter() - started
    print(f"embedded {len(pool)} pool messages in {took:.0f} s ({len(pool) / took:.0f}/s)")

    def rows_for(sample):
        q = np.asarray(embed([r["text"] for r in sample]), dtype=np.float32)
        nn, sim = calibrate.neighbours(q, p)
        correct = np.array([pool[j][answer] == r[answer] for j, r in zip(nn.tolist(), sample)])
        return calibrate.table(sim, correct)

    table = rows_for(cal)
    chosen = calibrate.choose(table, max_false_hit)
    print(f"\nCalibration sample: {len(cal)} messages against {len(pool)} cached entries (answer = {answer})\n")
    shown = set(calibrate.THRESHOLDS[::5]) | ({chosen["threshold"]} if chosen else set())
    print(calibrate.markdown([r for r in table if r["threshold"] in shown], chosen, max_false_hit))
    if chosen is None:
        return
    at = next(r for r in rows_for(check) if r["threshold"] == chosen["threshold"])
    fh = at["false_hit_rate"]
    within = fh["value"] is not None and fh["value"] <= max_false_hit
    print(f"Check sample ({len(check)} messages, disjoint): at {chosen['threshold']:.3f} hit rate "
          f"{100 * at['hit_rate']:.1f}% ({at['hits']} hits), false-hit rate {format_interval(fh)} "
          f"({at['false_hits']} wrong): {'within' if within else 'OUTSIDE'} the {100 * max_false_hit:g}% bound")


def _percentiles(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _unit(rng, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def latency(sizes: list[int], runs: int, lookups: int = 1000) -> None:
    rng = np.random.default_rng(0)
    queries = _unit(rng, lookups)
    print(f"\nLookup latency (SemanticCache.lookup on SQLite, random 384-d unit vectors, {lookups} lookups a run, "
          f"median of {runs} runs)\n")
    print("| entries | index | p50 ms | p99 ms |\n|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(Path(tmp) / "store.sqlite")
            cache = SemanticCache(store, "bench", threshold=0.95, ttl_s=3600, max_entries=n,
                                  embedder=lambda texts: None, dim=DIM)
            now = time.time()
            for v in _unit(rng, n):
                store.append(cache.stream, {"v": base64.b64encode(v.tobytes()).decode(), "answer": {"c": "x"},
                                            "t": now})
            cache.sync()
            p50s, p99s = [], []
            for _ in range(runs):
                took = []
                for q in queries:
                    t0 = time.perf_counter()
                    cache.lookup(q)
                    took.append(time.perf_counter() - t0)
                p50, p99 = _percentiles(took)
                p50s.append(p50)
                p99s.append(p99)
            kind = "usearch HNSW" if cache.index._hnsw is not None else "exact numpy"
            print(f"| {n:,} | {kind} | {statistics.median(p50s):.3f} | {statistics.median(p99s):.3f} |")
            store.close()


def crossover(sizes: list[int], runs: int, lookups: int = 300) -> None:
    rng = np.random.default_rng(1)
    queries = _unit(rng, lookups)
    print("\nIndex search alone: exact numpy against usearch HNSW (p50 ms, median of runs)\n")
    print("| entries | exact numpy | usearch HNSW |\n|---|---|---|")
    for n in sizes:
        data = _unit(rng, n)
        exact, hnsw = VectorIndex(DIM, crossover=10**12), VectorIndex(DIM, crossover=0)
        exact.add(data)
        hnsw.add(data)
        cells = []
        for index in (exact, hnsw):
            meds = []
            for _ in range(runs):
                took = []
                for q in queries:
                    t0 = time.perf_counter()
                    index.search(q, k=4)
                    took.append(time.perf_counter() - t0)
                meds.append(_percentiles(took)[0])
            cells.append(statistics.median(meds))
        print(f"| {n:,} | {cells[0]:.3f} | {cells[1]:.3f} |")


def embed_latency(runs: int) -> None:
    embed = default_embedder()
    embed(["warm up"])
    took = []
    for i in range(runs * 20):
        t0 = time.perf_counter()
        embed([f"I want to cancel order {i} and get a refund for it"])
        took.append(time.perf_counter() - t0)
    p50, p99 = _percentiles(took)
    print(f"\nMiniLM embedding of one query (paid by every semantic lookup): p50 {p50:.1f} ms, p99 {p99:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=None, help="cached entries (default: every message not sampled)")
    ap.add_argument("--sample", type=int, default=1_000)
    ap.add_argument("--max-false-hit", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--crossover-sizes", default="2000,5000,10000,20000,50000")
    ap.add_argument("--only", choices=("quality", "latency"), default=None)
    ap.add_argument("--answer", choices=("category", "intent"), default="category",
                    help="the gold label standing in for the teacher's answer: 11 categories or 27 intents")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if args.only != "latency":
        quality(args.pool, args.sample, args.max_false_hit, args.answer)
    if args.only != "quality":
        embed_latency(args.runs)
        latency([int(s) for s in args.sizes.split(",")], args.runs)
        crossover([int(s) for s in args.crossover_sizes.split(",")], args.runs)


if __name__ == "__main__":
    main()
