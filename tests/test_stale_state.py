"""Stale state after an interrupted re-run: a DONE.json is removed before its stage rewrites anything, trusted only
while the files it records still match, train checkpoints are keyed by the data, and publish/ is swapped into place
so that no reader and no kill ever sees old DONE.json over half-deleted or new files."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from distill import DistillError, paths, pipeline, runio
from distill.config import load_config
from distill.stages import generate, train
from distill.testing.fake_teacher import FakeTeacher
from test_train import _fake_checkpoint

NO_TEACHER = "http://127.0.0.1:9/v1"  # for stages that never call the teacher
# Config B: the same inputs and teacher (so every answer comes from the ledger), other split fractions.
SPLIT_B = ("generate.split.train=0.4", "generate.split.val=0.3", "generate.split.test=0.3")
DEAD_PID = 999_999_999  # above any pid_max: a folder named for it is a leftover of a process that is gone


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the code under test may catch it and carry on."""


def _cfg(run_dir, url, *extra):
    return load_config(tiny_overrides(run_dir, url, *extra))


def _split_hashes(run_dir) -> dict[str, str]:
    return {s: runio.sha256_file(paths.split_path(run_dir, s)) for s in paths.SPLITS}


def _split_content(run_dir) -> dict[str, list]:
    """Which rows are in which split, with their labels (a re-run from the ledger differs only in provenance)."""
    return {s: sorted((r["id"], r["input"], runio.canonical_json(r["teacher"]))
                      for r in runio.read_jsonl(paths.split_path(run_dir, s))) for s in paths.SPLITS}


def _reasons(caplog, stage: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{stage:<8} running")]


# ---------------------------------------------------------------------------------------------------------------
# DONE.json: removed before a stage writes, checked against the files before it is trusted


def test_generate_killed_mid_rewrite_then_the_old_config_reruns_instead_of_skipping(tmp_path, fake_answer,
                                                                                    monkeypatch, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="distill")
    with FakeTeacher(fake_answer) as teacher:
        pipeline.run_stage(_cfg(run_dir, teacher.base_url), "generate")
        content_a, calls_a = _split_content(run_dir), len(teacher.calls)
        assert runio.read_done(run_dir, "generate")["summary"]["data_sha256"] == _split_hashes(run_dir)

        # Config B rewrites the split files, then dies before its DONE.json (late in generate: the QA summary).
        def die(*args, **kwargs):
            raise Killed

        monkeypatch.setattr(generate, "teacher_vs_gold", die)
        with pytest.raises(Killed):
            pipeline.run_stage(_cfg(run_dir, teacher.base_url, *SPLIT_B), "generate")
        monkeypatch.undo()
        assert _split_content(run_dir) != content_a, "config B did not rewrite the splits before it died"
        assert not (paths.stage_dir(run_dir, "generate") / paths.DONE).exists()  # removed before the first write

        # Config A again: generate runs (it must not skip over B's files), from the ledger, and A's files are back.
        caplog.clear()
        pipeline.run_stage(_cfg(run_dir, teacher.base_url), "generate")
        assert len(teacher.calls) == calls_a  # nothing paid twice
    assert len(_reasons(caplog, "generate")) == 1
    assert _split_content(run_dir) == content_a
    done = runio.read_done(run_dir, "generate")
    assert done["summary"]["data_sha256"] == _split_hashes(run_dir)
    train_ids = {r["id"] for r in runio.read_jsonl(paths.split_path(run_dir, "train"))}
    held_out = {r["id"] for s in ("val", "test") for r in runio.read_jsonl(paths.split_path(run_dir, s))}
    assert train_ids and not train_ids & held_out


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_text("".join(p.read_text().splitlines(keepends=True)[:-1])), "changed after"),
    (lambda p: p.unlink(), "is missing"),
], ids=["edited", "deleted"])
def test_done_json_whose_recorded_files_changed_is_not_trusted_and_the_stage_reruns(tmp_path, fake_answer, caplog,
                                                                                   damage, why):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="distill")
    with FakeTeacher(fake_answer) as teacher:
        cfg = _cfg(run_dir, teacher.base_url)
        pipeline.run_stage(cfg, "generate")
        content = _split_content(run_dir)
        calls = len(teacher.calls)
        damage(paths.split_path(run_dir, "train"))
        assert runio.read_done(run_dir, "generate") is None  # read_done verifies by default
        assert runio.read_done(run_dir, "generate", verify=False) is not None

        caplog.clear()
        pipeline.run_stage(cfg, "generate")
        assert len(teacher.calls) == calls
    (reason,) = _reasons(caplog, "generate")
    assert f"generate/{paths.DATA_DIR}/train.jsonl {why}" in reason and "not trusted" in reason
    assert _split_content(run_dir) == content
    assert runio.read_done(run_dir, "generate")["summary"]["data_sha256"] == _split_hashes(run_dir)


