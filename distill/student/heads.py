"""The embedding classifier's heads: one linear softmax head per enum field, fit by scikit-learn's LogisticRegression
on the teacher's labels (hard, or soft: cross-entropy to the teacher's distribution), its C chosen on val agreement.

Used by student=embed_classifier (distill.student.embed_classifier), evaluate's embedding baseline
(distill.student.baseline) and the ladder benchmark; the files they are saved in are the classifier's business.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.config import HeadConfig
from distill.task import value_text

log = logging.getLogger("distill")

Answer = tuple[dict, float, dict[str, float]]  # (answer, confidence, per-field confidence)


@dataclass
class FieldHead:
    """One enum field's linear head: probabilities = softmax(x @ weight.T + bias) over ``values`` (row order)."""

    values: list[Any]
    weight: np.ndarray  # [len(values), dim] float32
    bias: np.ndarray    # [len(values)] float32

    def probs(self, x: np.ndarray) -> np.ndarray:
        """[items x values] probabilities for embeddings ``x`` [items x dim]."""
        logits = x.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def predict_heads(heads: dict[str, FieldHead], x: np.ndarray) -> list[Answer]:
    """(answer, confidence, per-field confidence) per embedding: each field's most probable value; confidence = the
    product of the fields' top probabilities."""
    probs = {name: head.probs(x) for name, head in heads.items()}
    out = []
    for i in range(len(x)):
        answer, conf = {}, {}
        for name, head in heads.items():
            j = int(probs[name][i].argmax())
            answer[name], conf[name] = head.values[j], float(probs[name][i, j])
        out.append((answer, float(np.prod(list(conf.values()))), conf))
    return out


def _replicate(x: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft labels for a classifier without them: each example once per value it has probability on, weighted by
    that probability. LogisticRegression's weighted log-loss over the copies is then the cross-entropy to the soft
    labels, sum_v p(v) * -log q(v), exactly (same solver, C grid and files as hard labels)."""
    rows, cols = np.nonzero(probs > 0)
    return x[rows], cols, probs[rows, cols]


def soft_class_weight(probs: np.ndarray) -> dict[int, float]:
    """``class_weight="balanced"`` for soft labels: n / (classes x each class's probability mass), sklearn's own for
    one-hot labels; counted over ``_replicate``'s copies instead, every class would look equally common."""
    mass = probs.sum(axis=0)
    present = np.nonzero(mass > 0)[0]
    return {int(k): float(len(probs) / (len(present) * mass[k])) for k in present}


def fit_heads(x: np.ndarray, labels: list[dict], x_val: np.ndarray, val_labels: list[dict],
              enums: dict[str, list], hcfg: HeadConfig,
              soft: dict[str, np.ndarray] | None = None) -> tuple[dict[str, FieldHead], dict[str, dict]]:
    """One LogisticRegression head per enum field, its C chosen on val agreement.

    Args:
        x, x_val: embeddings [items x dim] of the train and val inputs.
        labels, val_labels: the teacher's answers, aligned with them.
        enums: field -> allowed values (OutputSchema.enums).
        hcfg: student.head.
        soft: field -> [items x values] the teacher's distribution per train item (train.targets=soft): the head
            is fit by cross-entropy to it (``_replicate``) instead of to the teacher's top value.
    Returns:
        (heads by field, a report per field: values seen, C tried with val agreement, C kept, converged).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    heads, report = {}, {}
    for name, values in enums.items():
        index = {value_text(v): i for i, v in enumerate(values)}  # by text: 1 == True in Python, not in JSON
        y = np.array([index[value_text(r[name])] for r in labels])
        y_val = np.array([index[value_text(r[name])] for r in val_labels], dtype=int)
        seen = sorted(set(y.tolist()))
        if len(seen) == 1:  # nothing to separate: the head always answers the one value the teacher gave
            heads[name] = FieldHead([values[seen[0]]], np.zeros((1, x.shape[1]), np.float32), np.zeros(1, np.float32))
            report[name] = {"values_seen": 1, "C": None, "tried": {}, "converged": True,
                            "note": "the teacher gave one value only on the train split"}
            log.warning("embed_classifier: field %s has one value (%r) in the train split; its head always answers it",
                        name, values[seen[0]])
            continue
        best = None
        tried = {}
        fit_x, fit_y, weight = (x, y, None) if soft is None or name not in soft else _replicate(x, soft[name])
        class_weight = hcfg.class_weight
        if weight is not None and class_weight == "balanced":  # balanced by probability mass, not copies
            class_weight = soft_class_weight(soft[name])
        for c in hcfg.c_grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as `converged` instead
                model = LogisticRegression(C=c, class_weight=class_weight, max_iter=hcfg.max_iter).fit(
                    fit_x, fit_y, sample_weight=weight)
            score = float((model.predict(x_val) == y_val).mean()) if len(y_val) else None
            tried[str(c)] = None if score is None else round(score, 4)
            if best is None or (score is not None and score > best[0]):  # ties keep the earlier C
                best = (score, c, model)
        _, c, model = best
        coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for classes_[1]; softmax([0, z]) = sigmoid(z)
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros(1, np.float32), intercept])
        heads[name] = FieldHead([values[k] for k in model.classes_.tolist()], coef, intercept)
        converged = bool(np.max(model.n_iter_) < hcfg.max_iter)
        if not converged:
            log.warning("embed_classifier: the %s head (C=%s) stopped at student.head.max_iter=%d before converging",
                        name, c, hcfg.max_iter)
        report[name] = {"values_seen": len(seen), "C": c, "tried": tried, "converged": converged}
    return heads, report
