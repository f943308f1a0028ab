"""publish's artifacts: the adapter merged into a full-precision base, llama.cpp's GGUF files, an optional nf4 folder.

    python -m distill.stages.publish.gguf quantize SRC.gguf DST.gguf q4_k_m [f16]   # the quantizer child process

The merged model is saved as safetensors with the tokenizer and chat template (model/hf); GGUF files come from
llama.cpp's own converter (f16, q8_0, ...) and quantizer (q4_k_m, ...), which keeps the token embedding and output
tensors in publish.embedding_type (f16: on a small model with tied embeddings, quantizing that one matrix moved most
of the answers that changed). The quantizer runs in a child process (the command above) so that a llama.cpp abort
cannot take the pipeline down.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from distill import DistillError, paths
from distill.config import GGUF_QUANTIZER_TYPES, Config
from distill.student.models import load_base
from distill.student.template import end_of_turn

log = logging.getLogger("distill")


def model_name(cfg: Config) -> str:
    """The published model's name: ``<recipe>-<student>`` (file stems, the served alias, the card's title)."""
    return f"{cfg.recipe.name}-{cfg.student.name}"


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
    # runpy warns that the package imported this module before running it as __main__; that is expected here
    cmd = [sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", "distill.stages.publish.gguf", "quantize",
           str(src), str(out_file), qtype, embedding_type or "none"]
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
    from peft import PeftModel
    from transformers import AutoTokenizer

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


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6) or sys.argv[1] != "quantize":
        sys.exit(f"usage: python -m {__spec__.name} quantize SRC.gguf DST.gguf TYPE [EMBEDDING_TYPE|none]")
    sys.exit(_quantize_main(*sys.argv[2:]))
