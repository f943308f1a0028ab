"""``python -m distill calibrate-cache run_dir=DIR [serve.semantic_cache.max_false_hit=0.01]``: the semantic cache's
similarity threshold, measured on the run's own data instead of guessed.

Each held-out item (the val and test splits) plays a new request; its nearest train item by MiniLM cosine
similarity plays the cached entry, with the teacher's label as the cached answer. At each threshold, a *hit* is an
item whose neighbour is at least that similar, and a *false hit* is a hit whose cached answer differs from the
teacher's answer for the item itself. The threshold chosen is the lowest whose false-hit rate's Clopper-Pearson 95%
interval has its upper end at or below ``serve.semantic_cache.max_false_hit``; when none has, the cache is off
(``threshold: null``). Writes ``serve/cache_calibration.json`` (the table and the choice, which serve reads),
``serve/cache_calibration.md`` (the same table for people) and ``serve/cache_calibration.png`` (hit rate and
false-hit rate with its interval against the threshold). Publish runs it when ``serve.semantic_cache.enabled`` and
puts the table and the plot in report.md and MODEL_CARD.md (distill.stages.publish.card).

With zero false hits, the upper end is about 3.7 / hits: a 1% bound needs some 370 hits at the chosen threshold, so
a small run disables the cache rather than trusting a handful of matches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from distill import DistillError, paths, runio
from distill.metrics.stats import format_interval
from distill.serve.cache import CACHE_CALIBRATION, default_embedder, normalize_input

log = logging.getLogger("distill")

CACHE_TABLE = "cache_calibration.md"
CACHE_PLOT = "cache_calibration.png"
THRESHOLDS = tuple(round(0.50 + 0.005 * i, 3) for i in range(100))  # 0.500 .. 0.995
LEVEL = 0.95


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact binomial interval for ``k`` events in ``n`` trials ((0, 1) when n = 0)."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def _key(answer) -> str:
    return json.dumps(answer, sort_keys=True, ensure_ascii=False)


def neighbours(queries: np.ndarray, pool: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity) of each query's most similar pool row (unit vectors: inner product = cosine)."""
    idx, sim = [], []
    for start in range(0, len(queries), chunk):
        s = queries[start:start + chunk] @ pool.T
        best = s.argmax(axis=1)
        idx.append(best)
        sim.append(s[np.arange(len(best)), best])
    return np.concatenate(idx), np.concatenate(sim)


