"""student=auto: the student ladder. Train the cheapest rung first, climb only while it misses the target.

    summary = ladder.train(cfg, run_dir, train_lm)     # the train stage's dispatch (train_lm: its LoRA training)
    cfg = ladder.resolve(cfg, run_dir)                 # evaluate / publish: the config of the rung train chose

The rungs are options of the student config group (``student.auto.rungs``, cheapest to serve first; an
``embed_classifier`` rung only when every answer field is an enum). Each rung is trained as ``student=<rung>`` would
be, then answers the val split: its whole-answer agreement with the teacher (with its bootstrap interval), its
throughput and latency there, and its cost per 1,000 requests at ``eval.cost.student_usd_per_hour`` (the formula
of distill.metrics.cost). The ladder stops at the first rung whose agreement meets ``publish.target_agreement``.
When none does, it keeps the rung with the best val agreement, or the cheapest rung whose interval overlaps the
best one's (the data cannot tell them apart), and says so. Every rung tried goes into train/ladder.json; the
train stage's summary (train/DONE.json) is the chosen rung's own summary plus ``rung`` and ``ladder``, so later
stages read the chosen rung from the run directory, never from the config.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distill import DistillError, paths, runio
from distill.config import Config
from distill.config.inputs import load_yaml
from distill.config.models import STUDENT_OPTIONS_DIR, StudentConfig
from distill.metrics.stats import rate
from distill.student import embed_classifier
from distill.student.predictions import answered
from distill.task import Task, load_split

log = logging.getLogger("distill")


def is_auto(cfg: Config) -> bool:
    return cfg.student.kind == "auto"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def rung_config(cfg: Config, rung: str) -> Config:
    """``cfg`` with the student of ``rung`` (its option file + ``student.auto.overrides[rung]``), validated.

    Raises:
        DistillError: an unknown rung, or settings the rung's student model refuses.
    """
    file = STUDENT_OPTIONS_DIR / f"{rung}.yaml"
    if rung == "auto" or not file.is_file():
        raise DistillError(f"student rung {rung!r} is no student option (options: "
                           f"{', '.join(sorted(p.stem for p in STUDENT_OPTIONS_DIR.glob('*.yaml')))})")
    overrides = cfg.student.auto.overrides.get(rung, {}) if is_auto(cfg) else {}
    try:
        student = StudentConfig.model_validate(_merge(load_yaml(file, "student option") or {}, overrides))
    except ValueError as exc:
        first = " ".join(str(exc).split())[:300]
        raise DistillError(f"student.auto.overrides.{rung} makes an invalid student: {first}") from None
    return cfg.model_copy(update={"student": student})


def chosen_rung(run_dir: Path) -> str | None:
    """The rung train chose (train/DONE.json), or None when train has not finished with student=auto."""
    done = runio.read_done(run_dir, "train") or {}
    return (done.get("summary") or {}).get("rung")


def resolve(cfg: Config, run_dir: Path, required: bool = True) -> Config:
    """The config of the student that was trained: ``cfg`` itself, or for student=auto the chosen rung's.

    Raises:
        DistillError: student=auto, ``required``, and train/DONE.json names no chosen rung.
    """
    if not is_auto(cfg):
        return cfg
    rung = chosen_rung(run_dir)
    if rung is None:
        if not required:
            return cfg
        raise DistillError(f"student=auto: train/{paths.DONE} in {run_dir} names no chosen rung (train did not "
                           f"finish, or ran another student); run `python -m distill train run_dir={run_dir}` first")
    return rung_config(cfg, rung)


# ---------------------------------------------------------------------------------------------------------------
# climbing


def _measure(cfg: Config, task: Task, run_dir: Path, val_rows: list[dict]) -> dict:
    """The trained rung answers the val split: agreement with the teacher (interval), invalid share, speed, cost."""
    from distill.student.predict import predict_classifier, predict_in_process

    if cfg.student.kind == "embed_classifier":
        preds = predict_classifier(cfg, task, val_rows, embed_classifier.EmbedClassifier.from_run(cfg, run_dir))
    else:
        from distill.student.models import load_student

        model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
        preds = predict_in_process(cfg, task, val_rows, model, tokenizer)
        del model
        gc.collect()
    boot = {"resamples": cfg.eval.bootstrap_resamples, "level": cfg.eval.confidence_level, "seed": cfg.seed}
    lat = [t for t, why in zip(preds.latency_s, preds.invalid_reason) if answered(why)]
    per_s = preds.items_per_s
    return {"val_agreement": rate([a is not None and a == r["teacher"] for a, r in zip(preds.answers, val_rows)],
                                  **boot),
            "invalid_rate": round(sum(a is None for a in preds.answers) / len(val_rows), 4),
            "items_per_s": per_s,
            "latency_p50_s": round(float(np.percentile(lat, 50)), 4) if lat else None,
            "latency_p95_s": round(float(np.percentile(lat, 95)), 4) if lat else None,
            # the student's cost formula of distill.metrics.cost: the machine's hourly price over its throughput
            "usd_per_1k": round(1000 * cfg.eval.cost.student_usd_per_hour / 3600.0 / per_s, 6) if per_s else None,
            "decode": "classifier" if cfg.student.kind == "embed_classifier" else cfg.eval.decode}


def _overlaps(a: dict, b: dict) -> bool:
    if None in (a.get("low"), a.get("high"), b.get("low"), b.get("high")):
        return a.get("value") == b.get("value")
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def choose(tried: list[dict], target: float) -> tuple[int, str]:
    """(index into ``tried`` of the rung to keep, why). ``tried``: trained rungs, cheapest first, each with
    ``val_agreement`` and ``usd_per_1k``. The first rung that met ``target`` wins; when none did, the best val
    agreement, or the cheapest rung whose interval overlaps the best one's."""
    for i, rung in enumerate(tried):
        if rung["met_target"]:
            return i, (f"{rung['rung']} met publish.target_agreement={target} on val "
                       f"({rung['val_agreement']['value']}); no dearer rung was trained")
    best = max(range(len(tried)), key=lambda i: (tried[i]["val_agreement"]["value"] or 0.0, -i))
    close = [i for i in range(len(tried)) if _overlaps(tried[i]["val_agreement"], tried[best]["val_agreement"])]
    cheapest = min(close, key=lambda i: (tried[i]["usd_per_1k"] if tried[i]["usd_per_1k"] is not None
                                         else float("inf"), i))
    head = f"no rung met publish.target_agreement={target} on val"
    if cheapest == best:
        tie = sum(r["val_agreement"]["value"] == tried[best]["val_agreement"]["value"] for r in tried) > 1
        return best, (f"{head}; kept {tried[best]['rung']}, the best val agreement "
                      f"({tried[best]['val_agreement']['value']}{', a tie: the cheaper rung is kept' if tie else ''})")
    return cheapest, (f"{head}; kept {tried[cheapest]['rung']} ({tried[cheapest]['val_agreement']['value']}): its "
                      f"interval overlaps that of the best, {tried[best]['rung']} "
                      f"({tried[best]['val_agreement']['value']}), and it costs less per request")


