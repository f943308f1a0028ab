"""publish's parity: each artifact, in its own runtime, answers the test items as the unquantized student did?

    python -m distill publish run_dir=DIR [publish.min_parity=0.9] [publish.verify_load=false]

Safetensors folders are reloaded in transformers and asked as evaluate asked the student; a GGUF is served by the
llama.cpp server and asked over HTTP (distill.student.endpoint), freely for parity and once more with the task's
schema as a gateway calls it; the embedding classifier's files are reloaded in a fresh classifier. The figures go
to publish/parity.json; an artifact below publish.min_parity is deleted from the staging folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distill import DistillError, paths, runio
from distill.config import Config
from distill.stages.publish.gguf import model_name
from distill.stages.publish.serving import SERVER_CTX
from distill.student import embed_classifier, predict
from distill.student import endpoint as student_endpoint
from distill.metrics.stats import coverage_curve
from distill.serve.runtime import Scorer
from distill.student.predictions import Predictions, agreement
from distill.task import Task, load_split
from distill.teacher.server import LlamaCppServer

log = logging.getLogger("distill")


def _evaluated_rows(run_dir: Path) -> list[dict]:
    """evaluate's predictions.jsonl: the items parity is measured on, each with the student's answer."""
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
    if not rows:
        raise DistillError(f"{paths.PREDICTIONS} in {paths.stage_dir(run_dir, 'evaluate')} is empty: no items to "
                           f"check parity on; re-run evaluate")
    return rows


def _load_hf(folder: Path):
    """(model, tokenizer) of a published safetensors folder, as transformers loads it (nf4 on the GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, **({"device_map": {"": 0}} if folder.name == paths.NF4_DIR
                                                             else {}))
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def stop_check(base_url: str, model: str, cfg: Config, task: Task, text: str) -> dict:
    """One ticket as a gateway sends it to llama.cpp (the task's schema as response_format): is the answer valid
    JSON, and does the server end it at the end-of-turn token (finish_reason "stop", not "length")?"""
    with student_endpoint.StudentEndpoint(base_url, model, timeout_s=60, max_retries=1) as client:
        reply = client.ask(task.student_messages(text), max_tokens=cfg.eval.max_new_tokens,
                           response_format=task.schema.response_format("llama_cpp"))
    if reply.failure:
        raise DistillError(f"the llama.cpp server serving {model} gave no answer to one test item "
                           f"({reply.failure}); nothing published: check that the GGUF loads in "
                           f"`python -m llama_cpp.server --model FILE`")
    answer, reason = task.schema.parse(reply.text)
    return {"finish_reason": reply.choice.finish_reason,
            "completion_tokens": reply.usage.completion_tokens if reply.usage else None,
            "raw": reply.text, "valid": answer is not None, "invalid_reason": reason,
            "latency_s": round(reply.latency_s, 3)}


def _endpoint_cfg(cfg: Config, structured_output: str) -> Config:
    """Settings for scoring a served GGUF: the student's prompt, the given constraint, log-probs on."""
    out = cfg.model_copy(deep=True)
    e = out.eval.endpoint
    e.prompt, e.structured_output, e.logprobs, e.api_key_env = "student", structured_output, True, None
    return out


