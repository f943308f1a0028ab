"""Small, careful file primitives for run directories: atomic writes, JSONL, content hashes, DONE.json."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from distill import paths


def canonical_json(obj: Any) -> str:
    """The one serialisation that hashes are taken over: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_obj(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """Hash of every file under ``root`` (relative names + contents), stable across machines."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def iter_jsonl_lenient(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (line_no, object or None, error or None) so callers can skip and count bad lines."""
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield no, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield no, None, "not a JSON object"
                continue
            yield no, obj, None


# ---------------------------------------------------------------------------------------------------------------
# DONE.json: the only thing in a run dir that is trusted


def read_done(run_dir: Path, stage: str) -> dict | None:
    """The stage's DONE.json, or None if the stage did not finish (or the file is unreadable)."""
    path = paths.stage_dir(run_dir, stage) / paths.DONE
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_done(run_dir: Path, stage: str, fingerprint: str, summary: dict) -> None:
    write_json(paths.stage_dir(run_dir, stage) / paths.DONE,
               {"stage": stage, "fingerprint": fingerprint, "summary": summary})


def require_done(run_dir: Path, stage: str, needed_by: str) -> dict:
    """DONE.json of an upstream stage, or a DistillError that says which command to run first."""
    from distill import DistillError

    done = read_done(run_dir, stage)
    if done is None:
        raise DistillError(f"{needed_by} needs a finished {stage} stage in {run_dir} (no {stage}/{paths.DONE}); "
                           f"run `python -m distill {stage} run_dir={run_dir} ...` or `python -m distill run` first")
    return done