def train(cfg: Config, run_dir: Path, train_lm: Callable[[Config, Path], dict]) -> dict:
    """The train stage for student=auto: climb the ladder, write train/ladder.json, return the chosen rung's
    summary with ``rung`` and ``ladder``. ``train_lm(rung_cfg, run_dir)`` trains a causal-LM rung (train.run).

    Raises:
        DistillError: no val split to decide on, or no rung the recipe allows.
    """
    task = Task(cfg)
    target = cfg.publish.target_agreement
    val_rows = load_split(run_dir, "val")
    if not val_rows:
        raise DistillError(f"student=auto chooses a rung on the val split's agreement with the teacher, and "
                           f"{paths.split_path(run_dir, 'val')} is empty; raise generate.split.val (or "
                           f"generate.limit), or pick one student (student=embed_classifier, student=smollm2_135m)")
    free = [f for f in task.schema.fields if f not in task.schema.enums]
    rungs, tried, summaries = [], [], []
    for name in cfg.student.auto.rungs:
        rcfg = rung_config(cfg, name)
        kind = rcfg.student.kind
        if kind == "embed_classifier" and free:
            rungs.append({"rung": name, "kind": kind, "trained": False,
                          "outcome": f"skipped: recipe {cfg.recipe.name!r} has free-text fields {', '.join(free)}, "
                                     f"and an embedding classifier answers enum fields only"})
            log.info("student=auto: rung %s skipped (free-text fields %s)", name, ", ".join(free))
            continue
        log.info("student=auto: training rung %s (%s)", name, kind)
        started = time.perf_counter()
        summary = embed_classifier.train(rcfg, run_dir) if kind == "embed_classifier" else train_lm(rcfg, run_dir)
        train_s = round(time.perf_counter() - started, 2)
        entry = {"rung": name, "kind": kind, "trained": True, "train_s": train_s,
                 **_measure(rcfg, task, run_dir, val_rows)}
        if summary.get("stop_reason"):  # an LM rung: how its training ended (epochs, the budget, early stopping)
            entry["training"] = {k: summary.get(k) for k in ("stopped_by", "stop_reason", "steps", "epochs_trained",
                                                              "best_checkpoint", "kept_val_agreement")}
        entry["met_target"] = (entry["val_agreement"]["value"] or 0.0) >= target
        log.info("student=auto: rung %s agrees with the teacher on %s of %d val items (target %s), $%s per 1k",
                 name, entry["val_agreement"]["value"], len(val_rows), target, entry["usd_per_1k"])
        rungs.append(entry)
        tried.append(entry)
        summaries.append(summary)
        if entry["met_target"]:
            break
    if not tried:
        raise DistillError(f"student=auto: no rung of student.auto.rungs ({', '.join(cfg.student.auto.rungs)}) "
                           f"fits recipe {cfg.recipe.name!r}; add a causal-LM rung (e.g. smollm2_135m)")
    pick, why = choose(tried, target)
    for name in cfg.student.auto.rungs[len(rungs):]:  # above a rung that met the target: never trained
        rungs.append({"rung": name, "kind": rung_config(cfg, name).student.kind, "trained": False,
                      "outcome": f"not trained: {tried[-1]['rung']} met the target"})
    for i, entry in enumerate(tried):
        if i == pick:
            entry["outcome"] = "chosen"
        elif entry["met_target"]:
            entry["outcome"] = "met the target"
        else:
            entry["outcome"] = ("missed the target: climbed to the next rung" if entry is not tried[-1]
                                else "missed the target: the last rung")
        if (entry.get("training") or {}).get("stopped_by") in ("max_steps", "early_stopping"):
            entry["outcome"] += f" ({entry['training']['stop_reason']})"  # the report's ladder table shows it
    if not tried[pick]["met_target"]:
        log.warning("student=auto: %s", why)
    else:
        log.info("student=auto: %s", why)
    ladder = {"target_agreement": target, "decided_on": {"split": "val", "n": len(val_rows)},
              "chosen": tried[pick]["rung"], "met_target": tried[pick]["met_target"], "why": why, "rungs": rungs}
    out_dir = paths.stage_dir(run_dir, "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    runio.write_json(out_dir / paths.LADDER, ladder)
    chosen = summaries[pick]
    return {**chosen, "student_kind": tried[pick]["kind"], "rung": tried[pick]["rung"], "ladder": ladder}