def test_downstream_fingerprint_follows_upstream_files_not_only_upstream_config(tmp_path, fake_answer):
    run_dir = tmp_path / "run"
    with FakeTeacher(fake_answer) as teacher:
        pipeline.run_stage(_cfg(run_dir, teacher.base_url), "generate")
    cfg = _cfg(run_dir, NO_TEACHER)
    fp_train = pipeline.fingerprint(cfg, "train")
    train_file = paths.split_path(run_dir, "train")
    rows = runio.read_jsonl(train_file)

    # Files changed under generate's DONE.json: nothing downstream is computed over them.
    runio.write_jsonl(train_file, rows[:-1])
    with pytest.raises(DistillError, match=r"train needs a finished generate stage.*changed after.*re-run"):
        pipeline.fingerprint(cfg, "train")

    # A generate re-run with the same fingerprint that wrote other data: train's fingerprint moves with it, so an
    # old train/DONE.json is not reused over the new data.
    done = runio.read_done(run_dir, "generate", verify=False)
    runio.write_done(run_dir, "generate", done["fingerprint"], done["summary"])
    assert pipeline.fingerprint(cfg, "train") != fp_train
    runio.write_jsonl(train_file, rows)
    runio.write_done(run_dir, "generate", done["fingerprint"], done["summary"])
    assert pipeline.fingerprint(cfg, "train") == fp_train  # the same bytes again: finished work is reused


# ---------------------------------------------------------------------------------------------------------------
# train: a checkpoint never resumes over other data


@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_key_changes_when_the_training_data_changes_and_the_old_checkpoint_is_not_resumed(tmp_path, split):
    run_dir = tmp_path / "run"
    rows = [{"id": f"t{i}", "input": f"ticket {i}", "teacher": {"category": "billing", "priority": "low"},
             "gold": None, "split": s} for i, s in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2)]
    for s in paths.SPLITS:
        runio.write_jsonl(paths.split_path(run_dir, s), [r for r in rows if r["split"] == s])
    cfg = _cfg(run_dir, NO_TEACHER)
    key = train.resume_key(cfg, run_dir)
    assert train.resume_key(cfg, run_dir) == key  # stable while the data is
    ckpt_dir = paths.stage_dir(run_dir, "train") / paths.CHECKPOINTS_DIR
    ckpt = _fake_checkpoint(ckpt_dir, 2, key)
    assert train.last_complete_checkpoint(ckpt_dir, key) == ckpt

    split_rows = runio.read_jsonl(paths.split_path(run_dir, split))
    split_rows[0]["teacher"] = {"category": "technical", "priority": "high"}  # one relabelled row
    runio.write_jsonl(paths.split_path(run_dir, split), split_rows)
    new_key = train.resume_key(cfg, run_dir)
    assert new_key != key
    assert train.last_complete_checkpoint(ckpt_dir, new_key) is None
    metrics = paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS
    assert train._prepare_resume(ckpt_dir, metrics, new_key) is None
    assert not ckpt.exists()  # deleted, so the trainer cannot pick it up either


# ---------------------------------------------------------------------------------------------------------------
# publish: the staging folder swapped into place


def _folder(path, routing: str, done: bool) -> None:
    (path / paths.MODEL_DIR).mkdir(parents=True)
    (path / paths.ROUTING).write_text(routing)
    for i in range(20):
        (path / paths.MODEL_DIR / f"part-{i:02d}.bin").write_text(f"{routing} {i}")
    if done:
        (path / paths.DONE).write_text('{"fingerprint": "old"}')


def _state(final) -> str:
    """'old' (complete, with its DONE.json), 'new' (complete, no DONE.json), 'absent', or what is wrong."""
    if not final.exists():
        return "absent"
    routing = final / paths.ROUTING
    parts = len(list((final / paths.MODEL_DIR).glob("*.bin"))) if (final / paths.MODEL_DIR).is_dir() else 0
    label = routing.read_text() if routing.exists() else None
    has_done = (final / paths.DONE).exists()
    if label == "old" and has_done and parts == 20:
        return "old"
    if label == "new" and not has_done and parts == 20:
        return "new"
    return f"broken: routing={label} DONE={has_done} parts={parts}"


