"""publish: merge, quantize, prove parity, and write the routing rule, gateway config, serving snippets and card.

    python -m distill publish recipe=support_tickets run_dir=DIR [publish.target_agreement=0.98] [publish.force=true]

1. The adapter is merged into a full-precision base (never a 4-bit one) and saved as safetensors with the tokenizer
   and chat template (model/hf); GGUF files come from llama.cpp's own converter (f16, ...) and quantizer (q8_0,
   q4_k_m, ...), which keeps the token embedding and output tensors in publish.embedding_type (f16: on a small model
   with tied embeddings, quantizing that one matrix moved most of the answers that changed); optionally a
   bitsandbytes nf4 folder (CUDA).
2. Every artifact is reloaded in its runtime (GGUF in the llama.cpp server, safetensors in transformers), answers the
   evaluated test items with evaluate's code, and is compared with the unquantized student's answers; an artifact
   below publish.min_parity is dropped.
3. routing.yaml (distill.routing schema), litellm.yaml, Modelfile, SERVING.md and MODEL_CARD.md are written.

student=embed_classifier has nothing to merge, convert or quantize: model/ gets a copy of its encoder (safetensors +
tokenizer) and its head (safetensors + JSON), parity reloads those files in a fresh classifier and requires the same
answer on every evaluated item, and routing.yaml, SERVING.md (in-process use) and MODEL_CARD.md are written.

Everything is built in a staging folder and swapped into publish/ only when complete: a failure publishes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import yaml

from distill import DistillError, paths, routing, runio
from distill.config import GGUF_QUANTIZER_TYPES, Config
from distill.students import embed_classifier
from distill.task import Task

log = logging.getLogger("distill")

SERVER_CTX = 2048  # context the llama.cpp server gets for parity checks and in the serving snippets


# ---------------------------------------------------------------------------------------------------------------
# inputs: the gate and the adapter


def check_gate(cfg: Config, evaluation: dict) -> dict:
    """The evaluate gate; raises unless it passed or publish.force is set."""
    gate = evaluation.get("gate", {})
    if not gate.get("passed", True) and not cfg.publish.force:
        raise DistillError("not publishing: the evaluate gate failed (" + "; ".join(gate.get("reasons", []))
                           + "); improve the student or set publish.force=true to publish anyway")
    return gate


def check_adapter(adapter: Path, expected_sha256: str | None) -> None:
    """The trained adapter is complete, readable, and the one train finished with. Raises DistillError."""
    from safetensors import safe_open

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


# ---------------------------------------------------------------------------------------------------------------
# building artifacts


def converter_dir() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, installed by `make setup` (scripts/install_converter.py)."""
    folder = Path(os.environ.get("DISTILL_LLAMA_CONVERT", Path(sys.prefix) / "share" / "distill" / "llama_cpp_convert"))
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise DistillError(f"llama.cpp's converter is not installed in {folder}; run `make setup` (or "
                           f"`python scripts/install_converter.py --version <llama-cpp-python version>`)")
    return folder


def _log_tail(log_file: Path, n: int = 3) -> str:
    return " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-n:]) if log_file.exists() else ""


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str, log_file: Path, model_name: str) -> None:
    """HF folder -> GGUF with llama.cpp's own converter (its tensor mapping, tokenizer and chat-template export)."""
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]), "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out_file),
           "--outtype", outtype, "--model-name", model_name]
    with open(log_file, "ab") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_file.exists():
        raise DistillError(f"GGUF conversion ({outtype}) failed with code {proc.returncode}: {_log_tail(log_file)}")


def quantize_gguf(src: Path, out_file: Path, qtype: str, log_file: Path, embedding_type: str | None = None) -> Counter:
    """f16 GGUF -> ``qtype`` with llama.cpp's quantizer (llama_model_quantize), in a child process so that a
    llama.cpp abort cannot take the pipeline down. ``embedding_type`` keeps the token embedding and output tensors in
    that type. Tensors whose rows do not fit the k-quant block get llama.cpp's own per-tensor fallback type; returns
    how many tensors fell back, by type."""
    cmd = [sys.executable, "-m", "distill.stages.publish", "quantize", str(src), str(out_file), qtype,
           embedding_type or "none"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(proc.stdout)
    if proc.returncode != 0 or not out_file.exists():
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        raise DistillError(f"llama.cpp quantization to {qtype} failed with code {proc.returncode}: {tail}")
    # llama.cpp logs one "... not divisible by 256 ... -> falling back to q5_0" line per tensor it could not k-quant
    return Counter(line.rsplit("falling back to", 1)[1].strip() for line in proc.stdout.splitlines()
                   if "falling back to" in line)


def _quantize_main(src: str, dst: str, qtype: str, embedding_type: str = "none") -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = os.cpu_count() or 1
    if embedding_type != "none":  # llama-quantize's --token-embedding-type and --output-tensor-type
        params.token_embedding_type = params.output_tensor_type = getattr(llama_cpp,
                                                                          f"GGML_TYPE_{embedding_type.upper()}")
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), llama_cpp.byref(params)))


