"""Rates with bootstrap intervals, per-class scores, confusion, calibration, coverage and McNemar's test.

Everything takes plain lists, so a notebook can call it on any predictions. Intervals are percentile bootstrap
intervals from ``scipy.stats.bootstrap`` (resampling items with replacement); per-class scores come from
scikit-learn. ``None`` in a prediction list means "no valid answer" and always counts as wrong.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

INVALID = "<invalid>"


def bootstrap_ci(samples: Sequence, statistic: Callable = np.mean, *, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0, paired: Sequence | None = None) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap interval of ``statistic`` over items.

    Args:
        samples: one value per item (e.g. 0/1 agreement flags).
        statistic: vectorised over the last axis: ``np.mean`` or, with ``paired``, ``f(samples, paired, axis)``.
        resamples, level, seed: number of resamples, confidence level, RNG seed (results are reproducible).
        paired: a second per-item array resampled together with ``samples`` (e.g. predictions for macro-F1).
    Returns:
        (low, high), or (None, None) with fewer than two items.
    """
    from scipy.stats import bootstrap

    x = np.asarray(samples)
    if len(x) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    if paired is None:
        res = bootstrap((x.astype(float),), statistic, n_resamples=resamples, confidence_level=level,
                        method="percentile", vectorized=True, axis=-1, rng=rng)
    else:
        res = bootstrap((x, np.asarray(paired)), statistic, n_resamples=resamples, confidence_level=level,
                        method="percentile", paired=True, vectorized=True, axis=-1, rng=rng)
    low, high = res.confidence_interval
    return float(low), float(high)


def rate(flags: Sequence[bool], **boot) -> dict:
    """{"value", "low", "high", "n"}: a share with its bootstrap interval (value None for no items)."""
    x = np.asarray([bool(f) for f in flags], dtype=float)
    if len(x) == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    low, high = bootstrap_ci(x, **boot)
    return {"value": _r(x.mean()), "low": _r(low), "high": _r(high), "n": int(len(x))}


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _labels_of(values: Sequence) -> list[str]:
    return [INVALID if v is None else str(v) for v in values]


def class_report(reference: Sequence, predicted: Sequence, labels: list, **boot) -> dict:
    """Accuracy and macro-F1 (each with an interval) plus per-class precision / recall / F1 / support.

    Args:
        reference: the reference value per item (teacher or gold); predicted: the student's (None = invalid).
        labels: the field's allowed values; macro-F1 averages over those present in the reference or predictions.
    """
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    ref, pred = _labels_of(reference), _labels_of(predicted)
    names = [str(v) for v in labels]
    present = [n for n in names if n in set(ref) | set(pred)]
    index = {n: i for i, n in enumerate(names)}
    ref_i = np.array([index.get(v, -1) for v in ref])
    pred_i = np.array([index.get(v, -1) for v in pred])  # invalid or unknown -> -1, never a class
    out = {"n": len(ref), "accuracy": rate([a == b for a, b in zip(ref, pred)], **boot)}
    if not ref:
        return {**out, "macro_f1": rate([]), "per_class": {}}
    present_i = np.array([index[n] for n in present])
    value = f1_score(ref_i, pred_i, labels=present_i, average="macro", zero_division=0)
    low, high = bootstrap_ci(ref_i, lambda r, p, axis=-1: macro_f1(r, p, present_i), paired=pred_i, **boot)
    out["macro_f1"] = {"value": _r(value), "low": _r(low), "high": _r(high), "n": len(ref)}
    p, r, f, s = precision_recall_fscore_support(ref_i, pred_i, labels=list(range(len(names))), zero_division=0)
    out["per_class"] = {n: {"precision": _r(p[i]), "recall": _r(r[i]), "f1": _r(f[i]), "support": int(s[i])}
                        for i, n in enumerate(names)}
    return out