def _use_exchange(monkeypatch, tmp_path, exchange: bool) -> None:
    """Test the atomic exchange where this file system has it (else skip), or force the rename-aside fallback."""
    if not exchange:
        monkeypatch.setattr(runio, "_rename_exchange", lambda a, b: False)
        return
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    supported = runio._rename_exchange(a, b)
    assert not supported or (b / "x").exists()
    shutil.rmtree(a)
    shutil.rmtree(b)
    if not supported:
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this file system")


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
def test_swap_into_place_never_shows_a_half_state_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    final, staging = tmp_path / "publish", tmp_path / f".publish-staging-{DEAD_PID}"
    _folder(final, "old", done=True)
    _folder(staging, "new", done=False)
    _use_exchange(monkeypatch, tmp_path, exchange)
    seen = []
    real_replace, real_rmtree, real_exchange = os.replace, shutil.rmtree, runio._rename_exchange

    def watch(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(_state(final))
            return out
        return wrapper

    def rmtree(path, *args, **kwargs):
        assert os.path.abspath(path) != os.path.abspath(final), "publish/ itself is never deleted"
        seen.append(_state(final))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(runio, "_rename_exchange", watch(real_exchange))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    runio.swap_into_place(staging, final)
    monkeypatch.undo()
    assert seen and set(seen) <= {"old", "new", "absent"}
    assert _state(final) == "new"
    assert _leftovers(tmp_path) == []


def _kill_at(monkeypatch, n: int) -> None:
    """Make the n-th file-system step of swap_into_place (0-based: renames, the exchange, the rmtree) the moment
    the process is killed: that step does not happen (or an rmtree stops half-way) and no later one does."""
    real = {"replace": os.replace, "rmtree": shutil.rmtree, "exchange": runio._rename_exchange}
    steps = {"n": 0}

    def step(kind):
        def wrapper(*args, **kwargs):
            if steps["n"] >= n:
                if kind == "rmtree" and steps["n"] == n:  # killed half-way through the delete
                    files = sorted(p for p in Path(args[0]).rglob("*") if p.is_file())
                    for p in files[: len(files) // 2]:
                        p.unlink()
                steps["n"] += 1
                raise Killed
            steps["n"] += 1
            return real[kind](*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "replace", step("replace"))
    monkeypatch.setattr(shutil, "rmtree", step("rmtree"))
    monkeypatch.setattr(runio, "_rename_exchange", step("exchange"))


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
@pytest.mark.parametrize("kill_at", [0, 1, 2, 3])
def test_kill_at_any_step_of_the_swap_leaves_old_complete_new_without_done_or_nothing(tmp_path, monkeypatch,
                                                                                      exchange, kill_at):
    final, staging = tmp_path / "publish", tmp_path / f".publish-staging-{DEAD_PID}"
    _folder(final, "old", done=True)
    _folder(staging, "new", done=False)
    _use_exchange(monkeypatch, tmp_path, exchange)
    _kill_at(monkeypatch, kill_at)
    try:
        runio.swap_into_place(staging, final)
    except Killed:
        pass
    monkeypatch.undo()
    after_kill = _state(final)
    assert after_kill in {"old", "new", "absent"}, after_kill
    if after_kill == "old":
        assert _state(staging) == "new"  # nothing was lost: the swap simply had not happened

    # The next publish (a fresh staging folder) completes and removes what the killed one left.
    # publish.run first removes the staging folders of dead runs (runio.remove_leftovers), then builds its own.
    runio.remove_leftovers(tmp_path, ".publish-staging-")
    staging2 = tmp_path / ".publish-staging-next"
    _folder(staging2, "new", done=False)
    runio.swap_into_place(staging2, final)
    assert _state(final) == "new"
    assert _leftovers(tmp_path) == []


def test_swap_error_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    final, staging = tmp_path / "publish", tmp_path / f".publish-staging-{DEAD_PID}"
    _folder(final, "old", done=True)
    _folder(staging, "new", done=False)
    monkeypatch.setattr(runio, "_rename_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        runio.swap_into_place(staging, final)
    monkeypatch.undo()
    assert _state(final) == "old" and _state(staging) == "new"
    assert _leftovers(tmp_path) == [staging.name]


def test_leftovers_of_a_live_process_are_kept(tmp_path):
    parent_pid = os.getppid()  # alive: it started this test process
    alive, dead = tmp_path / f".publish.old-{parent_pid}", tmp_path / f".publish.old-{DEAD_PID}"
    alive.mkdir()
    dead.mkdir()
    assert runio.remove_leftovers(tmp_path, ".publish.old-") == [dead]
    assert alive.exists() and not dead.exists()


# ---------------------------------------------------------------------------------------------------------------
# the pipeline around publish: its DONE.json stays with the old complete folder until the new one is in place


def test_failed_publish_keeps_the_old_publish_trusted_and_a_swapped_one_without_done_reruns(tmp_path, monkeypatch,
                                                                                         caplog):
    from distill.stages import publish

    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, NO_TEACHER)
    for up in ("generate", "train", "evaluate"):
        runio.write_done(run_dir, up, f"fp-{up}", {})
    builds = []

    def fake_publish(label: str, fail_before_swap: bool = False, fail_after_swap: bool = False):
        def run(cfg, run_dir):
            builds.append(label)
            final = paths.stage_dir(run_dir, "publish")
            staging = final.with_name(f".publish-staging-{os.getpid()}")
            _folder(staging, label, done=False)
            if fail_before_swap:
                shutil.rmtree(staging)
                raise DistillError("parity too low")
            runio.swap_into_place(staging, final)
            if fail_after_swap:
                raise Killed
            return {"label": label}
        return run

    monkeypatch.setattr(publish, "run", fake_publish("old"))
    pipeline.run_stage(cfg, "publish")
    done = runio.read_done(run_dir, "publish")
    assert done is not None and paths.ROUTING in done["outputs"] and paths.MODEL_DIR in done["outputs"]

    # A publish with another config fails before its swap: publish/ and its DONE.json are the old ones, still valid.
    monkeypatch.setattr(publish, "run", fake_publish("other", fail_before_swap=True))
    with pytest.raises(DistillError, match="parity"):
        pipeline.run_stage(_cfg(run_dir, NO_TEACHER, "publish.min_parity=0.5"), "publish")
    assert runio.read_done(run_dir, "publish") == done
    monkeypatch.setattr(publish, "run", fake_publish("unused"))
    pipeline.run_stage(cfg, "publish")
    assert builds == ["old", "other"]  # the old config skips: its complete folder is still there

    # Killed after the swap, before DONE.json: the new folder has none, so the next run publishes again.
    monkeypatch.setattr(publish, "run", fake_publish("new", fail_after_swap=True))
    with pytest.raises(Killed):
        pipeline.run_stage(cfg, "publish", force=True)
    assert _state(paths.stage_dir(run_dir, "publish")) == "new" and runio.read_done(run_dir, "publish") is None
    monkeypatch.setattr(publish, "run", fake_publish("new"))
    caplog.set_level(logging.INFO, logger="distill")
    pipeline.run_stage(cfg, "publish")
    assert builds == ["old", "other", "new", "new"]
    assert any("no publish/DONE.json" in m for m in _reasons(caplog, "publish"))

    # A routing.yaml edited under publish/DONE.json is not trusted either.
    (paths.stage_dir(run_dir, "publish") / paths.ROUTING).write_text("tampered")
    monkeypatch.setattr(publish, "run", fake_publish("new"))
    pipeline.run_stage(cfg, "publish")
    assert builds[-1] == "new" and len(builds) == 5
    assert _leftovers(run_dir) == []


def _build_cache_folder(target: str, log_path: str, go) -> None:
    """One process asking for the shared cache folder: records each build it runs and each file it then finds."""
    from distill.student.models import _build_once

    def build(tmp: Path) -> None:
        with open(log_path, "a") as f:
            f.write(f"build {os.getpid()}\n")
        tmp.mkdir(parents=True)
        (tmp / "weights.bin").write_bytes(b"x" * 1_000_000)
        time.sleep(0.5)  # long enough for the other process to arrive while this one builds
        (tmp / "config.json").write_text("{}")

    go.wait()
    _build_once(Path(target), build, "config.json")
    found = sorted(p.name for p in Path(target).iterdir())
    with open(log_path, "a") as f:
        f.write(f"found {os.getpid()} {','.join(found)}\n")


def test_processes_that_start_together_on_an_empty_cache_build_it_once_and_all_find_it_whole(tmp_path):
    # Two ladder runs started side by side used to both dequantize the student and the second rename deleted the
    # folder the first one was loading from ("no file named model.safetensors").
    ctx = multiprocessing.get_context("fork")
    go, target, log_path = ctx.Event(), tmp_path / "students" / "s-1", tmp_path / "log"
    procs = [ctx.Process(target=_build_cache_folder, args=(str(target), str(log_path), go)) for _ in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    lines = log_path.read_text().splitlines()
    assert len([line for line in lines if line.startswith("build")]) == 1
    assert [line.split()[2] for line in lines if line.startswith("found")] == ["config.json,weights.bin"] * 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["s-1", "s-1.lock"]
