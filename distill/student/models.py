"""Load the student's base model and tokenizer from a GGUF file, a local folder / hub id, or a random config.

A GGUF base (the embedded SmolLM2) is dequantized to fp32 by transformers once (~20-60 s) and cached as safetensors
under ``<cache_dir>/students/`` keyed by the GGUF's hash; later loads take about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from distill import DistillError, runio
from distill.config import Config, StudentConfig

log = logging.getLogger("distill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gguf_path(scfg: StudentConfig) -> Path:
    from distill.teacher.server import embedded_gguf

    path = Path(scfg.path).expanduser() if scfg.path else embedded_gguf()
    if not path.exists():
        raise DistillError(f"student.path {path} does not exist (a GGUF file for student.source=gguf)")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return runio.sha256_text(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")[:16]


def cached_gguf_base(scfg: StudentConfig, cache_dir: Path) -> Path:
    """A transformers folder (safetensors + tokenizer) dequantized from the student's GGUF, built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(scfg)
    target = Path(cache_dir) / "students" / f"{scfg.name}-{_file_key(gguf)}"
    if (target / "config.json").exists():
        return target

    def build(tmp: Path) -> None:
        log.info("dequantizing %s to fp32 safetensors once (cached in %s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model while its GGUF quantizer is attached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        runio.write_json(tmp / "distill_source.json", {"gguf": str(gguf), "gguf_sha256": runio.sha256_file(gguf)})

    _build_once(target, build, "config.json")
    return target


def _build_once(target: Path, build, marker: str) -> None:
    """Build a cache folder in a temp sibling and rename it into place, so a half-built one is never used.

    Processes that start together on an empty cache (two benchmark runs, a sweep) take a file lock on the folder's
    name: one builds, the others wait and find it built; none deletes a folder another has just put in place.
    """
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)


def load_tokenizer(cfg: Config):
    """The student's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    scfg = cfg.student
    if scfg.source == "gguf":
        return AutoTokenizer.from_pretrained(cached_gguf_base(scfg, cfg.cache_dir))
    if scfg.source == "random":
        return AutoTokenizer.from_pretrained(cached_gguf_tokenizer(scfg, cfg.cache_dir))
    location = _hf_location(scfg)
    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=_offline())
    except OSError as exc:
        raise DistillError(_unreachable(scfg, location, exc)) from None


def _unreachable(scfg: StudentConfig, location: str, exc: OSError) -> str:
    return (f"cannot load student {scfg.name!r} from {location}: {str(exc).splitlines()[0]} (offline or not "
            f"downloaded? fetch it once, e.g. `huggingface-cli download {scfg.hub_id or location} --local-dir DIR`, "
            f"and set student.path=DIR)")


def cached_gguf_tokenizer(scfg: StudentConfig, cache_dir: Path) -> Path:
    """Tokenizer + chat template only, read from a GGUF (SmolLM2's by default) and saved once: tiny_random uses it."""
    from transformers import AutoTokenizer

    gguf = _gguf_path(scfg)
    target = Path(cache_dir) / "tokenizers" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "tokenizer_config.json").exists():
        return target
    _build_once(target, lambda tmp: AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp), "tokenizer_config.json")
    return target


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _hf_location(scfg: StudentConfig) -> str:
    if scfg.path:
        if not Path(scfg.path).expanduser().exists():
            raise DistillError(f"student.path {scfg.path} does not exist (a folder with config.json and weights)")
        return str(Path(scfg.path).expanduser())
    if not scfg.hub_id:
        raise DistillError(f"student {scfg.name!r} has neither student.path nor student.hub_id")
    return scfg.hub_id


def load_base(cfg: Config):
    """(model, tokenizer) of the student's base, before any adapter."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    scfg = cfg.student
    tokenizer = load_tokenizer(cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = DTYPES[scfg.dtype]
    if scfg.source == "random":
        arch = dict(scfg.random_arch or {})
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **arch)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(dtype)
        return model, tokenizer
    if scfg.source == "gguf":
        location = str(cached_gguf_base(scfg, cfg.cache_dir))
        kwargs = {}
    else:
        location = _hf_location(scfg)
        kwargs = {"local_files_only": _offline()}
    if scfg.load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(dtype)
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except OSError as exc:
        raise DistillError(_unreachable(scfg, location, exc)) from None
    return model, tokenizer


def _nf4_config(dtype):
    if not torch.cuda.is_available():
        raise DistillError("student.load_in_4bit (QLoRA) needs a CUDA GPU; use train=lora with "
                           "student.load_in_4bit=false on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_student(cfg: Config, adapter_dir: Path):
    """(model with the trained adapter, tokenizer saved beside the adapter) for evaluation."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model, _ = load_base(cfg)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer
