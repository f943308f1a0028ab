"""publish: merge, quantize, prove parity, and write the routing rule, gateway config, serving snippets and card.

    python -m distill publish recipe=support_tickets run_dir=DIR [publish.target_agreement=0.98] [publish.force=true]

1. Artifacts (gguf.py): the adapter merged into a full-precision base (model/hf), GGUF files from llama.cpp's own
   converter and quantizer, optionally a bitsandbytes nf4 folder (CUDA).
2. Parity (parity.py): every artifact is reloaded in its runtime (GGUF in the llama.cpp server, safetensors in
   transformers), answers the evaluated test items through distill.student, and is compared with the unquantized
   student's answers; an artifact below publish.min_parity is dropped.
3. The threshold's evidence (parity.served_confidence): the GGUF the gateway will serve answers the val and test
   items evaluate scored, through the gateway's own scorer (distill.serve.runtime.Scorer); routing.yaml's threshold
   is chosen on that curve (parity.json keeps it under the artifact's served_confidence). That pass is timed, and
   the cost case routing.yaml, the card and DONE.json (``cost_case``) show prices the student at its items/s
   (metrics.cost.reprice_student), naming the artifact and runtime; results.json keeps evaluate's own case.
4. Serving files (serving.py): routing.yaml (distill.routing schema), litellm.yaml, Modelfile, SERVING.md; then
   MODEL_CARD.md and report.md (card.py).

student=embed_classifier has nothing to merge, convert or quantize: model/ gets a copy of its encoder (safetensors +
tokenizer) and its head (safetensors + JSON), parity reloads those files in a fresh classifier and requires the same
answer on every evaluated item, and routing.yaml, SERVING.md (in-process use), MODEL_CARD.md and report.md are written.
student=auto publishes the rung train chose (distill.student.ladder.resolve), whichever kind it is.

Everything is built in a staging folder and swapped into publish/ only when complete: a failure publishes nothing.
publish reads evaluate's files and never writes into evaluate/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from distill import DistillError, contracts, paths, runio
from distill.config import Config
from distill.metrics.cost import reprice_student
from distill.metrics.gate import failure_reasons
from distill.stages.publish.card import calibrate_cache, priced_line, render_card, report_markdown
from distill.stages.publish.gguf import build_artifacts, merge_adapter
from distill.stages.publish.parity import check_parity, classifier_parity, served_confidence
from distill.stages.publish.serving import build_rule, served_gguf, threshold_lines, write_serving
from distill.student import embed_classifier, ladder
from distill.task import Task

log = logging.getLogger("distill")


def check_adapter(adapter: Path, expected_sha256: str | None) -> None:
    """The trained adapter is complete, readable, and the one train finished with. Raises DistillError."""

    weights = adapter / "adapter_model.safetensors"
    retrain = f"re-run `python -m distill train run_dir={adapter.parent.parent}`"
    if not (adapter / "adapter_config.json").is_file() or not weights.is_file():
        raise DistillError(f"no trained adapter in {adapter} (adapter_config.json + adapter_model.safetensors); "
                           f"{retrain}")
    try:
        json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key)
    except Exception as exc:  # safetensors / json raise several types for a damaged file
        raise DistillError(f"the adapter in {adapter} is corrupt ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160]}); {retrain}") from None
    if expected_sha256 and runio.sha256_tree(adapter) != expected_sha256:
        raise DistillError(f"the adapter in {adapter} changed after train finished (its sha256 no longer matches "
                           f"train/DONE.json); {retrain}")


def run(cfg: Config, run_dir: Path) -> dict:
    """Publish the run's student: see the module docstring. Raises DistillError and publishes nothing on failure."""
    final = paths.stage_dir(run_dir, "publish")
    cfg = ladder.resolve(cfg, run_dir)  # student=auto: the rung train chose (train/DONE.json), not the config
    evaluation = runio.require_done(run_dir, "evaluate", "publish")["summary"]
    forced_past = failure_reasons(evaluation)  # the failed gate's reasons, when publish.force goes past it
    if forced_past is not None and not cfg.publish.force:
        raise DistillError("not publishing: the evaluate gate failed (" + "; ".join(forced_past)
                           + "); improve the student or set publish.force=true to publish anyway")
    generate = runio.require_done(run_dir, "generate", "publish")["summary"]
    train = runio.require_done(run_dir, "train", "publish")["summary"]
    classifier = cfg.student.kind == "embed_classifier"
    if classifier:
        embed_classifier.check_head(paths.head_path(run_dir), train.get("head_sha256"))
    else:
        check_adapter(paths.adapter_path(run_dir), train.get("adapter_sha256"))
    results_file = paths.stage_dir(run_dir, "evaluate") / paths.RESULTS
    if not results_file.is_file():
        raise DistillError(f"{results_file} is missing; re-run `python -m distill evaluate run_dir={run_dir}`")
    if cfg.publish.nf4 and not torch.cuda.is_available():
        raise DistillError("publish.nf4 needs a CUDA GPU (bitsandbytes); set publish.nf4=false on this machine")
    results = contracts.load_results(results_file)
    predictor = results.get("predictor") or {}
    if cfg.publish.verify_load and predictor.get("kind", "in_process") != "in_process":
        raise DistillError(f"evaluate scored an endpoint ({predictor.get('base_url')}), not the in-process student "
                           f"that parity compares every artifact with; re-run evaluate without eval.endpoint.base_url")
    task = Task(cfg)

    staging = final.with_name(f".publish-staging-{os.getpid()}")
    runio.remove_leftovers(final.parent, ".publish-staging-")  # those of killed runs (and ours, from earlier)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if classifier:
            (staging / paths.MODEL_DIR).mkdir(parents=True)
            eot = tokenizer = None  # it generates nothing: no end-of-turn token, no chat template
            artifacts = embed_classifier.write_published(cfg, run_dir, staging / paths.MODEL_DIR)
            parity = classifier_parity(cfg, run_dir, staging, task) if cfg.publish.verify_load else {}
        else:
            hf_dir = staging / paths.MODEL_DIR / paths.HF_DIR
            hf_dir.mkdir(parents=True)
            eot = merge_adapter(cfg, run_dir, hf_dir)
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            artifacts = build_artifacts(cfg, staging, hf_dir, tokenizer, eot)
            parity = check_parity(cfg, run_dir, staging, artifacts, task) if cfg.publish.verify_load else {}
        published = {rel: art for rel, art in artifacts.items() if parity.get(rel, {}).get("published", True)}
        if not published:
            raise DistillError("no artifact reached publish.min_parity " + str(cfg.publish.min_parity) + " ("
                               + ", ".join(f"{rel} {res['parity']}" for rel, res in parity.items())
                               + "); nothing published")
        results_sha = runio.sha256_file(results_file)
        rule = build_rule(cfg, task, results, results_sha, published, eot)
        # The threshold is calibrated on the confidence the gateway computes on what it serves: the served GGUF's,
        # from the gateway's own scorer (the classifier runs in process with evaluate's code: its curve stands).
        served_rel = served_gguf(cfg, rule) if cfg.publish.verify_load else None
        served = served_confidence(cfg, run_dir, staging, served_rel, task) if served_rel else None
        priced = results["cost"]  # the cost case routing.yaml and the card show: evaluate's, or the served GGUF's
        if served:
            parity[served_rel]["served_confidence"] = served
            if served.get("throughput"):  # price the student as it ships: the GGUF, timed in the gateway's runtime
                priced = reprice_student(results["cost"], served["throughput"])
            rule = build_rule(cfg, task, {**results, "cost": priced}, results_sha, published, eot, served)
        contracts.write_parity(staging / paths.PARITY, parity)
        contracts.write_schemas(staging)
        write_serving(cfg, task, staging, rule, published, tokenizer, eot)
        files = {p.relative_to(staging).as_posix(): runio.sha256_file(p)
                 for p in sorted((staging / paths.MODEL_DIR).rglob("*")) if p.is_file()}
        calibrate_cache(cfg, staging)  # serve.semantic_cache.enabled: its table and plot in the card and report
        card = render_card(cfg, generate, train, results, rule, artifacts, parity, files, forced_past, priced)
        runio.atomic_write_text(staging / paths.MODEL_CARD, card)
        tail = [*threshold_lines(rule, results, served), "", "## The cost case", "", priced_line(priced)]
        runio.atomic_write_text(staging / paths.REPORT, report_markdown(cfg, artifacts, parity, tail))
        # Swap the finished staging folder into place: publish/ is either the old complete one (with its DONE.json)
        # or the new one (no DONE.json until the pipeline writes it), never old files half deleted; the old folder
        # is deleted only after the swap, and one left by a kill is removed by the next publish.
        runio.swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    route = rule.route
    log.info("publish: %d artifact(s); route %s", len(published),
             f"enabled at confidence >= {route.confidence_threshold} (coverage {route.expected_coverage})"
             if route.enabled else f"disabled ({route.reason})")
    checks = {Path(rel).name: {"loads": True, **res["stop_check"]} for rel, res in parity.items()
              if "stop_check" in res}  # each served GGUF: one ticket, and where its answer ended
    return {"artifacts": published, "parity": parity, "checks": checks,
            "dropped": {rel: res["dropped_because"] for rel, res in parity.items() if not res["published"]},
            "routing": rule.route.model_dump(), "cost": rule.cost.model_dump(), "cost_case": priced,
            "files_sha256": files,
            "forced": forced_past is not None}
