"""train's checkpoints: sealed when complete, keyed by the training config, resumed only when intact.

A checkpoint folder (adapter safetensors, optimizer, scheduler, RNG, data position) is sealed last by a record of its
training-config key and every file with its size; a folder without a valid seal, of another config, or with a
changed file is skipped with a warning and deleted before a resume, never loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from distill import paths, runio
from distill.config import Config, speed_only_fields

log = logging.getLogger("distill")

# Written last into a checkpoint folder: its training-config key and every file with its size. No seal, no resume.
CHECKPOINT_SEAL = "distill_checkpoint.json"
_NEEDED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")

def resume_key(cfg: Config, run_dir: Path) -> str:
    """What a checkpoint must have been trained with to be resumed: student, training config, seed and data.

    The data is the content of the train and val splits as they are on disk now (sha256 of each file), plus
    generate's fingerprint (recipe, prompts, teacher): a checkpoint never resumes over changed or half-rewritten
    data, whatever generate's DONE.json says."""
    done = runio.read_done(run_dir, "generate", verify=False) or {}
    data = {}
    for split in ("train", "val"):  # what training reads (val: eval_loss, early stopping, the best checkpoint)
        path = paths.split_path(run_dir, split)
        data[split] = runio.sha256_file(path) if path.is_file() else None
    train = cfg.train.model_dump(mode="json")
    for speed_only in speed_only_fields(type(cfg.train)):
        train.pop(speed_only, None)
    return runio.sha256_obj({"student": cfg.student.model_dump(mode="json"), "train": train, "seed": cfg.seed,
                             "data": done.get("fingerprint"), "splits_sha256": data})[:16]


def seal_checkpoint(folder: Path, step: int, key: str) -> None:
    """Record every file of a finished checkpoint and its size, atomically, as the last write."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKPOINT_SEAL}
    runio.write_json(folder / CHECKPOINT_SEAL, {"step": step, "key": key, "files": files})


def checkpoint_problem(folder: Path, key: str | None = None) -> str | None:
    """Why a checkpoint folder must not be loaded, or None when it is complete (and, given ``key``, ours)."""
    try:
        seal = runio.read_json(folder / CHECKPOINT_SEAL)
        files, step = dict(seal["files"]), int(seal["step"])
    except FileNotFoundError:
        return f"no {CHECKPOINT_SEAL} (the save was interrupted before it finished)"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"its {CHECKPOINT_SEAL} is unreadable"
    if key is not None and seal.get("key") != key:
        return "it was trained with another config or data"
    missing = [name for name in _NEEDED if name not in files]
    if missing:
        return f"it lacks {', '.join(missing)}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
    try:
        state = runio.read_json(folder / "trainer_state.json")
    except json.JSONDecodeError:
        return "trainer_state.json is corrupt"
    if state.get("global_step") != step:
        return f"trainer_state.json is at step {state.get('global_step')}, the seal at step {step}"
    return None


def _step_of(folder: Path) -> int:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def last_complete_checkpoint(ckpt_dir: Path, key: str | None = None) -> Path | None:
    """Newest sealed, intact checkpoint-N folder (of training config ``key`` if given); the rest get a warning."""
    if not Path(ckpt_dir).is_dir():
        return None
    for cand in sorted(Path(ckpt_dir).glob("checkpoint-*"), key=_step_of, reverse=True):
        problem = checkpoint_problem(cand, key)
        if problem is None:
            return cand
        log.warning("skipping checkpoint %s: %s; it is not loaded", cand.name, problem)
    return None


def _prepare_resume(ckpt_dir: Path, metrics_file: Path, key: str) -> Path | None:
    """Pick the resume point, delete checkpoints that cannot be resumed, and cut metrics rows written after it."""
    resume = last_complete_checkpoint(ckpt_dir, key)
    keep_step = _step_of(resume) if resume else 0
    for cand in Path(ckpt_dir).glob("checkpoint-*") if ckpt_dir.is_dir() else []:
        if cand != resume and (_step_of(cand) > keep_step or checkpoint_problem(cand, key) is not None):
            # Unusable (half-written, corrupt, another config) or newer than the resume point: the trainer would
            # write into it or rotate a good checkpoint out in its favour.
            shutil.rmtree(cand, ignore_errors=True)
    if resume is None:
        metrics_file.unlink(missing_ok=True)
    elif metrics_file.exists():
        rows = runio.read_jsonl(metrics_file)
        runio.write_jsonl(metrics_file, [r for r in rows if r.get("step", 0) <= keep_step])
    return resume