def gguf_facts(gguf: Path, tokenizer, eot: str) -> dict:
    """What travelled into a GGUF: chat template, stop token ids, tensor types. Raises if template or stop is lost."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    eot_id = tokenizer.convert_tokens_to_ids(eot)
    template = field("tokenizer.chat_template")
    stop_ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")}
    if template != tokenizer.chat_template:
        raise DistillError(f"{gguf.name}: the chat template did not travel into the GGUF metadata "
                           f"(tokenizer.chat_template {'missing' if template is None else 'differs'}); check the "
                           f"llama.cpp converter version (`make setup`)")
    if eot_id not in stop_ids.values():
        raise DistillError(f"{gguf.name}: end-of-turn token {eot!r} (id {eot_id}) is neither the GGUF's eos nor eot "
                           f"token ({stop_ids}); servers would not stop at the end of an answer")
    return {"chat_template": True, "eot": eot, "eot_id": eot_id, **{f"{k}_id": v for k, v in stop_ids.items()},
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())}


def merge_adapter(cfg: Config, run_dir: Path, hf_dir: Path) -> str:
    """Merge the LoRA adapter into a full-precision base and save safetensors + tokenizer + chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from distill.models import load_base
    from distill.template import end_of_turn

    adapter = paths.adapter_path(run_dir)
    merge_cfg = cfg.model_copy(deep=True)
    merge_cfg.student.load_in_4bit = False  # never merge into a 4-bit base: that bakes quantization error in
    if cfg.student.dtype == "float16":
        merge_cfg.student.dtype = "float32"
    base, _ = load_base(merge_cfg)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except Exception as exc:  # peft raises many types for a damaged adapter
        raise DistillError(f"the adapter in {adapter} cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); re-run train") from None
    merged = model.merge_and_unload()
    eot = end_of_turn(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    merged.generation_config.eos_token_id = eot_id
    merged.config.eos_token_id = eot_id
    merged.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    del merged, model, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return eot


def save_nf4(hf_dir: Path, out_dir: Path) -> None:
    """bitsandbytes nf4 safetensors of the merged model, for transformers / vLLM (`--quantization bitsandbytes`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=quant, device_map={"": 0})
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()


def build_artifacts(cfg: Config, staging: Path, hf_dir: Path, tokenizer, eot: str) -> dict[str, dict]:
    """Every requested artifact, by its path relative to the publish folder."""
    model_dir = staging / paths.MODEL_DIR
    stem = model_name(cfg)
    convert_log = staging / "convert.log"
    artifacts: dict[str, dict] = {f"{paths.MODEL_DIR}/{paths.HF_DIR}": {"format": "safetensors", "type": "merged",
                                                                         "runtime": "transformers"}}
    f16 = None
    for gtype in cfg.publish.gguf_types:
        gguf = model_dir / f"{stem}-{gtype}.gguf"
        started = time.perf_counter()
        fallbacks: Counter = Counter()
        quantizer = gtype in GGUF_QUANTIZER_TYPES or (gtype == "q8_0" and cfg.publish.embedding_type is not None)
        if not quantizer:
            convert_to_gguf(hf_dir, gguf, gtype, convert_log, stem)
        else:
            if f16 is None:  # the quantizer's input; published only when f16 itself was asked for
                f16 = model_dir / f"{stem}-f16.gguf"
                if not f16.exists():
                    convert_to_gguf(hf_dir, f16, "f16", convert_log, stem)
            fallbacks = quantize_gguf(f16, gguf, gtype, staging / "quantize.log", cfg.publish.embedding_type)
        facts = gguf_facts(gguf, tokenizer, eot)
        artifacts[gguf.relative_to(staging).as_posix()] = {
            "format": "gguf", "type": gtype, "runtime": "llama.cpp", "bytes": gguf.stat().st_size,
            "build_s": round(time.perf_counter() - started, 2), **facts}
        if quantizer:
            artifacts[gguf.relative_to(staging).as_posix()].update(quantizer_fallbacks=dict(fallbacks),
                                                                   embedding_type=cfg.publish.embedding_type)
        log.info("publish: %s (%.1f MB, tensors %s)", gguf.name, gguf.stat().st_size / 1e6, facts["tensor_types"])
    if f16 is not None and "f16" not in cfg.publish.gguf_types:
        f16.unlink()
    if cfg.publish.nf4:
        save_nf4(hf_dir, model_dir / paths.NF4_DIR)
        artifacts[f"{paths.MODEL_DIR}/{paths.NF4_DIR}"] = {"format": "safetensors", "type": "nf4",
                                                            "runtime": "transformers"}
    for rel, art in artifacts.items():
        if art["format"] == "safetensors":
            art["bytes"] = sum(p.stat().st_size for p in (staging / rel).rglob("*") if p.is_file())
    return artifacts


def model_name(cfg: Config) -> str:
    return f"{cfg.recipe.name}-{cfg.student.name}"


# ---------------------------------------------------------------------------------------------------------------
# parity: every artifact in its own runtime, against the unquantized student


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, **({"device_map": {"": 0}} if folder.name == paths.NF4_DIR
                                                             else {}))
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def stop_check(base_url: str, model: str, cfg: Config, task: Task, text: str) -> dict:
    """One ticket as a gateway sends it to llama.cpp (the task's schema as response_format): is the answer valid
    JSON, and does the server end it at the end-of-turn token (finish_reason "stop", not "length")?"""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="not-needed", timeout=60, max_retries=1)
    t0 = time.perf_counter()
    resp = client.chat.completions.create(model=model, messages=task.student_messages(text), temperature=0,
                                          max_tokens=cfg.eval.max_new_tokens,
                                          response_format=task.schema.response_format("llama_cpp"))
    choice = resp.choices[0]
    answer, reason = task.schema.parse(choice.message.content)
    return {"finish_reason": choice.finish_reason, "completion_tokens": resp.usage.completion_tokens,
            "raw": choice.message.content, "valid": answer is not None, "invalid_reason": reason,
            "latency_s": round(time.perf_counter() - t0, 3)}


def _endpoint_cfg(cfg: Config, structured_output: str) -> Config:
    """Settings for scoring a served GGUF: the student's prompt, the given constraint, log-probs on."""
    out = cfg.model_copy(deep=True)
    e = out.eval.endpoint
    e.prompt, e.structured_output, e.logprobs, e.api_key_env = "student", structured_output, True, None
    return out


def _compare(preds, reference: list[dict | None], rows: list[dict]) -> dict:
    from distill.stages import evaluate

    n = len(rows)
    # Parity counts an item when both give the same answer or both give none: a gateway treats them alike.
    same = sum(a == b for a, b in zip(preds.answers, reference))
    out = {"n": n, "parity": round(same / n, 4),
           "agreement_with_reference": round(evaluate.agreement(preds.answers, reference), 4),
           "agreement_with_teacher": round(evaluate.agreement(preds.answers, [r["teacher"] for r in rows]), 4),
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
    from distill.stages import evaluate
    from distill.teacher.server import LlamaCppServer

    rows = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
    if not rows:
        raise DistillError(f"{paths.PREDICTIONS} in {paths.stage_dir(run_dir, 'evaluate')} is empty: no items to "
                           f"check parity on; re-run evaluate")
    student = [r.get("student") for r in rows]
    free_reference, free_source = student, f"evaluate/{paths.PREDICTIONS} (decode free)"
    results: dict[str, dict] = {}
    for rel, art in artifacts.items():
        if art["format"] != "safetensors":
            continue
        log.info("publish: parity of %s in transformers on %d items", rel, len(rows))
        model, tokenizer = _load_hf(staging / rel)
        preds = evaluate.predict_in_process(cfg, task, rows, model, tokenizer)
        results[rel] = {**_compare(preds, student, rows),
                        "reference": f"evaluate/{paths.PREDICTIONS} (decode {cfg.eval.decode})"}
        if art["type"] == "merged" and cfg.eval.decode != "free":
            free_cfg = cfg.model_copy(deep=True)
            free_cfg.eval.decode = "free"
            free_reference = evaluate.predict_in_process(free_cfg, task, rows, model, tokenizer).answers
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
            free = evaluate.predict_endpoint(free_cfg, task, rows, server.base_url, alias)
            served = evaluate.predict_endpoint(schema_cfg, task, rows, server.base_url, alias)
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
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
    if not rows:
        raise DistillError(f"{paths.PREDICTIONS} in {paths.stage_dir(run_dir, 'evaluate')} is empty: no items to "
                           f"check parity on; re-run evaluate")
    log.info("publish: parity of the published classifier on %d items", len(rows))
    res = embed_classifier.check_parity(staging / paths.MODEL_DIR, rows, task, cfg.eval.batch_size)
    if res["parity"] < 1.0:
        raise DistillError(f"the published classifier answers differently from the evaluated one on "
                           f"{round((1 - res['parity']) * res['n'])} of {res['n']} items (parity {res['parity']}); "
                           f"nothing published: re-run train and evaluate")
    return {paths.MODEL_DIR: {**res, "published": True}}


# ---------------------------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, run_dir: Path) -> dict:
    """Publish the run's student: see the module docstring. Raises DistillError and publishes nothing on failure."""
    from transformers import AutoTokenizer

    final = paths.stage_dir(run_dir, "publish")
    evaluation = runio.require_done(run_dir, "evaluate", "publish")["summary"]
    gate = check_gate(cfg, evaluation)
    forced = bool(cfg.publish.force and not gate.get("passed", True))
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
    if cfg.publish.nf4:
        import torch

        if not torch.cuda.is_available():
            raise DistillError("publish.nf4 needs a CUDA GPU (bitsandbytes); set publish.nf4=false on this machine")
    results = runio.read_json(results_file)
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
        runio.write_json(staging / paths.PARITY, parity)
        results_sha = runio.sha256_file(results_file)
        rule = build_rule(cfg, task, results, results_sha, published, eot)
        write_serving(cfg, task, staging, rule, published, tokenizer, eot)
        files = {p.relative_to(staging).as_posix(): runio.sha256_file(p)
                 for p in sorted((staging / paths.MODEL_DIR).rglob("*")) if p.is_file()}
        card = render_card(cfg, generate, train, results, rule, artifacts, parity, files,
                           gate.get("reasons", []) if forced else None)
        runio.atomic_write_text(staging / paths.MODEL_CARD, card)
        # Swap the finished staging folder into place: publish/ is either the old complete one (with its DONE.json)
        # or the new one (no DONE.json until the pipeline writes it), never old files half deleted; the old folder
        # is deleted only after the swap, and one left by a kill is removed by the next publish.
        runio.swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    add_to_report(cfg, run_dir, artifacts, parity)
    route = rule.route
    log.info("publish: %d artifact(s); route %s", len(published),
             f"enabled at confidence >= {route.confidence_threshold} (coverage {route.expected_coverage})"
             if route.enabled else f"disabled ({route.reason})")
    checks = {Path(rel).name: {"loads": True, **res["stop_check"]} for rel, res in parity.items()
              if "stop_check" in res}  # each served GGUF: one ticket, and where its answer ended
    return {"artifacts": published, "parity": parity, "checks": checks,
            "dropped": {rel: res["dropped_because"] for rel, res in parity.items() if not res["published"]},
            "routing": rule.route.model_dump(), "cost": rule.cost.model_dump(), "files_sha256": files,
            "forced": forced}


# ---------------------------------------------------------------------------------------------------------------
# routing rule, LiteLLM config, serving snippets


def _fallback(cfg: Config) -> routing.FallbackSpec:
    if cfg.teacher.kind == "openai":
        return routing.FallbackSpec(model=cfg.teacher.model, endpoint=cfg.teacher.base_url,
                                    api_key_env=cfg.teacher.api_key_env)
    # distill starts the embedded teacher on a random loopback port; SERVING.md serves it on a fixed one.
    return routing.FallbackSpec(model=cfg.teacher.model or "teacher", endpoint=_teacher_local_endpoint(cfg))


def _teacher_local_endpoint(cfg: Config) -> str:
    student = urlparse(cfg.publish.endpoint)
    return f"{student.scheme}://{student.hostname}:{(student.port or 80) + 1}/v1"


def build_rule(cfg: Config, task: Task, results: dict, results_sha: str, published: dict,
               eot: str) -> routing.RoutingRule:
    """The routing rule: threshold from the validation curve, coverage and blended cost, evidence."""
    target = cfg.publish.target_agreement
    val_curve = results.get("val_coverage_curve")
    test_curve = results.get("coverage_curve") or []
    cost = results.get("cost") or {}
    choice = None
    if not val_curve:
        reason = "results.json has no val_coverage_curve (student confidence on the val split); re-run evaluate"
    else:
        choice = routing.choose_threshold(val_curve, target, cfg.publish.min_route_items)
        n_val = max(p.get("n", 0) for p in val_curve)
        best = max((p.get("agreement") or 0.0 for p in val_curve if p.get("n", 0) >= cfg.publish.min_route_items),
                   default=None)
        if choice:
            reason = (f"confidence >= {choice.threshold} keeps {choice.coverage:.1%} of val items at agreement "
                      f"{choice.agreement:.3f} >= target {target}")
        elif best is None:
            reason = (f"the val split has {n_val} items, fewer than publish.min_route_items "
                      f"{cfg.publish.min_route_items}: too few to choose a threshold; every request goes to the "
                      f"teacher")
        else:
            reason = (f"no confidence threshold reaches agreement {target} on >= {cfg.publish.min_route_items} val "
                      f"items (best {best:.3f}); every request goes to the teacher")
    test_point = routing.point_at(test_curve, choice.threshold) if choice and test_curve else None
    blended, saving = routing.blended_cost(choice.coverage if choice else None, cost.get("teacher_usd_per_1k"),
                                           cost.get("student_usd_per_1k"))
    rule = routing.RoutingRule(
        task=routing.TaskSpec(id=cfg.recipe.name, description=cfg.recipe.description,
                              match=routing.Match(metadata={"distill_task": cfg.recipe.name},
                                                  model_aliases=[cfg.recipe.name]),
                              output_schema=task.schema.schema),
        student=routing.StudentSpec(model=model_name(cfg), endpoint=cfg.publish.endpoint,
                                    artifacts={_artifact_key(art): rel for rel, art in published.items()},
                                    kind=cfg.student.kind, stop=[eot] if eot else [],
                                    # a classifier has no token limit: its answer is never generated
                                    max_tokens=None if cfg.student.kind == "embed_classifier"
                                    else cfg.eval.max_new_tokens),
        fallback=_fallback(cfg),
        route=routing.RouteSpec(enabled=choice is not None, confidence_threshold=choice and choice.threshold,
                                target_agreement=target, expected_coverage=choice and choice.coverage,
                                expected_agreement=choice and choice.agreement, reason=reason),
        cost=routing.CostSpec(teacher_usd_per_1k=cost.get("teacher_usd_per_1k"),
                              student_usd_per_1k=cost.get("student_usd_per_1k"), blended_usd_per_1k=blended,
                              saving_vs_teacher=saving),
        evidence=routing.Evidence(results_sha256=results_sha, curve="val_coverage_curve",
                                  n_val=max((p.get("n", 0) for p in val_curve), default=0) if val_curve else None,
                                  test_coverage=test_point and test_point["coverage"],
                                  test_agreement=test_point and test_point["agreement"]))
    return routing.validate_rule(rule.model_dump(mode="json"), "the routing rule publish built")


def _artifact_key(art: dict) -> str:
    return f"gguf-{art['type']}" if art["format"] == "gguf" else f"safetensors-{art['type']}"


def litellm_config(rule: routing.RoutingRule) -> dict:
    """A LiteLLM router config: the task's name served by the student, falling back to the teacher on errors."""
    teacher_name = f"{rule.task.id}-teacher"
    student = {"model": f"openai/{rule.student.model}", "api_base": rule.student.endpoint, "api_key": "none",
               "stop": rule.student.stop, "max_tokens": rule.student.max_tokens,
               "temperature": rule.student.temperature}
    teacher = {"model": f"openai/{rule.fallback.model}", "api_base": rule.fallback.endpoint,
               "api_key": f"os.environ/{rule.fallback.api_key_env}" if rule.fallback.api_key_env else "none"}
    return {"model_list": [{"model_name": rule.task.id, "litellm_params": student},
                           {"model_name": teacher_name, "litellm_params": teacher}],
            "router_settings": {"fallbacks": [{rule.task.id: [teacher_name]}]}}


def ollama_template(tokenizer, eot: str) -> str:
    """An Ollama TEMPLATE rendered from the model's own chat template (one system + one user turn, as trained)."""
    sys_mark, user_mark = "\u2063SYSTEM\u2063", "\u2063PROMPT\u2063"
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": sys_mark},
                                            {"role": "user", "content": user_mark}],
                                           tokenize=False, add_generation_prompt=True)
    return prompt.replace(sys_mark, "{{ .System }}").replace(user_mark, "{{ .Prompt }}") + "{{ .Response }}" + eot


def write_serving(cfg: Config, task: Task, staging: Path, rule: routing.RoutingRule, published: dict,
                  tokenizer, eot: str) -> None:
    """routing.yaml + its JSON schema, litellm.yaml, Modelfile and SERVING.md."""
    header = (f"# distill routing rule, schema version {routing.SCHEMA_VERSION} (routing.schema.json); "
              f"load with distill.routing.load_rule\n")
    runio.atomic_write_text(staging / paths.ROUTING, header + yaml.safe_dump(rule.model_dump(mode="json"),
                                                                             sort_keys=False, allow_unicode=True))
    runio.write_json(staging / paths.ROUTING_SCHEMA, routing.json_schema())
    if rule.student.kind == "embed_classifier":  # loaded in process: no server, so no LiteLLM or Ollama config
        runio.atomic_write_text(staging / paths.SERVING, embed_classifier.serving_markdown(rule.student.model))
        return
    runio.atomic_write_text(staging / paths.LITELLM, "# litellm --config litellm.yaml  (fallback on errors; the "
                            "confidence rule is distill.routing.decide)\n"
                            + yaml.safe_dump(litellm_config(rule), sort_keys=False, allow_unicode=True))
    ggufs = [rel for rel, art in published.items() if art["format"] == "gguf"]
    gguf = next((g for g in ggufs if g.endswith("-q8_0.gguf")), ggufs[0] if ggufs else None)
    name, endpoint = rule.student.model, urlparse(rule.student.endpoint)
    port = endpoint.port or 8080
    lines = [f"# Serving {name}", "",
             f"Answers end at `{eot}`; every command below keeps the model's chat template and that stop token.",
             "Constrain each answer to the task's schema (`task.output_schema` in routing.yaml) per request: "
             "llama.cpp `response_format={\"type\": \"json_object\", \"schema\": ...}`, vLLM / OpenAI "
             "`{\"type\": \"json_schema\", ...}`, Ollama `format: <schema>`.", ""]
    if gguf:
        template = ollama_template(tokenizer, eot)
        for text in (task.student_system, template):
            if '"""' in text:
                raise DistillError('the student prompt or chat template contains """, which an Ollama Modelfile '
                                   'cannot quote; remove it from the recipe\'s student_prompt')
        modelfile = [f"# ollama create {name} -f Modelfile", f"FROM ./{gguf}",
                     f'TEMPLATE """{template}"""',
                     f'SYSTEM """{task.student_system}"""', f'PARAMETER stop "{eot}"', "PARAMETER temperature 0",
                     f"PARAMETER num_predict {rule.student.max_tokens}", f"PARAMETER num_ctx {SERVER_CTX}"]
        runio.atomic_write_text(staging / paths.MODELFILE, "\n".join(modelfile) + "\n")
        lines += ["## llama.cpp", "", "```bash",
                  f"llama-server -m {gguf} --host {endpoint.hostname} --port {port} --alias {name} --jinja "
                  f"-c {SERVER_CTX}",
                  f"python -m llama_cpp.server --model {gguf} --host {endpoint.hostname} --port {port} "
                  f"--model_alias {name} --n_ctx {SERVER_CTX}", "```", "",
                  "## Ollama", "", "```bash", f"ollama create {name} -f {paths.MODELFILE}", f"ollama run {name}",
                  "```", ""]
    hf_rel = next((rel for rel, art in published.items() if art["type"] == "merged"), None)
    nf4_rel = next((rel for rel, art in published.items() if art["type"] == "nf4"), None)
    if hf_rel or nf4_rel:
        lines += ["## vLLM", "", "```bash"]
        if hf_rel:
            lines.append(f"vllm serve {hf_rel} --served-model-name {name} --host {endpoint.hostname} --port {port} "
                         f"--max-model-len {SERVER_CTX} --generation-config auto")
        if nf4_rel:
            lines.append(f"vllm serve {nf4_rel} --quantization bitsandbytes --served-model-name {name} "
                         f"--host {endpoint.hostname} --port {port} --max-model-len {SERVER_CTX}")
        lines += ["```", ""]
    if cfg.teacher.kind != "openai":  # the embedded teacher has no fixed address: serve it where litellm.yaml says
        from distill.teacher.server import embedded_gguf

        fb = urlparse(rule.fallback.endpoint)
        lines += ["## The teacher (fallback)", "", "```bash",
                  f"python -m llama_cpp.server --model {cfg.teacher.model_path or embedded_gguf()} --host "
                  f"{fb.hostname} --port {fb.port} --model_alias {rule.fallback.model}", "```", ""]
    lines += ["## Gateway", "", "```bash", f"litellm --config {paths.LITELLM}", "```", "",
              f"Requests for model `{rule.task.id}` (or with metadata `distill_task: {rule.task.id}`) go to the "
              "student; LiteLLM falls back to the teacher when the student errors. The confidence rule in "
              f"`{paths.ROUTING}` is applied with `distill.routing.decide(rule, request, answer, confidence)`.", ""]
    runio.atomic_write_text(staging / paths.SERVING, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# model card


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _ci(d: dict | None) -> str:
    """'0.81 [0.72, 0.88]' from {"value", "low", "high"}."""
    if not d or d.get("value") is None:
        return "n/a"
    if d.get("low") is None:
        return _fmt(d["value"])
    return f"{_fmt(d['value'])} [{_fmt(d['low'])}, {_fmt(d['high'])}]"


def _metric_lines(m: dict, level: float | None) -> list[str]:
    """Agreement and accuracy with their intervals (results.json ``*_ci``), whole answer then per field."""
    pct = f"{level:.0%} " if level else ""
    lines = ["| | whole answer | " + " | ".join(k for k in m["agreement"] if k != "exact") + " |",
             "|---|---|" + "---|" * (len(m["agreement"]) - 1)]
    for label, key in (("student agreement with teacher", "agreement"), ("student accuracy vs gold",
                                                                          "student_vs_gold"),
                       ("teacher accuracy vs gold", "teacher_vs_gold")):
        ci, point = m.get(f"{key}_ci"), m.get(key)
        if not point:
            continue
        cells = [_ci(ci[k]) if ci else _fmt(v) for k, v in point.items() if k != "exact"]
        lines.append(f"| {label} | {_ci(ci['exact']) if ci else _fmt(point['exact'])} | " + " | ".join(cells) + " |")
    lines.append("")
    for f, rep in (m.get("fields") or {}).items():
        f1 = (rep.get("vs_teacher") or {}).get("macro_f1")
        if f1:
            lines.append(f"- `{f}` macro-F1 vs teacher: {_ci(f1)}")
    if pct:
        lines.append(f"- intervals: {pct}bootstrap over items")
    return lines


def parity_lines(cfg: Config, artifacts: dict, parity: dict) -> list[str]:
    """The parity table (Markdown lines) shared by MODEL_CARD.md and the section publish adds to evaluate's report."""
    if artifacts and all(art["type"] == "embed_classifier" for art in artifacts.values()):
        res = next(iter(parity.values()), {})
        return [f"Parity: the published encoder and head, reloaded in a fresh classifier, give the evaluated "
                f"classifier's answer on {_fmt(res.get('parity'))} of {res.get('n', 0)} items (nothing is quantized, "
                f"so publish requires all of them); largest confidence difference "
                f"{_fmt(res.get('max_confidence_diff'))}.", "",
                "| artifact | runtime | size MB | parity | vs teacher | published |", "|---|---|---|---|---|---|",
                *[f"| `{rel}` ({art['type']}) | {art['runtime']} | {art['bytes'] / 1e6:.1f} | "
                  f"{_fmt(parity.get(rel, {}).get('parity')) if parity else 'not checked'} | "
                  f"{_fmt(parity.get(rel, {}).get('agreement_with_teacher'))} | yes |"
                  for rel, art in artifacts.items()]]
    lines = [f"Parity: share of the {next(iter(parity.values()))['n'] if parity else 0} evaluated items where the "
             f"artifact, loaded in its runtime, gives the same answer as the unquantized student (or, like it, "
             f"none); below publish.min_parity {cfg.publish.min_parity} an artifact is not published. "
             f"References: " + "; ".join(sorted({f"{res['reference']}" for res in parity.values()})) + ".", "",
             "As served (GGUF: llama.cpp with the task's schema as response_format; safetensors: transformers as "
             "evaluate ran the student): agreement with evaluate's student and with the teacher, and where one "
             "served answer ended.", "",
             "| artifact | runtime | size MB | parity | as served: vs student / vs teacher / invalid | answer ended "
             "| published |",
             "|---|---|---|---|---|---|---|"]
    for rel, art in artifacts.items():
        p = parity.get(rel, {})
        served = p.get("served_with_schema") or {"agreement_with_student": p.get("agreement_with_reference"),
                                                 "agreement_with_teacher": p.get("agreement_with_teacher"),
                                                 "invalid_rate": p.get("invalid_rate")}
        stop = p.get("stop_check")
        stop_txt = (f"{stop['finish_reason']} after {stop['completion_tokens']} tokens, "
                    f"{'valid' if stop['valid'] else 'invalid'} JSON") if stop else "-"
        status = "yes" if p.get("published", True) else f"no: {p['dropped_because']}"
        lines.append(f"| `{rel}` ({art['type']}) | {art['runtime']} | {art['bytes'] / 1e6:.1f} | "
                     f"{_fmt(p.get('parity')) if p else 'not checked'} | "
                     + (" / ".join(_fmt(served[k]) for k in ("agreement_with_student", "agreement_with_teacher",
                                                             "invalid_rate")) if p else "-")
                     + f" | {stop_txt} | {status} |")
    for rel, art in artifacts.items():
        if art.get("tensor_types"):
            lines.append(f"- `{rel}` tensor types: {art['tensor_types']}")
    return lines


REPORT_MARK = "<!-- written by publish: the shipped artifacts -->"


def add_to_report(cfg: Config, run_dir: Path, artifacts: dict, parity: dict) -> None:
    """Append the parity of what was published to evaluate/report.md (replacing an earlier publish's section), so
    the report that judged the student also says how the files that ship answer the same test items."""
    report = paths.stage_dir(run_dir, "evaluate") / paths.REPORT
    if not parity or not report.is_file():
        return
    kept = report.read_text(encoding="utf-8").split(REPORT_MARK)[0].rstrip()
    lines = [REPORT_MARK, "## The shipped artifacts", ""]
    for rel, res in parity.items():
        runtime = {"gguf": "served by the llama.cpp server"}.get(artifacts[rel]["format"], "loaded in transformers")
        if artifacts[rel]["type"] == "embed_classifier":
            runtime = "reloaded in a fresh classifier"
        verdict = "published" if res["published"] else f"NOT published ({res['dropped_because']})"
        lines.append(f"- `{rel}`, {runtime}: the same answer as the in-process student on "
                     f"{res['parity'] * 100:.1f}% of {res['n']} test items; {verdict}.")
    lines += ["", *parity_lines(cfg, artifacts, parity), "", f"Figures: publish/{paths.PARITY}."]
    runio.atomic_write_text(report, kept + "\n\n" + "\n".join(lines) + "\n")


def render_card(cfg: Config, generate: dict, train: dict, results: dict, rule: routing.RoutingRule,
                artifacts: dict, parity: dict, files: dict, forced_past: list[str] | None) -> str:
    """MODEL_CARD.md; ``forced_past`` holds the failed gate's reasons when publish.force overrode it."""
    m = results["metrics"]
    ledger = generate.get("ledger", {})
    inputs = cfg.recipe_file("inputs")
    classifier = cfg.student.kind == "embed_classifier"
    if classifier:
        training = embed_classifier.training_lines(cfg, train)
    else:
        training = [
            f"- {cfg.train.method} r={cfg.train.lora_r} alpha={cfg.train.lora_alpha} dropout "
            f"{cfg.train.lora_dropout} on {', '.join(cfg.student.target_modules)}; {train.get('steps')} steps, batch "
            f"{cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, lr {cfg.train.lr}, seed {cfg.seed}",
            f"- loss {_fmt(train.get('first_loss'))} -> {_fmt(train.get('final_loss'))}; val loss "
            f"{_fmt(train.get('val_loss'))}",
            f"- chat template: the base's own; end-of-turn token `{rule.student.stop[0]}` trained and set as the stop "
            "token in every artifact"]
    lines = [
        f"# {model_name(cfg)}", "",
        f"A {cfg.student.name} student distilled by distill for one task: {cfg.recipe.description}", "",
        "**Published with publish.force=true although the evaluate gate FAILED: " + "; ".join(forced_past) + "**"
        if forced_past is not None else "Evaluate gate: passed.", "",
        "## Data",
        f"- source: recipe `{cfg.recipe.name}` inputs `{inputs.name}` (sha256 {runio.sha256_file(inputs)[:16]})"
        if inputs.exists() else f"- source: recipe `{cfg.recipe.name}`",
        f"- {generate.get('labelled')} inputs labelled by teacher `{cfg.teacher.model}` ({cfg.teacher.kind}, "
        f"method {cfg.teacher.method}); rejected {generate.get('rejected')}; splits {generate.get('splits')}",
        f"- teacher spend: ${ledger.get('cost_usd', 0.0):.4f} over {ledger.get('successful_calls')} calls "
        f"({ledger.get('prompt_tokens')} prompt + {ledger.get('completion_tokens')} completion tokens)", "",
        "## Training", *training, "",
        f"## Evaluation ({results.get('split', 'test')} split, results.json)", "",
        f"{m['n']} held-out items, {m.get('n_gold')} with gold labels; invalid student answers "
        f"{_fmt(m.get('invalid_rate'))}.", "",
        *_metric_lines(m, cfg.eval.confidence_level),
    ]
    lines += ["", "## Artifacts and parity", "", *parity_lines(cfg, artifacts, parity)]
    r = rule.route
    lines += ["", "## Routing", "",
              f"- {'enabled' if r.enabled else 'disabled'}: {r.reason}",
              f"- expected coverage {_fmt(r.expected_coverage)}; on the test split at that threshold: coverage "
              f"{_fmt(rule.evidence.test_coverage)}, agreement {_fmt(rule.evidence.test_agreement)}",
              f"- cost per 1,000 requests: teacher {_fmt(rule.cost.teacher_usd_per_1k)}, student "
              f"{_fmt(rule.cost.student_usd_per_1k)}, blended {_fmt(rule.cost.blended_usd_per_1k)} USD "
              f"(saving {_fmt(rule.cost.saving_vs_teacher)})", "",
              "## Limitations",
              "- The student copies the teacher, including its mistakes: compare the teacher's accuracy vs gold.",
              "- Scores hold for inputs like the held-out split; route other traffic to the teacher.",
              *([f"- The classifier reads the raw input (no prompt); inputs longer than {cfg.student.max_seq_len} "
                 "tokens are cut.", "- It answers only the values the teacher gave on the train split.",
                 "- Nothing is quantized: the published files answer exactly as the evaluated classifier (parity)."]
                if classifier else
                ["- Trained on one system prompt and one user turn; other conversation shapes are untested.",
                 "- Quantized artifacts can answer differently from the student: see parity above."]),
              *([f"- The threshold was chosen on the in-process student's confidence (eval.decode="
                 f"{cfg.eval.decode}); a served GGUF's confidence (token log-probs) is another estimate: measure its "
                 f"curve with `python -m distill evaluate eval.endpoint.base_url=URL eval.endpoint.model="
                 f"{model_name(cfg)}` before relying on the threshold there."]
                if (results.get("predictor") or {}).get("kind", "in_process") == "in_process" and not classifier
                else []), "",
              "## Lineage",
              "- dataset: " + ", ".join(f"{s} {h[:16]}" for s, h in (generate.get("data_sha256") or {}).items()),
              f"- head: {train.get('head_sha256')}" if classifier else f"- adapter: {train.get('adapter_sha256')}",
              f"- evaluation: results.json {rule.evidence.results_sha256}"]
    lines += [f"- `{name}`: sha256 {sha}" for name, sha in files.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) in (5, 6) and sys.argv[1] == "quantize":
    sys.exit(_quantize_main(*sys.argv[2:]))
