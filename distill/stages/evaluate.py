"""evaluate: the student (or any served model) answers the held-out split; metrics with intervals, cost, a CI gate.

    python -m distill evaluate recipe=support_tickets run_dir=DIR [eval.gate.min_agreement=0.8] [eval.baseline=F]
    python -m distill evaluate run_dir=DIR eval.endpoint.base_url=http://127.0.0.1:8080/v1 eval.endpoint.model=M

Predictions come from distill.student: the in-process student (``eval.decode=scored``: every allowed value of an
enum field is ranked by its log-likelihood in the JSON answer, which also gives a confidence; ``free``: greedy
free-form JSON), an OpenAI-compatible endpoint (the published GGUF in llama.cpp, vLLM, the teacher itself), or
student=embed_classifier's heads; for student=auto, the rung train chose (distill.student.ladder). Enum-only tasks
also get the embedding baseline (distill.student.baseline) side by side. This module only runs the stage: scoring, figures, the gate, the files. Writes
evaluate/{predictions.jsonl, results.json, report.md, junit.xml, summary.md, *.png}; README lists results.json's
keys. The command exits 3 with a one-line reason when the gate fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from distill import DistillError, EndpointFailed, contracts, paths, runio
from distill.config import Config
from distill.data.dedup import find_duplicates
from distill.metrics import cost as costs
from distill.metrics import gate as gates
from distill.metrics import report
from distill.metrics.stats import calibration, class_report, confusion, coverage_curve, rate
from distill.student.embed_classifier import EmbedClassifier
from distill.student import ladder
from distill.student.baseline import embedding_baseline
from distill.student.endpoint import predict_endpoint
from distill.student.models import load_student
from distill.student.predict import predict_classifier, predict_in_process
from distill.student.predictions import agreement, answered, count_reasons
from distill.task import OutputSchema, Task, load_split

log = logging.getLogger("distill")


# ---------------------------------------------------------------------------------------------------------------
# scoring


def score(rows: list[dict], preds: list[dict | None], schema: OutputSchema, boot: dict | None = None) -> dict:
    """Agreement with the teacher and accuracy vs gold, per field and for the whole answer, with intervals.

    Keeps the point values under ``agreement`` / ``student_vs_gold`` / ``teacher_vs_gold`` ({field: share,
    "exact": share}) and adds ``*_ci`` twins holding {"value", "low", "high", "n"}, plus per-field class reports
    (accuracy, macro-F1 with interval, per-class precision / recall / F1) for fields with a fixed set of values.
    """
    boot = boot or {}
    n = len(rows)
    valid = [p is not None for p in preds]

    def field_of(obj, f):
        return None if obj is None else obj.get(f)

    def block(ref_rows, pred_list, key: str) -> dict:
        out = {f: rate([p is not None and field_of(p, f) == r[key].get(f) for r, p in zip(ref_rows, pred_list)],
                       **boot) for f in schema.fields}
        out["exact"] = rate([p is not None and p == r[key] for r, p in zip(ref_rows, pred_list)], **boot)
        return out

    agree_ci = block(rows, preds, "teacher")
    out: dict = {"n": n, "invalid_rate": round(1 - sum(valid) / n, 4) if n else None,
                 "invalid": rate([not v for v in valid], **boot),
                 "agreement": {k: v["value"] for k, v in agree_ci.items()}, "agreement_ci": agree_ci}
    gold_idx = [i for i, r in enumerate(rows) if r.get("gold")]
    out["n_gold"] = len(gold_idx)
    gold_rows, gold_preds = [rows[i] for i in gold_idx], [preds[i] for i in gold_idx]
    if gold_idx:
        stu = block(gold_rows, gold_preds, "gold")
        tea = block(gold_rows, [r["teacher"] for r in gold_rows], "gold")
        out["student_vs_gold"] = {k: v["value"] for k, v in stu.items()}
        out["teacher_vs_gold"] = {k: v["value"] for k, v in tea.items()}
        out["student_vs_gold_ci"], out["teacher_vs_gold_ci"] = stu, tea
    fields = {}
    for f in schema.fields:
        labels = schema.enums.get(f)
        if labels is None:  # free text: exact-match agreement and accuracy only
            fields[f] = {"kind": "free_text", "vs_teacher": {"accuracy": agree_ci[f]},
                         "vs_gold": {"accuracy": stu[f]} if gold_idx else None}
            continue
        fields[f] = {"kind": "enum",
                     "vs_teacher": class_report([r["teacher"].get(f) for r in rows],
                                                [field_of(p, f) for p in preds], labels, **boot),
                     "vs_gold": class_report([r["gold"].get(f) for r in gold_rows],
                                             [field_of(p, f) for p in gold_preds], labels, **boot)
                     if gold_idx else None,
                     "teacher_vs_gold": class_report([r["gold"].get(f) for r in gold_rows],
                                                     [r["teacher"].get(f) for r in gold_rows], labels, **boot)
                     if gold_idx else None}
    out["fields"] = fields
    return out


def _latency(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 4), "p95": round(float(np.percentile(values, 95)), 4)}


def _static_prefix_share(task: Task, rows: list[dict]) -> float | None:
    """Share of the teacher's prompt that is the same for every request (system + few-shot): what a provider's
    prompt cache can bill at the cached rate."""
    shares = []
    for r in rows[:50]:
        messages = task.teacher_messages(r["input"])
        static = sum(len(m["content"]) for m in messages[:-1])
        shares.append(static / max(1, static + len(messages[-1]["content"])))
    return round(float(np.mean(shares)), 4) if shares else None


# ---------------------------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, run_dir: Path) -> dict:
    out_dir = paths.stage_dir(run_dir, "evaluate")
    endpoint = cfg.eval.endpoint.base_url
    # student=auto: the rung train chose, from train/DONE.json (an endpoint needs no trained student)
    cfg = ladder.resolve(cfg, run_dir, required=not endpoint)
    task = Task(cfg)
    ev = cfg.eval
    generate = runio.require_done(run_dir, "generate", "evaluate")["summary"]
    rows = load_split(run_dir, ev.split)[: ev.limit]
    if not rows:
        raise_empty(run_dir, ev.split)
    val_rows = load_split(run_dir, "val")[: ev.limit] if ev.val_curve and ev.split != "val" else []
    train_rows = load_split(run_dir, "train") if ev.split != "train" else []

    dup = {}
    if ev.decontam.enabled and train_rows:
        dup = find_duplicates(train_rows, rows, threshold=ev.decontam.threshold, num_perm=ev.decontam.num_perm,
                              k=ev.decontam.shingle_chars)
    if len(dup) == len(rows):
        raise DistillError(f"all {len(rows)} {ev.split} items duplicate a train item (eval.decontam.threshold="
                           f"{ev.decontam.threshold}); nothing clean to score: raise the threshold or set "
                           f"eval.decontam.enabled=false")

    if endpoint:
        if not ev.endpoint.model:
            raise DistillError("eval.endpoint.model is required with eval.endpoint.base_url (the model name the "
                               "server serves; llama.cpp accepts any)")
        predictor = {"kind": "endpoint", "base_url": endpoint, "model": ev.endpoint.model,
                     "prompt": ev.endpoint.prompt, "structured_output": ev.endpoint.structured_output}
        log.info("evaluate: scoring endpoint %s (model %s) on %d %s items", endpoint, ev.endpoint.model, len(rows),
                 ev.split)
        preds = predict_endpoint(cfg, task, rows, endpoint, ev.endpoint.model)
        val_preds = predict_endpoint(cfg, task, val_rows, endpoint, ev.endpoint.model) if val_rows else None
        device = "endpoint"
    elif cfg.student.kind == "embed_classifier":
        clf = EmbedClassifier.from_run(cfg, run_dir)
        predictor = {"kind": "in_process", "student": cfg.student.name, "decode": "classifier"}
        preds = predict_classifier(cfg, task, rows, clf)
        val_preds = predict_classifier(cfg, task, val_rows, clf) if val_rows else None
        device = "cpu"
    else:
        model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
        predictor = {"kind": "in_process", "student": cfg.student.name, "decode": ev.decode}
        preds = predict_in_process(cfg, task, rows, model, tokenizer)
        val_preds = predict_in_process(cfg, task, val_rows, model, tokenizer) if val_rows else None
        device = str(model.device)

    clean = [i for i, r in enumerate(rows) if r["id"] not in dup]
    boot = {"resamples": ev.bootstrap_resamples, "level": ev.confidence_level, "seed": cfg.seed}
    c_rows, c_preds = [rows[i] for i in clean], [preds.answers[i] for i in clean]
    metrics = score(c_rows, c_preds, task.schema, boot)
    metrics["invalid_by_reason"] = count_reasons(preds.invalid_reason[i] for i in clean)
    metrics["failures"] = preds.failures
    agree = [p is not None and p == r["teacher"] for r, p in zip(rows, preds.answers)]
    c_agree = [agree[i] for i in clean]
    c_conf = [preds.confidence[i] for i in clean]

    decontamination = {"enabled": ev.decontam.enabled, "method": "normalized exact match + MinHash LSH "
                       "(datasketch) confirmed by exact Jaccard of character shingles",
                       "threshold": ev.decontam.threshold, "shingle_chars": ev.decontam.shingle_chars,
                       "n_checked": len(rows), "n_excluded": len(dup), "n_clean": len(clean),
                       "exact": sum(d["kind"] == "exact" for d in dup.values()),
                       "near": sum(d["kind"] == "near" for d in dup.values()),
                       "items": [{"id": k, **v} for k, v in dup.items()],
                       "agreement_all_items": rate(agree, **boot)}
    lat = _latency([t for t, why in zip(preds.latency_s, preds.invalid_reason) if answered(why)])
    speed = {"items": len(rows), "wall_s": round(preds.wall_s, 3), "items_per_s": preds.items_per_s,
             "latency_p50_s": lat["p50"], "latency_p95_s": lat["p95"], "batch_size": ev.batch_size,
             "device": device, "predictor": predictor["kind"], "decode": predictor.get("decode"),
             "concurrency": ev.endpoint.concurrency if endpoint else None,
             "latency_note": "seconds until an item's answer was ready: its whole batch in process, its request "
                             "on an endpoint"}
    split_rows = {s: load_split(run_dir, s) for s in paths.SPLITS}
    ledger_file = paths.ledger_path(run_dir, cfg.generate.shared_ledger)
    usage = costs.ledger_usage(ledger_file, [r for s in paths.SPLITS for r in split_rows[s]])
    train_done = runio.read_done(run_dir, "train") or {}
    cost = costs.cost_case(cfg, usage, preds.items_per_s, lat, (train_done.get("summary") or {}).get("wall_s"),
                           _static_prefix_share(task, rows))

    per_item = [{"id": r["id"], "agree": bool(a), "valid": p is not None, "confidence": c,
                 "contaminated": r["id"] in dup}
                for r, p, a, c in zip(rows, preds.answers, agree, preds.confidence)]
    gate = gates.evaluate_gate(cfg, metrics, per_item, task.schema.fields)
    val_curve = []
    if val_preds is not None:
        val_agree = [p is not None and p == r["teacher"] for r, p in zip(val_rows, val_preds.answers)]
        val_curve = coverage_curve(val_preds.confidence, val_agree)
    calib = {"whole": calibration(c_conf, c_agree, ev.calibration_bins), "fields": {}}
    for f in task.schema.enums:
        fc = [(preds.field_confidence[i] or {}).get(f) if preds.field_confidence else None for i in clean]
        ok = [p is not None and p.get(f) == r["teacher"].get(f) for r, p in zip(c_rows, c_preds)]
        calib["fields"][f] = calibration(fc, ok, ev.calibration_bins)
    calib["target"] = "agreement with the teacher"
    results = {
        "schema_version": 2, "recipe": cfg.recipe.name, "split": ev.split, "student": cfg.student.name,
        "teacher": cfg.teacher.model, "predictor": predictor, "metrics": metrics,
        "confusion": {f: confusion([r["teacher"].get(f) for r in c_rows],
                                   [None if p is None else p.get(f) for p in c_preds], labels)
                      for f, labels in task.schema.enums.items()},
        "coverage_curve": coverage_curve(c_conf, c_agree), "val_coverage_curve": val_curve,
        "val": {"n": len(val_rows), "agreement": round(agreement(val_preds.answers, [r["teacher"] for r in val_rows]),
                                                       4) if val_preds is not None and val_rows else None},
        "calibration": calib, "cost": cost, "speed": speed, "decontamination": decontamination, "gate": gate,
        "per_item": per_item, "generate": generate.get("teacher_vs_gold"),
        "ladder": (train_done.get("summary") or {}).get("ladder"),
        "training": report.training_end(train_done.get("summary") or {}),
        "embedding_baseline": embedding_baseline(cfg, task, train_rows,
                                                 load_split(run_dir, "val") if ev.split != "val" else [], c_rows,
                                                 c_agree, boot, endpoint=bool(endpoint)),
    }

    predictions = [{"id": r["id"], "input": r["input"], "teacher": r["teacher"], "gold": r.get("gold"),
                    "student_raw": t, "student": p, "invalid_reason": why, "confidence": c,
                    "field_confidence": fc, "latency_s": ls, "contaminated": r["id"] in dup}
                   for r, t, p, why, c, fc, ls in zip(rows, preds.raw, preds.answers, preds.invalid_reason,
                                                      preds.confidence, preds.field_confidence or [None] * len(rows),
                                                      preds.latency_s)]
    runio.write_jsonl(out_dir / paths.PREDICTIONS, predictions)
    contracts.write_results(out_dir / paths.RESULTS, results)
    report.write_all(out_dir, results, predictions, ev.worst, level=ev.confidence_level)
    for target, text in ((ev.junit_xml, gates.junit_xml(gate)), (ev.summary_md, gates.summary_markdown(results))):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a" if target == ev.summary_md else "w", encoding="utf-8") as fh:
                fh.write(text)

    valid = sum(p is not None for p in preds.answers)
    if endpoint and valid == 0:
        raise EndpointFailed(f"no valid answer from {endpoint} (model {ev.endpoint.model}) for any of {len(rows)} "
                             f"items: {_failure_text(preds.failures)}; report in {out_dir / paths.REPORT}")
    if endpoint and preds.failures:
        log.warning("evaluate: endpoint failures %s", _failure_text(preds.failures))
    log.info("evaluate: agreement %.3f [%s, %s] on %d clean items (%d duplicates left out), invalid %.3f, gate %s",
             metrics["agreement"]["exact"], metrics["agreement_ci"]["exact"]["low"],
             metrics["agreement_ci"]["exact"]["high"], len(clean), len(dup), metrics["invalid_rate"],
             "passed" if gate["passed"] else "FAILED")
    return {"metrics": {k: metrics[k] for k in ("n", "n_gold", "invalid_rate", "agreement", "student_vs_gold",
                                                "teacher_vs_gold") if k in metrics},
            "speed": speed, "gate": {k: gate[k] for k in ("passed", "reasons", "thresholds")},
            "cost": {k: cost[k] for k in ("teacher_usd_per_1k", "student_usd_per_1k", "break_even_requests")},
            "predictor": predictor, "results_sha256": runio.sha256_file(out_dir / paths.RESULTS)}


def _failure_text(failures: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])) or "none"


def raise_empty(run_dir: Path, split: str) -> None:
    raise DistillError(f"the {split} split in {paths.split_path(run_dir, split)} is empty: nothing to evaluate "
                       f"(label more inputs with generate.limit)")

