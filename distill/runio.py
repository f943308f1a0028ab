"""Small, careful file primitives for run directories: atomic writes, JSONL, content hashes, DONE.json."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from distill import paths

log = logging.getLogger("distill")

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
    """(line number, object or None, error or None) for every non-blank line, so callers can skip and count bad lines.

    A leading UTF-8 BOM is dropped (the first row is kept); bytes that are not UTF-8 stop with one line naming the
    file, the line and the byte offset: a wrongly encoded file would lose rows or mangle text silently.
    """
    from distill import DistillError

    offset = 0
    with open(path, "rb") as fh:
        for no, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DistillError(f"{path}: line {no} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
                                   f"{start + exc.start}; save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8 OLD "
                                   f"> NEW)") from None
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


# What each stage's DONE.json vouches for, relative to the stage's folder: write_done records a digest of each of
# these that exists, and done_problem checks them before the DONE.json is trusted. Files and folders are hashed by
# content (sha256_file / sha256_tree): these are the contract files the next stage reads and they are small (the
# splits, a LoRA adapter, results.json), so a skip costs well under a second. publish/model/ (merged weights and
# GGUFs, often gigabytes) is recorded by file names and sizes only: publish only ever builds it in a staging folder
# and swaps the whole folder in, so it is never rewritten in place; names + sizes catch a half-deleted or truncated
# copy without reading gigabytes on every skip. Modification times are not used, so a copied run dir stays valid.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "generate": tuple(paths.split_path(Path(), s).relative_to(paths.stage_dir(Path(), "generate")).as_posix()
                      for s in paths.SPLITS) + (paths.REJECTED, paths.QA),
    "train": (paths.ADAPTER_DIR, paths.HEAD_DIR),
    "evaluate": (paths.RESULTS, paths.PREDICTIONS),
    "publish": (paths.ROUTING, paths.ROUTING_SCHEMA, paths.LITELLM, paths.MODELFILE, paths.SERVING, paths.PARITY,
                paths.MODEL_CARD),
}
STAGE_OUTPUTS_BY_SIZE: dict[str, tuple[str, ...]] = {"publish": (paths.MODEL_DIR,)}


def _sizes_digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return "size:" + sha256_obj({p.relative_to(path).as_posix(): p.stat().st_size for p in files})


def output_digest(path: Path, by_size: bool = False) -> str:
    """Digest of one declared output: ``sha256:<hex>`` of its content (a folder: sha256_tree), or with ``by_size``
    ``size:<hex>`` of its file names and sizes."""
    path = Path(path)
    if by_size:
        return _sizes_digest(path)
    return "sha256:" + (sha256_tree(path) if path.is_dir() else sha256_file(path))


def stage_outputs(run_dir: Path, stage: str) -> dict[str, str]:
    """{relative path: digest} of the stage's declared outputs that exist now (see STAGE_OUTPUTS)."""
    folder = paths.stage_dir(run_dir, stage)
    out = {}
    for by_size, names in ((False, STAGE_OUTPUTS.get(stage, ())), (True, STAGE_OUTPUTS_BY_SIZE.get(stage, ()))):
        for rel in names:
            if (folder / rel).exists():
                out[rel] = output_digest(folder / rel, by_size)
    return out


def done_problem(run_dir: Path, stage: str, done: dict) -> str | None:
    """Why a DONE.json must not be trusted (an output it records is missing or differs), or None if it holds.

    A DONE.json written before outputs were recorded has nothing to check and is taken as it is (its fingerprint
    no longer matches anyway: the pipeline's fingerprints now include the upstream outputs)."""
    folder = paths.stage_dir(run_dir, stage)
    recorded = done.get("outputs") or {}
    if not isinstance(recorded, dict):
        return f"its {paths.DONE} is malformed (outputs is not a mapping)"
    for rel, digest in sorted(recorded.items()):
        path = folder / rel
        if not path.exists():
            return f"{stage}/{rel} is missing, and {stage}/{paths.DONE} records it"
        if output_digest(path, by_size=str(digest).startswith("size:")) != digest:
            return f"{stage}/{rel} changed after {stage}/{paths.DONE} was written"
    return None


