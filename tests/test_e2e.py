"""End to end on the real embedded models: llama.cpp teacher (SmolLM2 GGUF) and SmolLM2 student, profile=smoke.

This is the README's promise tested as a user runs it: one command, then the same command again for free.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from distill import paths, runio

pytestmark = pytest.mark.e2e


def _distill(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _ledger_rows(run_dir) -> int:
    with sqlite3.connect(paths.ledger_path(run_dir)) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def test_smoke_run_on_embedded_models_then_rerun_is_free(tmp_path):
    run_dir = tmp_path / "smoke"
    first = _distill("run", "recipe=support_tickets", "profile=smoke", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in paths.STAGES:
        assert runio.read_done(run_dir, stage) is not None, stage

    generate = runio.read_done(run_dir, "generate")["summary"]
    assert generate["labelled"] + sum(generate["rejected"].values()) == 40
    assert generate["labelled"] > 0 and generate["teacher_vs_gold"]["n"] == generate["labelled"]
    rows = _ledger_rows(run_dir)
    assert rows == generate["new_ledger_rows"] > 0

    train = runio.read_done(run_dir, "train")["summary"]
    assert train["steps"] == 6 and train["final_loss"] < train["first_loss"]

    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    metrics = results["metrics"]
    assert metrics["n"] > 0 and 0.0 <= metrics["agreement"]["exact"] <= 1.0
    assert 0.0 <= metrics["invalid_rate"] <= 1.0
    assert metrics["n_gold"] == metrics["n"] and 0.0 <= metrics["teacher_vs_gold"]["exact"] <= 1.0
    assert results["speed"]["items_per_s"] > 0

    publish = runio.read_done(run_dir, "publish")["summary"]
    (gguf_name,) = publish["artifacts"]
    assert publish["checks"][gguf_name]["loads"] is True
    assert (run_dir / "publish" / paths.MODEL_DIR / gguf_name).stat().st_size > 50e6  # a real 135M model
    routing = (run_dir / "publish" / paths.ROUTING).read_text()
    assert "results_sha256" in routing and "<|im_end|>" in routing

    again = _distill("run", "recipe=support_tickets", "profile=smoke", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped: finished earlier") == 4
    assert "starting llama.cpp server" not in again.stderr
    assert _ledger_rows(run_dir) == rows


def test_ctrl_c_during_generate_stops_the_teacher_server(tmp_path):
    """The llama.cpp server distill starts is stopped on Ctrl-C too, and paid calls so far stay in the ledger."""
    import re
    import signal
    import socket
    import time

    run_dir = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "generate", "recipe=support_tickets", "profile=smoke",
                             f"run_dir={run_dir}"], stderr=subprocess.PIPE, text=True, env=env)
    port = None
    for line in proc.stderr:
        if match := re.search(r"starting llama.cpp server on http://127.0.0.1:(\d+)", line):
            port = int(match.group(1))
            break
    assert port, "the teacher server never started"
    time.sleep(8)  # let it start and make a few paid calls
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the teacher server is still listening"
    assert runio.read_done(run_dir, "generate") is None
    assert paths.ledger_path(run_dir).exists()
