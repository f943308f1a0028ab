"""publish: merge the adapter in full precision, convert to GGUF, write routing.yaml and MODEL_CARD.md.

    python -m distill publish recipe=support_tickets run_dir=DIR [publish.force=true]

Everything is built in a staging folder and moved into publish/ only when complete, so a failure publishes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from distill import DistillError, paths, runio
from distill.config import Config
from distill.task import Task, load_split

log = logging.getLogger("distill")

ROUTING_SCHEMA_VERSION = 1


def converter_dir() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, installed by `make setup` (scripts/install_converter.py)."""
    folder = Path(os.environ.get("DISTILL_LLAMA_CONVERT", Path(sys.prefix) / "share" / "distill" / "llama_cpp_convert"))
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise DistillError(f"llama.cpp's converter is not installed in {folder}; run `make setup` (or "
                           f"`python scripts/install_converter.py --version <llama-cpp-python version>`)")
    return folder


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str, log_file: Path) -> None:
    """HF folder -> GGUF with llama.cpp's own converter (its tensor mapping, tokenizer and chat-template export)."""
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]),
           "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    with open(log_file, "ab") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_file.exists():
        tail = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
        raise DistillError(f"GGUF conversion ({outtype}) failed with code {proc.returncode}: {tail}")


def merge_adapter(cfg: Config, run_dir: Path, hf_dir: Path) -> str:
    """Merge the LoRA adapter into a full-precision base and save safetensors + tokenizer + chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from distill.models import load_base
    from distill.template import end_of_turn

    adapter = paths.adapter_path(run_dir)
    if not (adapter / "adapter_config.json").exists() or not (adapter / "adapter_model.safetensors").exists():
        raise DistillError(f"no trained adapter in {adapter}; run `python -m distill train run_dir={run_dir}`")
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


def smoke_answer(gguf: Path, cfg: Config, task: Task, text: str, log_file: Path) -> dict:
    """Serve the GGUF with llama.cpp on loopback and answer one held-out input, as a gateway would."""
    import openai

    from distill.teacher.server import LlamaCppServer

    with LlamaCppServer(gguf, alias="student", n_ctx=2048, log_path=log_file) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", timeout=60, max_retries=1)
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model="student", messages=task.student_messages(text),
                                              temperature=0, max_tokens=cfg.eval.max_new_tokens)
        latency = time.perf_counter() - t0
    choice = resp.choices[0]
    answer, reason = task.schema.parse(choice.message.content)
    return {"loads": True, "finish_reason": choice.finish_reason, "raw": choice.message.content,
            "valid": answer is not None, "invalid_reason": reason, "latency_s": round(latency, 3)}


def run(cfg: Config, run_dir: Path) -> dict:
    final = paths.stage_dir(run_dir, "publish")
    evaluation = runio.require_done(run_dir, "evaluate", "publish")["summary"]
    gate = evaluation.get("gate", {})
    if not gate.get("passed", True) and not cfg.publish.force:
        raise DistillError("not publishing: the evaluate gate failed (" + "; ".join(gate.get("reasons", []))
                           + "); fix the student or set publish.force=true")
    generate = runio.require_done(run_dir, "generate", "publish")["summary"]
    train = runio.require_done(run_dir, "train", "publish")["summary"]
    task = Task(cfg)

    staging = final.with_name(f".publish-staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model_dir = staging / paths.MODEL_DIR
    hf_dir = model_dir / paths.HF_DIR
    hf_dir.mkdir(parents=True)
    eot = merge_adapter(cfg, run_dir, hf_dir)
    artifacts = {}
    for outtype in cfg.publish.gguf_types:
        gguf = model_dir / f"{cfg.recipe.name}-{cfg.student.name}-{outtype}.gguf"
        convert_to_gguf(hf_dir, gguf, outtype, staging / "convert.log")
        artifacts[gguf.name] = {"format": "gguf", "type": outtype, "bytes": gguf.stat().st_size}
    checks = {}
    if cfg.publish.verify_load and artifacts:
        test_rows = load_split(run_dir, cfg.eval.split)
        sample = test_rows[0]["input"] if test_rows else "hello"
        first = model_dir / next(iter(artifacts))
        checks[first.name] = smoke_answer(first, cfg, task, sample, staging / "llama_server.log")

    files = {p.relative_to(staging).as_posix(): runio.sha256_file(p)
             for p in sorted(model_dir.rglob("*")) if p.is_file()}
    results_sha = runio.sha256_file(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    agreement = evaluation["metrics"]["agreement"]["exact"] or 0.0
    routing = build_routing(cfg, artifacts, agreement, evaluation, results_sha, eot)
    runio.atomic_write_text(staging / paths.ROUTING, yaml.safe_dump(routing, sort_keys=False))
    card = render_card(cfg, generate, train, evaluation, artifacts, checks, files, results_sha, eot, gate)
    runio.atomic_write_text(staging / paths.MODEL_CARD, card)

    # Swap the finished staging folder into place: publish/ is either the old complete one or the new one.
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return {"artifacts": artifacts, "checks": checks, "routing": {"route_to_student": routing["route"]["enabled"],
            "agreement": agreement}, "files_sha256": files, "forced": bool(cfg.publish.force and not
                                                                           gate.get("passed", True))}


def build_routing(cfg: Config, artifacts: dict, agreement: float, evaluation: dict, results_sha: str,
                  eot: str) -> dict:
    enabled = agreement >= cfg.publish.target_agreement
    gguf = next(iter(artifacts), None)
    return {
        "schema_version": ROUTING_SCHEMA_VERSION,
        "task": {"id": cfg.recipe.name, "description": cfg.recipe.description,
                 "match": {"metadata": {"distill_task": cfg.recipe.name}}},
        "student": {"model": f"{cfg.recipe.name}-{cfg.student.name}", "artifact": f"model/{gguf}" if gguf else None,
                    "hf_folder": f"model/{paths.HF_DIR}", "stop": [eot],
                    "endpoint": "http://127.0.0.1:8080/v1"},
        "fallback": {"model": cfg.teacher.model, "base_url": cfg.teacher.base_url if cfg.teacher.kind == "openai"
                     else None},
        "route": {"enabled": enabled, "target_agreement": cfg.publish.target_agreement,
                  "on_invalid_answer": "fallback"},
        "evidence": {"results_sha256": results_sha, "agreement": agreement,
                     "n": evaluation["metrics"]["n"], "invalid_rate": evaluation["metrics"]["invalid_rate"]},
    }


def render_card(cfg: Config, generate: dict, train: dict, evaluation: dict, artifacts: dict, checks: dict,
                files: dict, results_sha: str, eot: str, gate: dict) -> str:
    m = evaluation["metrics"]
    tvg = m.get("teacher_vs_gold") or {}
    svg = m.get("student_vs_gold") or {}
    lines = [
        f"# {cfg.recipe.name}-{cfg.student.name}", "",
        f"A {cfg.student.name} student distilled by distill for one task: {cfg.recipe.description}", "",
        "## Data",
        f"- {generate['labelled']} inputs labelled by teacher `{cfg.teacher.model}` ({generate['rejected']} "
        f"rejected); splits {generate['splits']}",
        f"- teacher spend: ${generate['ledger']['cost_usd']:.4f} over {generate['ledger']['successful_calls']} calls",
        "",
        "## Training",
        f"- LoRA r={cfg.train.lora_r} alpha={cfg.train.lora_alpha} on {', '.join(cfg.student.target_modules)}; "
        f"{train['steps']} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr}",
        f"- loss {train['first_loss']} -> {train['final_loss']}; val loss {train['val_loss']}",
        f"- chat template: the base's own; end-of-turn token `{eot}` trained and set as the stop token", "",
        "## Evaluation (held-out split)",
        f"- agreement with the teacher: {m['agreement']['exact']} (n={m['n']}); invalid answers {m['invalid_rate']}",
        f"- accuracy vs gold: student {svg.get('exact')}, teacher {tvg.get('exact')} (n={m['n_gold']})",
        f"- gate: {'passed' if gate.get('passed', True) else 'FAILED, published with publish.force=true'}", "",
        "## Artifacts",
    ]
    for name, art in artifacts.items():
        check = checks.get(name)
        lines.append(f"- `model/{name}` ({art['type']}, {art['bytes'] / 1e6:.1f} MB)"
                     + (f": loads in llama.cpp, answer valid={check['valid']}, finish={check['finish_reason']}"
                        if check else ""))
    lines += ["", "## Limitations",
              "- The student copies the teacher, including its mistakes: compare the teacher's accuracy vs gold.",
              "- Scores hold for inputs like the held-out split; route other traffic to the teacher.", "",
              "## Lineage",
              "- dataset: " + ", ".join(f"{s} {h[:16]}" for s, h in generate["data_sha256"].items()),
              f"- adapter: {train['adapter_sha256'][:16]}",
              f"- evaluation: results.json {results_sha[:16]}"]
    lines += [f"- `{name}`: sha256 {sha}" for name, sha in files.items()]
    return "\n".join(lines) + "\n"