def read_done(run_dir: Path, stage: str, *, verify: bool = True) -> dict | None:
    """The stage's DONE.json, or None if the stage did not finish (or the file is unreadable, or with ``verify``,
    an output it records no longer matches the files: see done_problem)."""
    path = paths.stage_dir(run_dir, stage) / paths.DONE
    try:
        done = read_json(path)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(done, dict):
        return None
    if verify and done_problem(run_dir, stage, done) is not None:
        return None
    return done


def write_done(run_dir: Path, stage: str, fingerprint: str, summary: dict,
               outputs: dict[str, str] | None = None) -> None:
    """Write DONE.json last, atomically and durably, with the digests of the stage's outputs (``outputs``, or
    stage_outputs computed now)."""
    folder = paths.stage_dir(run_dir, stage)
    outputs = stage_outputs(run_dir, stage) if outputs is None else outputs
    write_json(folder / paths.DONE, {"stage": stage, "fingerprint": fingerprint, "summary": summary,
                                     "outputs": outputs})
    fsync_dir(folder)


def remove_done(run_dir: Path, stage: str) -> bool:
    """Delete the stage's DONE.json (an atomic unlink, made durable): from here on the stage counts as unfinished.
    Returns whether there was one."""
    folder = paths.stage_dir(run_dir, stage)
    try:
        (folder / paths.DONE).unlink()
    except FileNotFoundError:
        return False
    fsync_dir(folder)
    return True


def require_done(run_dir: Path, stage: str, needed_by: str) -> dict:
    """DONE.json of an upstream stage, or a DistillError that says which command to run first.

    The recorded outputs are not checked here (stages check what they load, e.g. publish checks the adapter against
    train's summary); the pipeline checks them before it computes a fingerprint or skips a stage."""
    from distill import DistillError

    done = read_done(run_dir, stage, verify=False)
    if done is None:
        raise DistillError(f"{needed_by} needs a finished {stage} stage in {run_dir} (no {stage}/{paths.DONE}); "
                           f"run `python -m distill {stage} run_dir={run_dir} ...` or `python -m distill run` first")
    return done


# ---------------------------------------------------------------------------------------------------------------
# folders: durable renames and the swap of a finished staging folder into place


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # this kernel or file system: no
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process: finished with
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_leftovers(parent: Path, prefix: str) -> list[Path]:
    """Delete folders ``<parent>/<prefix><pid>`` left by processes that are gone (killed mid-way); a live
    process's folder is kept. Returns what was removed."""
    removed = []
    for cand in Path(parent).glob(f"{prefix}*"):
        tail = cand.name[len(prefix):]
        if not tail.isdigit() or _pid_alive(int(tail)):
            continue
        if cand.is_dir() and not cand.is_symlink():
            shutil.rmtree(cand, ignore_errors=True)
        else:
            cand.unlink(missing_ok=True)
        removed.append(cand)
    if removed:
        log.info("removed %d leftover folder(s) of an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def aside_prefix(final: Path) -> str:
    """Name prefix of the folder the old ``final`` is moved to during swap_into_place (``.publish.old-<pid>``)."""
    return f".{Path(final).name}.old-"


def swap_into_place(staging: Path, final: Path) -> None:
    """Put the finished folder ``staging`` at ``final``, so that a reader or a kill at any moment finds the old
    complete ``final`` or the new complete one, never a half-deleted mix.

    Where the kernel and file system can (Linux renameat2 RENAME_EXCHANGE), the two folders trade places in one
    atomic step, so ``final`` never stops existing. Elsewhere the old folder is renamed aside
    (``.<name>.old-<pid>``), then ``staging`` renamed in: for the instant between the two renames ``final`` does not
    exist at all, which a reader sees as "not published", never as a folder without its files. The old folder is
    deleted only once the new one is in place; a kill during that deletion leaves only the ``.old-`` folder, which
    nothing reads and the next call removes. (After an exchange the old folder sits under the staging name until
    the next rename, an instant: callers remove staging folders of dead processes with remove_leftovers.)"""
    staging, final = Path(staging), Path(final)
    prefix = aside_prefix(final)
    remove_leftovers(final.parent, prefix)
    aside = final.with_name(f"{prefix}{os.getpid()}")
    if final.exists():
        if _rename_exchange(staging, final):
            os.replace(staging, aside)  # staging now holds the old folder; its .old- name marks it for deletion
        else:
            os.replace(final, aside)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(aside, final)  # put the old folder back: an error must not unpublish it
                raise
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
