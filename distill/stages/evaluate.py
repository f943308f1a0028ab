"""evaluate: the student answers the held-out split; agreement with the teacher, accuracy vs gold, a gate.

    python -m distill evaluate recipe=support_tickets run_dir=DIR [eval.gate.min_agreement=0.8]

Writes evaluate/predictions.jsonl, results.json (stable keys, see README) and report.md. The command exits
non-zero with a one-line reason when the gate fails.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill import paths, runio
from distill.config import Config
from distill.task import OutputSchema, Task, load_split
from distill.template import render_prompt

log = logging.getLogger("distill")


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                     stop_token: str) -> tuple[list[str], list[float]]:
    """Greedy answers for rendered prompts, batched with left padding; returns (texts, seconds per item)."""
    tokenizer.padding_side = "left"
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    texts, latencies = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="student", unit="batch", leave=False):
        batch = prompts[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id,
                             pad_token_id=tokenizer.pad_token_id)
        per_item = (time.perf_counter() - t0) / len(batch)
        for row in out[:, enc["input_ids"].shape[1]:]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
            latencies.append(per_item)
    return texts, latencies


def score(rows: list[dict], preds: list[dict | None], schema: OutputSchema) -> dict:
    """Agreement with the teacher and accuracy vs gold, per field and for the whole object."""
    n = len(rows)
    valid = [p is not None for p in preds]
    out: dict = {"n": n, "invalid_rate": round(1 - sum(valid) / n, 4) if n else None}
    agree: dict = {}
    for field in schema.fields:
        agree[field] = _rate(p is not None and p.get(field) == r["teacher"].get(field) for r, p in zip(rows, preds))
    agree["exact"] = _rate(p is not None and p == r["teacher"] for r, p in zip(rows, preds))
    out["agreement"] = agree
    gold_pairs = [(r, p) for r, p in zip(rows, preds) if r.get("gold")]
    out["n_gold"] = len(gold_pairs)
    if gold_pairs:
        stu, tea = {}, {}
        for field in schema.fields:
            stu[field] = _rate(p is not None and p.get(field) == r["gold"].get(field) for r, p in gold_pairs)
            tea[field] = _rate(r["teacher"].get(field) == r["gold"].get(field) for r, _ in gold_pairs)
        stu["exact"] = _rate(p is not None and p == r["gold"] for r, p in gold_pairs)
        tea["exact"] = _rate(r["teacher"] == r["gold"] for r, _ in gold_pairs)
        out["student_vs_gold"], out["teacher_vs_gold"] = stu, tea
    return out


def _rate(flags) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def gate(cfg: Config, metrics: dict) -> dict:
    """Pass/fail against the configured thresholds and an optional baseline results.json."""
    g = cfg.eval.gate
    reasons = []
    agreement = metrics["agreement"]["exact"] or 0.0
    if agreement < g.min_agreement:
        reasons.append(f"agreement {agreement:.3f} < eval.gate.min_agreement {g.min_agreement}")
    if metrics["invalid_rate"] > g.max_invalid_rate:
        reasons.append(f"invalid rate {metrics['invalid_rate']:.3f} > eval.gate.max_invalid_rate "
                       f"{g.max_invalid_rate}")
    if cfg.eval.baseline:
        base = runio.read_json(Path(cfg.eval.baseline))
        base_agree = base["metrics"]["agreement"]["exact"]
        if agreement < base_agree:
            reasons.append(f"agreement {agreement:.3f} dropped below the baseline {base_agree:.3f} "
                           f"({cfg.eval.baseline})")
    return {"passed": not reasons, "reasons": reasons,
            "thresholds": {"min_agreement": g.min_agreement, "max_invalid_rate": g.max_invalid_rate,
                           "baseline": cfg.eval.baseline}}


def run(cfg: Config, run_dir: Path) -> dict:
    from distill.models import load_student
    from distill.template import end_of_turn

    out_dir = paths.stage_dir(run_dir, "evaluate")
    task = Task(cfg)
    rows = load_split(run_dir, cfg.eval.split)[: cfg.eval.limit]
    if not rows:
        raise_empty(run_dir, cfg.eval.split)
    model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
    prompts = [render_prompt(tokenizer, task.student_messages(r["input"])) for r in rows]
    started = time.perf_counter()
    texts, latencies = generate_answers(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                        end_of_turn(tokenizer))
    wall = time.perf_counter() - started
    preds, reasons = zip(*(task.schema.parse(t) for t in texts))
    metrics = score(rows, list(preds), task.schema)
    invalid_by_reason: dict[str, int] = {}
    for reason in reasons:
        if reason:
            invalid_by_reason[reason] = invalid_by_reason.get(reason, 0) + 1
    metrics["invalid_by_reason"] = invalid_by_reason
    lat_sorted = sorted(latencies)
    speed = {"items": len(rows), "wall_s": round(wall, 3), "items_per_s": round(len(rows) / wall, 3),
             "latency_p50_s": round(lat_sorted[len(lat_sorted) // 2], 4),
             "latency_p95_s": round(lat_sorted[min(len(lat_sorted) - 1, int(0.95 * len(lat_sorted)))], 4),
             "batch_size": cfg.eval.batch_size, "device": str(model.device)}
    verdict = gate(cfg, metrics)
    predictions = [{"id": r["id"], "input": r["input"], "teacher": r["teacher"], "gold": r.get("gold"),
                    "student_raw": t, "student": p, "invalid_reason": why}
                   for r, t, p, why in zip(rows, texts, preds, reasons)]
    runio.write_jsonl(out_dir / paths.PREDICTIONS, predictions)
    results = {"schema_version": 1, "recipe": cfg.recipe.name, "split": cfg.eval.split,
               "student": cfg.student.name, "teacher": cfg.teacher.model, "metrics": metrics, "speed": speed,
               "gate": verdict, "generate": runio.require_done(run_dir, "generate", "evaluate")["summary"].get(
                   "teacher_vs_gold")}
    runio.write_json(out_dir / paths.RESULTS, results)
    runio.atomic_write_text(out_dir / paths.REPORT, render_report(results, predictions))
    log.info("evaluate: agreement %.3f, invalid %.3f, gate %s", metrics["agreement"]["exact"],
             metrics["invalid_rate"], "passed" if verdict["passed"] else "FAILED")
    return {"metrics": metrics, "speed": speed, "gate": verdict,
            "results_sha256": runio.sha256_file(out_dir / paths.RESULTS)}


def raise_empty(run_dir: Path, split: str) -> None:
    from distill import DistillError

    raise DistillError(f"the {split} split in {paths.split_path(run_dir, split)} is empty: nothing to evaluate "
                       f"(label more inputs with generate.limit)")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_report(results: dict, predictions: list[dict]) -> str:
    m, s, g = results["metrics"], results["speed"], results["gate"]
    verdict = "PASS" if g["passed"] else "FAIL: " + "; ".join(g["reasons"])
    lines = [f"# Evaluation: {results['recipe']} ({results['student']} vs teacher {results['teacher']})", "",
             f"**Gate: {verdict}**", "",
             f"{m['n']} held-out items ({results['split']} split), {m['n_gold']} with gold labels.", "",
             "| | whole answer | " + " | ".join(k for k in m["agreement"] if k != "exact") + " |",
             "|---|---|" + "---|" * (len(m["agreement"]) - 1)]

    def row(name: str, d: dict | None) -> str:
        if not d:
            return f"| {name} | n/a |"
        return f"| {name} | {_pct(d['exact'])} | " + " | ".join(_pct(v) for k, v in d.items() if k != "exact") + " |"

    lines += [row("student agreement with teacher", m["agreement"]),
              row("student accuracy vs gold", m.get("student_vs_gold")),
              row("teacher accuracy vs gold", m.get("teacher_vs_gold")), "",
              f"Invalid student answers: {_pct(m['invalid_rate'])} {m.get('invalid_by_reason') or ''}", "",
              f"Student speed ({s['device']}, batch {s['batch_size']}): {s['items_per_s']} items/s, "
              f"p50 {s['latency_p50_s']} s, p95 {s['latency_p95_s']} s per item.", ""]
    disagreements = [p for p in predictions if p["student"] != p["teacher"]][:10]
    if disagreements:
        lines += ["## Disagreements with the teacher (first 10)", "", "| input | teacher | student |", "|---|---|---|"]
        for p in disagreements:
            text = p["input"].replace("\n", " ").replace("|", "/")[:120]
            student = p["student"] if p["student"] is not None else f"invalid ({p['invalid_reason']})"
            lines.append(f"| {text} | {p['teacher']} | {student} |")
    return "\n".join(lines) + "\n"
