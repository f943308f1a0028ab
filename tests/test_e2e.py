"""End to end on the real embedded models: llama.cpp teacher (SmolLM2 GGUF) and SmolLM2 student, profile=smoke.

This is the README's promise tested as a user runs it: one command, then the same command again for free.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

import pytest

from distill import paths, runio

pytestmark = pytest.mark.e2e


def _distill(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


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
    # The headline rates are what the items say: per_item (clean items) and the test split's teacher vs gold.
    clean = [p for p in results["per_item"] if not p["contaminated"]]
    assert metrics["n"] == len(clean) > 0
    assert metrics["agreement"]["exact"] == pytest.approx(sum(p["agree"] for p in clean) / len(clean), abs=1e-4)
    assert metrics["invalid_rate"] == pytest.approx(sum(not p["valid"] for p in clean) / len(clean), abs=1e-4)
    test_rows = {r["id"]: r for r in runio.read_jsonl(paths.split_path(run_dir, "test"))}
    teacher_right = [test_rows[p["id"]]["teacher"] == test_rows[p["id"]]["gold"] for p in clean]
    assert metrics["n_gold"] == metrics["n"]
    assert metrics["teacher_vs_gold"]["exact"] == pytest.approx(sum(teacher_right) / len(clean), abs=1e-4)
    assert results["speed"]["items_per_s"] > 0
    # every figure of the evaluation is in results.json (keys listed in README)
    exact = metrics["agreement_ci"]["exact"]
    assert exact["low"] <= exact["value"] <= exact["high"]
    assert {"accuracy", "macro_f1", "per_class"} <= set(metrics["fields"]["category"]["vs_gold"])
    assert set(results["confusion"]) == {"category", "priority"}
    assert results["coverage_curve"][0]["coverage"] == 1.0 and results["val_coverage_curve"]
    assert results["calibration"]["whole"]["ece"] is not None
    cost = results["cost"]
    assert cost["teacher_usd_per_1k"] > 0 and cost["student_usd_per_1k"] > 0 and cost["teacher"]["items_priced"] > 0
    assert results["speed"]["latency_p95_s"] >= results["speed"]["latency_p50_s"] > 0
    assert results["decontamination"]["n_checked"] == metrics["n"] + results["decontamination"]["n_excluded"]
    assert results["gate"]["passed"] is True and len(results["per_item"]) == results["decontamination"]["n_checked"]
    for name in ("report.md", "coverage.png", "cost.png", "confusion_category.png", paths.JUNIT_XML):
        assert (run_dir / "evaluate" / name).stat().st_size > 0, name

    publish = runio.read_done(run_dir, "publish")["summary"]
    parity = runio.read_json(run_dir / "publish" / paths.PARITY)
    (gguf_rel,) = [rel for rel in parity if rel.endswith("-q8_0.gguf")]
    check = parity[gguf_rel]["stop_check"]
    # The Q8_0 GGUF served by llama.cpp answers a ticket with schema-valid JSON and stops at <|im_end|>.
    assert check["valid"] is True and check["finish_reason"] == "stop" and check["completion_tokens"] < 48, check
    assert set(parity) >= {gguf_rel, f"{paths.MODEL_DIR}/{paths.HF_DIR}"}
    for res in parity.values():  # parity is a share of the n items scored: a whole number of them
        agreeing = res["parity"] * res["n"]  # parity.json rounds to 4 decimals
        assert res["n"] == metrics["n"] and abs(agreeing - round(agreeing)) <= res["n"] * 1e-4, res
    assert parity[f"{paths.MODEL_DIR}/{paths.HF_DIR}"]["parity"] == 1.0  # merged = adapter on base, same answers
    from distill.routing import load_rule

    rule = load_rule(run_dir / "publish" / paths.ROUTING)
    assert rule.student.stop == ["<|im_end|>"]
    # Published exactly when it met publish.min_parity; then it is a real 135M model named in the rule.
    gguf = run_dir / "publish" / gguf_rel
    assert parity[gguf_rel]["published"] == (parity[gguf_rel]["parity"] >= 0.9) == gguf.exists()
    assert (gguf_rel in rule.student.artifacts.values()) == gguf.exists()
    if gguf.exists():
        assert gguf.stat().st_size > 50e6 and publish["checks"][gguf.name]["loads"] is True
    assert rule.evidence.results_sha256 == runio.sha256_file(run_dir / "evaluate" / paths.RESULTS)
    import jsonschema
    import yaml

    jsonschema.validate(yaml.safe_load((run_dir / "publish" / paths.ROUTING).read_text()),
                        runio.read_json(run_dir / "publish" / paths.ROUTING_SCHEMA))
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list
    from litellm import Router

    litellm_cfg = yaml.safe_load((run_dir / "publish" / paths.LITELLM).read_text())
    Router(model_list=litellm_cfg["model_list"], **litellm_cfg.get("router_settings", {}))

    again = _distill("run", "recipe=support_tickets", "profile=smoke", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped: finished earlier") == 4
    assert not re.search(r"starting (llama\.cpp server|llama-server)", again.stderr)  # either runtime
    assert _ledger_rows(run_dir) == rows


def test_ctrl_c_during_generate_stops_the_teacher_server(tmp_path):
    """The llama.cpp server distill starts is stopped on Ctrl-C too, and paid calls so far stay in the ledger."""
    import signal
    import socket
    import threading
    import time

    run_dir = tmp_path / "interrupted"
    args = ("generate", "recipe=support_tickets", "profile=smoke", f"run_dir={run_dir}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", *args], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # never let the pipe fill
    reader.start()
    port, rows, deadline = None, 0, time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the server, then for paid answers
        if port is None:
            found = [m for line in list(lines) if (m := re.search(  # either runtime (teacher.runtime)
                r"starting (?:llama\.cpp server|llama-server \(\d+ slots?\)) on http://127.0.0.1:(\d+)", line))]
            port = int(found[0].group(1)) if found else None
        elif paths.ledger_path(run_dir).exists():
            try:
                rows = _ledger_rows(run_dir)
            except sqlite3.OperationalError:  # the writer holds it this instant
                rows = 0
            if rows >= 3:
                break
        time.sleep(0.2)
    assert port and rows >= 3, "".join(lines)[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the teacher server is still listening"
    assert runio.read_done(run_dir, "generate") is None
    assert _ledger_rows(run_dir) >= rows  # every answer paid before the interrupt is still in the ledger


@pytest.mark.timeout(1800)  # generate writes whole JSON answers here: slower than scoring on a busy machine
def test_email_extraction_recipe_runs_end_to_end_on_smoke(tmp_path):
    """The second shipped recipe (free-text and enum fields) runs on the embedded models with no extra overrides."""
    run_dir = tmp_path / "emails"
    result = _distill("run", "recipe=email_extraction", "profile=smoke", f"run_dir={run_dir}", timeout=1700)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in paths.STAGES:
        assert runio.read_done(run_dir, stage) is not None, stage

    generate = runio.read_done(run_dir, "generate")["summary"]
    assert generate["method"] == "generate"  # free-text fields: the teacher writes JSON under the schema's grammar
    assert generate["labelled"] > 0 and generate["splits"]["train"] > 0 and generate["splits"]["test"] > 0
    assert generate["teacher_vs_gold"]["n"] == generate["labelled"]
    fields = {"order_id", "product", "issue_type", "requested_action"}
    rows = [r for s in paths.SPLITS for r in runio.read_jsonl(paths.split_path(run_dir, s))]
    assert all(set(r["teacher"]) == fields and set(r["gold"]) == fields for r in rows)

    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    assert results["recipe"] == "email_extraction" and results["metrics"]["n"] > 0
    assert set(results["metrics"]["agreement"]) >= fields
    assert set(results["confusion"]) == {"issue_type", "requested_action"}
    assert "email_extraction" in (run_dir / "publish" / paths.ROUTING).read_text()
