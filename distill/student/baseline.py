"""The embedding baseline evaluate reports beside every student of an enum-only task.

    block = embedding_baseline(cfg, task, train_rows, val_rows, rows, student_agree, boot)

The cheapest rung of the student ladder (the ``embed_classifier`` option: the packaged MiniLM, frozen, plus one
logistic-regression head per enum field, C chosen on val) is fit in memory on the same train split and the same
teacher labels as the student, then answers the items the student was scored on. Its agreement with the teacher,
accuracy vs gold (with intervals), throughput and cost per 1,000 requests sit beside the student's, with the paired
difference and its interval, so a report says at once whether the student earns its cost. Nothing is written:
the block goes into results.json under ``embedding_baseline``. ``status`` says why a block holds no figures:
``off`` (eval.embedding_baseline=false), ``not_applicable`` (free-text fields, no train items, an endpoint),
``is_student`` (the student is the embedding classifier).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from distill.config import Config
from distill.metrics.stats import bootstrap_ci, rate
from distill.student import embed_classifier
from distill.task import Task

log = logging.getLogger("distill")

RUNG = "embed_classifier"


def _block(rows: list[dict], answers: list[dict | None], key: str, fields: list[str], boot: dict) -> dict:
    out = {f: rate([a is not None and a.get(f) == r[key].get(f) for r, a in zip(rows, answers)], **boot)
           for f in fields}
    out["exact"] = rate([a is not None and a == r[key] for r, a in zip(rows, answers)], **boot)
    return out


def embedding_baseline(cfg: Config, task: Task, train_rows: list[dict], val_rows: list[dict], rows: list[dict],
                       student_agree: list[bool], boot: dict, *, endpoint: bool = False) -> dict:
    """The baseline's figures on ``rows`` (the items of the student's headline; ``student_agree`` its whole-answer
    agreement flags on them), trained on ``train_rows``, C chosen on ``val_rows``. See the module docstring."""
    from distill.student.ladder import rung_config

    what = {"model": "embedding classifier (student=embed_classifier): frozen MiniLM sentence embeddings + a "
                     "logistic-regression head per field, fit on the same train split and teacher labels"}
    free = [f for f in task.schema.fields if f not in task.schema.enums]
    if not cfg.eval.embedding_baseline:
        return {"status": "off", "reason": "eval.embedding_baseline=false", **what}
    if free:
        return {"status": "not_applicable", "reason": f"free-text fields {', '.join(free)}: the embedding "
                                                      f"classifier answers enum fields only", **what}
    if cfg.student.kind == "embed_classifier" and not endpoint:
        return {"status": "is_student", "reason": "the student is the embedding classifier: its own figures are "
                                                  "the baseline", **what}
    if not train_rows or not rows:
        return {"status": "not_applicable", "reason": "no train items to fit it on" if not train_rows
                else "no items to score", **what}
    scfg = rung_config(cfg, RUNG).student
    folder = embed_classifier.encoder_folder(scfg)
    clf = embed_classifier.EmbedClassifier(folder, {}, {"encoder": {"max_seq_len": scfg.max_seq_len}})
    bs = scfg.head.batch_size
    started = time.perf_counter()
    x = clf.embed([r["input"] for r in train_rows], bs, progress="baseline: embed train")
    x_val = clf.embed([r["input"] for r in val_rows], bs) if val_rows else np.zeros((0, x.shape[1]), np.float32)
    clf.heads, fields = embed_classifier.fit_heads(x, [r["teacher"] for r in train_rows], x_val,
                                                   [r["teacher"] for r in val_rows], task.schema.enums, scfg.head)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    out = clf.predict([r["input"] for r in rows], bs)
    predict_s = time.perf_counter() - started
    answers = [None if task.schema.errors(a) else a for a, _, _ in out]
    names = list(task.schema.fields)
    agree = [a is not None and a == r["teacher"] for a, r in zip(answers, rows)]
    diff = np.asarray(student_agree, float) - np.asarray(agree, float)
    low, high = bootstrap_ci(diff, **boot)
    gold = [i for i, r in enumerate(rows) if r.get("gold")]
    per_s = round(len(rows) / predict_s, 3) if predict_s > 0 else None
    block = {
        "status": "measured", **what, "encoder": scfg.hub_id or folder.name, "n": len(rows),
        "train_examples": len(train_rows), "val_examples": len(val_rows),
        "agreement_ci": _block(rows, answers, "teacher", names, boot),
        "vs_gold_ci": _block([rows[i] for i in gold], [answers[i] for i in gold], "gold", names, boot)
        if gold else {},
        "student_minus_baseline": {"value": round(float(diff.mean()), 4), "low": None if low is None else round(low, 4),
                                   "high": None if high is None else round(high, 4), "n": len(rows)},
        "items_per_s": per_s,
        "usd_per_1k": round(1000 * cfg.eval.cost.student_usd_per_hour / 3600.0 / per_s, 6) if per_s else None,
        "fit_s": round(fit_s, 3), "predict_s": round(predict_s, 3),
        "C": {f: rep.get("C") for f, rep in fields.items()},
    }
    log.info("evaluate: embedding baseline agrees with the teacher on %.3f of %d items (the student %.3f)",
             block["agreement_ci"]["exact"]["value"], len(rows), float(np.mean(student_agree)) if rows else 0.0)
    return block