def macro_f1(ref: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Macro-F1 over ``classes`` for integer labels, vectorised over leading axes (many resamples at once).

    Equals scikit-learn's ``f1_score(average="macro", labels=classes, zero_division=0)`` (tested); written out
    only so that a thousand bootstrap resamples take milliseconds instead of seconds.
    """
    r = ref[..., None] == classes
    p = pred[..., None] == classes
    tp = (r & p).sum(axis=-2)
    denom = r.sum(axis=-2) + p.sum(axis=-2)  # 2TP + FP + FN
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(axis=-1)


def confusion(reference: Sequence, predicted: Sequence, labels: list) -> dict:
    """Confusion matrix: rows = reference (teacher), columns = prediction (student); invalid answers get a column."""
    from sklearn.metrics import confusion_matrix

    ref, pred = _labels_of(reference), _labels_of(predicted)
    names = [str(v) for v in labels] + ([INVALID] if INVALID in pred or INVALID in ref else [])
    matrix = confusion_matrix(ref, pred, labels=names) if ref else np.zeros((len(names), len(names)), int)
    return {"labels": names, "rows": "teacher", "columns": "student", "matrix": matrix.astype(int).tolist()}


def coverage_curve(confidence: Sequence[float | None], agree: Sequence[bool], max_points: int = 200) -> list[dict]:
    """Share of items the student would take at each confidence threshold, and its agreement on them.

    An item is covered at threshold t when it has a confidence and that confidence >= t; an item without one (an
    invalid answer) is never covered, at any threshold, because ``routing.decide`` sends it to the teacher. Thresholds
    are 0 and every distinct confidence (thinned to ``max_points`` quantiles), ascending. Returns
    ``[{"threshold", "coverage", "agreement", "n"}]``; agreement is None where nothing is covered.
    """
    conf = np.array([-np.inf if c is None else float(c) for c in confidence])
    ok = np.asarray([bool(a) for a in agree])
    if len(conf) == 0:
        return []
    finite = conf[np.isfinite(conf)]
    # each confidence rounded DOWN to 4 decimals (never above itself), so every item is kept at its own listed
    # threshold and a threshold between two listed ones keeps exactly what the upper one keeps (routing.point_at)
    floors = np.floor(finite * 1e4) / 1e4
    floors = np.where(floors > finite, floors - 1e-4, floors)
    thresholds = np.unique(np.concatenate([[0.0], np.round(floors, 4)]))
    if len(thresholds) > max_points:
        thresholds = np.unique(np.round(np.quantile(thresholds, np.linspace(0, 1, max_points)), 4))
    curve = []
    for t in thresholds:
        covered = conf >= t - 1e-9
        k = int(covered.sum())
        curve.append({"threshold": float(t), "coverage": _r(k / len(conf)),
                      "agreement": _r(ok[covered].mean()) if k else None, "n": k})
    return curve


def calibration(confidence: Sequence[float | None], correct: Sequence[bool], bins: int = 10) -> dict:
    """Reliability table over equal-width confidence bins and the expected calibration error.

    ECE = sum over bins of (items in bin / items) * |accuracy in bin - mean confidence in bin|. Items without a
    confidence (invalid answers) are left out and counted in ``n_without_confidence``.
    """
    pairs = [(float(c), bool(k)) for c, k in zip(confidence, correct) if c is not None]
    table = []
    ece = 0.0
    if pairs:
        conf = np.array([c for c, _ in pairs])
        ok = np.array([k for _, k in pairs], dtype=float)
        edges = np.linspace(0.0, 1.0, bins + 1)
        which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
        for b in range(bins):
            sel = which == b
            n = int(sel.sum())
            if not n:
                continue
            acc, mean_conf = float(ok[sel].mean()), float(conf[sel].mean())
            ece += n / len(conf) * abs(acc - mean_conf)
            table.append({"low": _r(edges[b]), "high": _r(edges[b + 1]), "n": n, "mean_confidence": _r(mean_conf),
                          "accuracy": _r(acc)})
    return {"bins": table, "ece": _r(ece) if pairs else None, "n": len(pairs),
            "n_without_confidence": len(list(confidence)) - len(pairs)}


def mcnemar_drop(baseline: Sequence[bool], current: Sequence[bool]) -> dict:
    """Exact one-sided McNemar test that ``current`` agrees less often than ``baseline`` on the same items.

    b = items the baseline got right and the current run got wrong, c = the reverse; under no change b ~ Bin(b+c,
    1/2). Returns {"n", "b", "c", "p_value"} (p_value 1.0 when there are no discordant items).
    """
    from scipy.stats import binomtest

    base = np.asarray([bool(x) for x in baseline])
    cur = np.asarray([bool(x) for x in current])
    b = int((base & ~cur).sum())
    c = int((~base & cur).sum())
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return {"n": int(len(base)), "b": b, "c": c, "p_value": round(float(p), 6)}


def format_interval(d: dict | None, *, percent: bool = True) -> str:
    """The one way an interval ``{"value", "low", "high"}`` is written: ``81.0% [72.0, 88.0]`` (``percent``) or
    ``0.81 [0.72, 0.88]``; ``n/a`` when there is no value, the bare value when there is no interval."""
    if not d or d.get("value") is None:
        return "n/a"

    def fmt(x: float) -> str:
        if percent:
            return f"{100 * x:.1f}"
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    head = fmt(d["value"]) + ("%" if percent else "")
    if d.get("low") is None or d.get("high") is None:
        return head
    return f"{head} [{fmt(d['low'])}, {fmt(d['high'])}]"
