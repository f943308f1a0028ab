"""End to end on the real embedded models: the smoke run's publish folder served by ``python -m distill serve``.

    python -m pytest tests/test_serve_e2e.py -m e2e -s      # prints live vs predicted coverage and agreement
    DISTILL_E2E_SMOKE_RUN_DIR=DIR python -m pytest tests/test_serve_e2e.py -s   # serve a finished smoke run instead

The smoke run publishes a routing rule whose evidence is the served GGUF's own confidence curve (parity.json,
``served_confidence``). Its route is usually disabled there (6 val items, fewer than publish.min_route_items), so the
test forces a threshold inside a wide gap of the served test curve, predicts the test split's coverage and
agreement at it from that curve, sends the test items the curve rests on (evaluate's: the smoke profile scores the
first eval.limit=10 of the test split, duplicates of train items left out) through the gateway with the official
``openai`` client, and checks that what the gateway did matches the prediction within 3 points. Then SIGTERM: the gateway exits and its
child servers (the student runtime, the embedded teacher) are gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import REPO, copy_with_route, wait_healthy

from distill import paths, runio
from distill.routing import load_rule, point_at

pytestmark = pytest.mark.e2e

TASK = "support_tickets"
TOLERANCE = 0.03  # the acceptance: live figures within 3 points of the prediction


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _forced_threshold(curve: list[dict]) -> tuple[float, dict]:
    """A threshold that sends part of the test split to the student and part to the teacher, and the curve point
    that predicts it: the middle of the widest gap between two listed thresholds (every distinct confidence is
    one) whose upper point covers some but not all items. Nothing falls in the gap, so the items covered at the
    middle are exactly those covered at the gap's upper point, however the live confidence moves within the gap."""
    gaps = [(b["threshold"] - a["threshold"], a, b) for a, b in zip(curve, curve[1:]) if 0 < b["coverage"] < 1]
    assert gaps, f"the served test curve has no point between all and nothing: {curve}"
    width, low, high = max(gaps, key=lambda g: g[0])
    assert width >= 1e-3, f"no gap wide enough to force a threshold into: {curve}"
    return round((low["threshold"] + high["threshold"]) / 2, 6), high


@pytest.mark.timeout(5400)  # the smoke run alone is ~3 min on 2 idle cores; shared cores take far longer
def test_smoke_run_served_live_coverage_and_agreement_match_the_served_curve(tmp_path):
    import psutil

    from distill.teacher.server import free_port

    reuse = os.environ.get("DISTILL_E2E_SMOKE_RUN_DIR")  # a finished smoke run to serve instead of making one
    run_dir = Path(reuse) if reuse else tmp_path / "smoke"
    if reuse:
        assert runio.read_done(run_dir, "publish") is not None, f"{run_dir} holds no finished publish stage"
    else:
        run = subprocess.run([sys.executable, "-m", "distill", "run", "recipe=support_tickets", "profile=smoke",
                              f"run_dir={run_dir}"], capture_output=True, text=True, env=_env(), cwd=REPO,
                             timeout=3600)
        assert run.returncode == 0, run.stderr[-3000:]
    pub = paths.stage_dir(run_dir, "publish")
    rule = load_rule(pub / paths.ROUTING)
    served_rel = rule.evidence.artifact
    assert served_rel and served_rel.endswith("-q8_0.gguf"), "the threshold must rest on the served GGUF's curve"
    served = runio.read_json(pub / paths.PARITY)[served_rel]["served_confidence"]
    test_split = runio.read_jsonl(paths.split_path(run_dir, "test"))
    evaluated = {r["id"] for r in runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
                 if not r["contaminated"]}
    rows = [r for r in test_split if r["id"] in evaluated]  # the items the curve rests on: duplicates left out
    assert served["n_test"] == len(rows) > 0
    if rule.route.enabled:  # the rule's own test evidence is the served curve at its threshold
        point = point_at(served["coverage_curve"], rule.route.confidence_threshold)
        assert (rule.evidence.test_coverage, rule.evidence.test_agreement) == (point["coverage"],
                                                                               point["agreement"])
    threshold, upper = _forced_threshold(served["coverage_curve"])
    predicted = point_at(served["coverage_curve"], threshold)  # what routing.yaml's evidence would say at it
    assert predicted == upper
    served_dir = copy_with_route(run_dir, tmp_path / "served", threshold)  # the smoke run itself stays as published

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # serve.student_timeout_s: on 2 shared cores one scored answer can take longer than the default 10 s, and a
    # timeout sends the request to the teacher (student_error); this test measures routing, not latency
    proc = subprocess.Popen([sys.executable, "-m", "distill", "serve", f"run_dir={served_dir}", f"serve.port={port}",
                             "serve.student_timeout_s=300"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, base)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the student runtime and the embedded teacher run as child processes"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        routes, reasons, kept_agree = [], [], []
        started = time.monotonic()
        for r in rows:
            raw = client.chat.completions.with_raw_response.create(
                model=TASK, messages=[{"role": "user", "content": r["input"]}])
            route = raw.headers["x-distill-route"]
            routes.append(route), reasons.append(raw.headers["x-distill-reason"])
            if route == "student":
                kept_agree.append(json.loads(raw.parse().choices[0].message.content) == r["teacher"])
        wall = time.monotonic() - started
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        _, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    coverage = routes.count("student") / len(routes)
    agreement = sum(kept_agree) / len(kept_agree) if kept_agree else None
    print(f"\nserve e2e: {len(rows)} test items, threshold {threshold} (forced: route was "
          f"{'enabled' if rule.route.enabled else 'disabled'}), served artifact {served_rel}: live coverage "
          f"{coverage:.4f} vs predicted {predicted['coverage']:.4f}; kept answers' agreement with the teacher "
          f"{agreement} vs predicted {predicted['agreement']}; {wall:.1f} s for the split; load average "
          f"{os.getloadavg()[0]:.2f}")
    assert set(reasons) <= {"confident", "below_threshold", "invalid_answer"}, reasons  # no student failure
    assert 0 < coverage < 1, "the forced threshold should exercise both routes"
    assert coverage == pytest.approx(predicted["coverage"], abs=TOLERANCE)
    assert agreement == pytest.approx(predicted["agreement"], abs=TOLERANCE)
    # SIGTERM: a clean exit, the child servers stopped, the port closed
    assert code == 0, stderr[-3000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