def _compare(preds: Predictions, reference: list[dict | None], rows: list[dict]) -> dict:
    """Parity with ``reference``, agreement with it and with the teacher, invalid rate, failures, median latency."""
    n = len(rows)
    # Parity counts an item when both give the same answer or both give none: a gateway treats them alike.
    same = sum(a == b for a, b in zip(preds.answers, reference))
    out = {"n": n, "parity": round(same / n, 4),
           "agreement_with_reference": round(agreement(preds.answers, reference), 4),
           "agreement_with_teacher": round(agreement(preds.answers, [r["teacher"] for r in rows]), 4),
           "invalid_rate": round(sum(a is None for a in preds.answers) / n, 4), "failures": dict(preds.failures)}
    if preds.latency_s:
        out["latency_p50_s"] = sorted(preds.latency_s)[len(preds.latency_s) // 2]
    return out


def check_parity(cfg: Config, run_dir: Path, staging: Path, artifacts: dict, task: Task) -> dict[str, dict]:
    """Parity of every artifact with the unquantized student; those below publish.min_parity are deleted.

    Safetensors folders are scored in transformers exactly as evaluate scored the student (eval.decode) and
    compared with evaluate/predictions.jsonl. A GGUF is served by llama.cpp, which generates its answer freely;
    when evaluate ranked enum values instead (eval.decode=scored), the like-for-like reference is the merged
    full-precision student decoding freely, so parity measures the artifact and not the decoding method. Each GGUF
    is also served with the task's schema as response_format, as a gateway would call it: its agreement with
    evaluate's student and with the teacher that way is recorded under ``served_with_schema`` (not gated).
    """
    rows = _evaluated_rows(run_dir)
    student = [r.get("student") for r in rows]
    free_reference, free_source = student, f"evaluate/{paths.PREDICTIONS} (decode free)"
    results: dict[str, dict] = {}
    for rel, art in artifacts.items():
        if art["format"] != "safetensors":
            continue
        log.info("publish: parity of %s in transformers on %d items", rel, len(rows))
        model, tokenizer = _load_hf(staging / rel)
        preds = predict.predict_in_process(cfg, task, rows, model, tokenizer)
        results[rel] = {**_compare(preds, student, rows),
                        "reference": f"evaluate/{paths.PREDICTIONS} (decode {cfg.eval.decode})"}
        if art["type"] == "merged" and cfg.eval.decode != "free":
            free_cfg = cfg.model_copy(deep=True)
            free_cfg.eval.decode = "free"
            free_reference = predict.predict_in_process(free_cfg, task, rows, model, tokenizer).answers
            free_source = "merged full-precision student in transformers (decode free)"
        del model
    free_cfg, schema_cfg = _endpoint_cfg(cfg, "none"), _endpoint_cfg(cfg, "llama_cpp")
    for rel, art in artifacts.items():
        if art["format"] != "gguf":
            continue
        log.info("publish: parity of %s in the llama.cpp server on %d items", rel, len(rows))
        alias = model_name(cfg)
        with LlamaCppServer(staging / rel, alias=alias, n_ctx=SERVER_CTX, log_path=staging / "llama_server.log",
                            logits_all=True) as server:
            check = stop_check(server.base_url, alias, cfg, task, rows[0]["input"])
            free = student_endpoint.predict_endpoint(free_cfg, task, rows, server.base_url, alias)
            served = student_endpoint.predict_endpoint(schema_cfg, task, rows, server.base_url, alias)
        # Served with the task's schema, as a gateway would: how it compares with evaluate's student and teacher.
        with_schema = _compare(served, student, rows)
        with_schema["agreement_with_student"] = with_schema.pop("agreement_with_reference")
        del with_schema["parity"], with_schema["n"]
        results[rel] = {**_compare(free, free_reference, rows), "reference": free_source, "stop_check": check,
                        "served_with_schema": with_schema}
    for rel, res in results.items():
        res["published"] = res["parity"] >= cfg.publish.min_parity
        if not res["published"]:
            res["dropped_because"] = f"parity {res['parity']} < publish.min_parity {cfg.publish.min_parity}"
            log.warning("publish: %s not published: %s", rel, res["dropped_because"])
            target = staging / rel
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return {rel: results[rel] for rel in artifacts}


def classifier_parity(cfg: Config, run_dir: Path, staging: Path, task: Task) -> dict[str, dict]:
    """Parity of the published embedding classifier: its files, reloaded in a fresh classifier, must give evaluate's
    answer on every evaluated item (nothing is quantized, so any difference is a broken copy). Raises DistillError,
    and so publishes nothing, otherwise."""
    rows = _evaluated_rows(run_dir)
    log.info("publish: parity of the published classifier on %d items", len(rows))
    res = embed_classifier.check_parity(staging / paths.MODEL_DIR, rows, task, cfg.eval.batch_size)
    if res["parity"] < 1.0:
        raise DistillError(f"the published classifier answers differently from the evaluated one on "
                           f"{round((1 - res['parity']) * res['n'])} of {res['n']} items (parity {res['parity']}); "
                           f"nothing published: re-run train and evaluate")
    return {paths.MODEL_DIR: {**res, "published": True}}



def served_confidence(cfg: Config, run_dir: Path, staging: Path, rel: str, task: Task) -> dict:
    """The served GGUF's own confidence curves: ``rel`` scored by the gateway's scoring code on evaluate's items.

    The student runtime's ``Scorer`` (distill.serve.runtime, the same class ``python -m distill serve`` starts, with
    the runtime's context and threads from ``serve.*``) loads the GGUF in process and answers each item as the
    gateway asks it (the student's messages, the task's schema, eval.max_new_tokens); an answer the schema rejects
    has no confidence, as in the gateway. The items are those of evaluate's curves: the val split up to eval.limit
    and the clean evaluated test items, so the curves differ from results.json's only by the artifact.

    Returns:
        ``{"artifact", "scorer", "n_val", "n_test", "val_coverage_curve", "coverage_curve", "val_agreement",
        "agreement", "invalid_rate", "max_confidence_diff", "throughput"}``; ``max_confidence_diff`` is the largest
        difference from evaluate's confidence on the same test items (None where evaluate did not score them with a
        confidence); ``throughput`` times the pass (``served_throughput``): what publish prices the student at.
    """
    ev = cfg.eval
    val_rows = load_split(run_dir, "val")[: ev.limit] if ev.val_curve and ev.split != "val" else []
    # evaluate's predictions.jsonl holds each test item's input and teacher answer; its curve leaves out duplicates
    test_rows = [r for r in _evaluated_rows(run_dir) if not r.get("contaminated")]
    log.info("publish: scoring %s with the gateway's scorer on %d val + %d test items", rel, len(val_rows),
             len(test_rows))
    scorer = Scorer(staging / rel, staging / paths.MODEL_DIR / paths.HF_DIR, n_ctx=cfg.serve.student_n_ctx,
                    n_threads=cfg.serve.student_threads)
    answers, seconds = [], []
    try:
        started = time.perf_counter()
        for r in tqdm(val_rows + test_rows, desc="served GGUF (scored)", unit="item", leave=False):
            t0 = time.perf_counter()
            answers.append(_served_answer(scorer, cfg, task, r["input"]))
            seconds.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        threads = scorer.model.llm.n_threads
    finally:
        scorer.model.llm.close()
    val, test = answers[:len(val_rows)], answers[len(val_rows):]

    def agrees(answers, rows):
        return [a is not None and a == r["teacher"] for (a, _), r in zip(answers, rows)]

    diffs = [abs(c - e["confidence"]) for (_, c), e in zip(test, test_rows)
             if c is not None and e.get("confidence") is not None]
    return {"artifact": rel, "scorer": "distill.serve.runtime.Scorer, the student runtime's scored decode",
            "n_val": len(val_rows), "n_test": len(test_rows),
            "val_coverage_curve": coverage_curve([c for _, c in val], agrees(val, val_rows)),
            "coverage_curve": coverage_curve([c for _, c in test], agrees(test, test_rows)),
            "val_agreement": round(agreement([a for a, _ in val], [r["teacher"] for r in val_rows]), 4)
            if val_rows else None,
            "agreement": round(agreement([a for a, _ in test], [r["teacher"] for r in test_rows]), 4)
            if test_rows else None,
            "invalid_rate": round(sum(a is None for a, _ in test) / len(test), 4) if test else None,
            "max_confidence_diff": round(max(diffs), 6) if diffs else None,
            "throughput": served_throughput(rel, seconds, wall, threads)}


def served_throughput(rel: str, seconds: list[float], wall_s: float, threads: int) -> dict | None:
    """The served pass, timed: items/s of the shipped GGUF through the gateway's scorer, one request at a time
    (as the runtime serves them), and each item's latency. None when no item was scored."""
    if not seconds or wall_s <= 0:
        return None
    return {"items_per_s": round(len(seconds) / wall_s, 4), "items": len(seconds), "wall_s": round(wall_s, 3),
            "latency_p50_s": round(float(np.percentile(seconds, 50)), 4),
            "latency_p95_s": round(float(np.percentile(seconds, 95)), 4),
            "measured_by": "publish", "artifact": rel,
            "runtime": f"distill's student runtime (distill.serve.runtime.Scorer: llama.cpp, scored decode, the "
                       f"shared prompt prefix's KV cache kept, {threads} threads)",
            "concurrency": 1, "where": "the machine that ran publish (publish's served-confidence pass)"}


def _served_answer(scorer: Scorer, cfg: Config, task: Task, text: str) -> tuple[dict | None, float | None]:
    """(answer, confidence) as the gateway takes them from the runtime (distill.serve.student.ScoredStudent)."""
    out = scorer.score(task.student_messages(text), task.schema.schema, cfg.eval.max_new_tokens)
    answer = out.get("answer")
    if answer is not None and (not isinstance(answer, dict) or task.schema.errors(answer)):
        answer = None
    return answer, (out.get("confidence") if answer is not None else None)