def table(similarity: np.ndarray, correct: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """One row per threshold: hits, hit rate, false hits and the false-hit rate with its 95% interval."""
    n = len(similarity)
    rows = []
    for t in thresholds:
        hit = similarity >= t
        hits, wrong = int(hit.sum()), int((hit & ~correct).sum())
        low, high = clopper_pearson(wrong, hits)
        rows.append({"threshold": float(t), "items": n, "hits": hits, "hit_rate": hits / n if n else 0.0,
                     "false_hits": wrong, "false_hit_rate": {"value": wrong / hits if hits else None,
                                                             "low": low, "high": high}})
    return rows


def choose(rows: list[dict], max_false_hit: float) -> dict | None:
    """The lowest-threshold row whose false-hit upper bound is within ``max_false_hit`` (None: no such row)."""
    ok = [r for r in rows if r["hits"] and r["false_hit_rate"]["high"] <= max_false_hit]
    return min(ok, key=lambda r: r["threshold"]) if ok else None


def measure(queries: list[str], query_answers: list, pool: list[str], pool_answers: list,
            embedder: Callable[[list[str]], np.ndarray], thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """The calibration table for ``queries`` against their nearest ``pool`` entries."""
    if not queries or not pool:
        raise DistillError(f"calibrate-cache needs held-out items and train items (got {len(queries)} and "
                           f"{len(pool)})")
    q = np.asarray(embedder([normalize_input(t) for t in queries]), dtype=np.float32)
    p = np.asarray(embedder([normalize_input(t) for t in pool]), dtype=np.float32)
    nn, sim = neighbours(q, p)
    correct = np.array([_key(pool_answers[j]) == _key(a) for j, a in zip(nn.tolist(), query_answers)])
    return table(sim, correct, thresholds)


def markdown(rows: list[dict], chosen: dict | None, max_false_hit: float) -> str:
    lines = ["| threshold | hits | hit rate | false hits | false-hit rate [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        fh = format_interval(r["false_hit_rate"]) if r["hits"] else "no hits"
        mark = " **chosen**" if chosen is not None and r["threshold"] == chosen["threshold"] else ""
        lines.append(f"| {r['threshold']:.3f}{mark} | {r['hits']} / {r['items']} | {100 * r['hit_rate']:.1f}% | "
                     f"{r['false_hits']} | {fh} |")
    verdict = (f"Chosen threshold {chosen['threshold']:.3f}: the lowest whose false-hit upper bound is <= "
               f"{100 * max_false_hit:g}%." if chosen else
               f"No threshold has a false-hit upper bound <= {100 * max_false_hit:g}%: the semantic cache stays off.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def plot(path: Path, rows: list[dict], chosen: dict | None, max_false_hit: float) -> None:
    """Hit rate and false-hit rate (with its 95% interval) against the threshold, the bound and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(t, [r["hit_rate"] for r in rows], label="hit rate", color="tab:blue")
    hit = [r for r in rows if r["hits"]]
    ax.plot([r["threshold"] for r in hit], [r["false_hit_rate"]["value"] for r in hit], label="false-hit rate",
            color="tab:red")
    ax.fill_between([r["threshold"] for r in hit], [r["false_hit_rate"]["low"] for r in hit],
                    [r["false_hit_rate"]["high"] for r in hit], color="tab:red", alpha=0.2,
                    label=f"false-hit {LEVEL:.0%} interval")
    ax.axhline(max_false_hit, color="black", lw=0.8, ls="--", label=f"max_false_hit {max_false_hit:g}")
    if chosen is not None:
        ax.axvline(chosen["threshold"], color="tab:green", lw=1, label=f"chosen {chosen['threshold']:.3f}")
    ax.set_xlabel("similarity threshold (MiniLM cosine)")
    ax.set_ylabel("share of held-out items / of hits")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("semantic cache calibration" + ("" if chosen else ": no threshold within the bound, cache off"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate(cfg, embedder: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Measure the run's table, choose the threshold, write serve/cache_calibration.{json,md}; returns the JSON."""
    run_dir = Path(cfg.run_dir)
    runio.require_done(run_dir, "generate", "calibrate-cache")
    train = runio.read_jsonl(paths.split_path(run_dir, "train"))
    held = [r for s in ("val", "test") for r in runio.read_jsonl(paths.split_path(run_dir, s))]
    max_false_hit = cfg.serve.semantic_cache.max_false_hit
    rows = measure([r["input"] for r in held], [r["teacher"] for r in held], [r["input"] for r in train],
                   [r["teacher"] for r in train], embedder or default_embedder())
    chosen = choose(rows, max_false_hit)
    out = {"threshold": chosen["threshold"] if chosen else None, "max_false_hit": max_false_hit, "level": LEVEL,
           "interval": "clopper-pearson", "held_out_items": len(held), "train_items": len(train),
           "chosen": chosen, "table": rows}
    serve_dir = paths.stage_dir(run_dir, paths.SERVE_DIR)
    serve_dir.mkdir(parents=True, exist_ok=True)
    runio.write_json(serve_dir / CACHE_CALIBRATION, out)
    runio.atomic_write_text(serve_dir / CACHE_TABLE, markdown(rows, chosen, max_false_hit))
    plot(serve_dir / CACHE_PLOT, rows, chosen, max_false_hit)
    return out


def main(overrides: list[str]) -> int:
    """The CLI: ``run_dir=DIR`` and ``serve.*`` overrides, as ``distill serve`` takes them."""
    from distill.serve.command import load_serve_config

    cfg = load_serve_config(overrides)
    out = calibrate(cfg)
    serve_dir = paths.stage_dir(Path(cfg.run_dir), paths.SERVE_DIR)
    print(markdown(out["table"], out["chosen"], out["max_false_hit"]))
    print(f"wrote {serve_dir / CACHE_CALIBRATION} ({out['held_out_items']} held-out items against "
          f"{out['train_items']} train items)")
    return 0
