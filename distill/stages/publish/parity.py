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
from pathlib import Path

from distill import DistillError, paths, runio
from distill.config import Config
from distill.stages.publish.gguf import model_name
from distill.stages.publish.serving import SERVER_CTX
from distill.student import embed_classifier, predict
from distill.student import endpoint as student_endpoint
from distill.student.predictions import Predictions, agreement
from distill.task import Task
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

