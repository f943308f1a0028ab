"""The loop around distill serve: the traffic log, shadow calls to the teacher, drift alarms, and reload.

Unit tests drive the log and the detectors directly; the integration tests run the gateway over loopback on one
tiny published run (a fake student answering with chosen confidences, fake teachers counting their calls).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, copy_with_route

from distill.serve.command import background, load_serve_config
from distill.serve.drift import AgreementDrift, AnswerDrift, read_events
from distill.serve.store import SqliteStore, StoreError
from distill.serve.traffic import STREAM, TrafficLog, read_traffic
from distill.testing.fake_student import FakeStudent
from distill.testing.fake_teacher import FakeTeacher

TASK = "support_tickets"
KEPT = {"category": "billing", "priority": "high"}
TEACHER_SAYS = {"category": "shipping_delivery", "priority": "low"}


# ---------------------------------------------------------------------------------------------------------------
# units: the traffic log and the detectors


def test_traffic_log_writes_redacted_rows_and_keeps_its_retention(tmp_path):
    store = SqliteStore(tmp_path / "traffic.sqlite", TASK)
    log = TrafficLog(store, max_rows=5, max_days=1, redact=True)
    old = time.time() - 3 * 86400
    log.record({"ts": old, "input": "from last week", "route": "teacher"})
    for i in range(12):
        log.record({"ts": time.time(), "input": f"ticket {i}: mail jane.doe{i}@example.com or call +1 415 555 0134",
                    "route": "student", "student": {"note": f"write to jane.doe{i}@example.com"}, "teacher": None})
    log.close()
    rows = [rec for _, rec in SqliteStore(tmp_path / "traffic.sqlite", TASK).read(STREAM)]
    assert [r["input"].split(":")[0] for r in rows] == [f"ticket {i}" for i in range(7, 12)]  # newest 5 kept
    assert all("@example.com" not in json.dumps(r) and "555" not in r["input"] for r in rows)
    assert rows[0]["input"].endswith("mail [EMAIL] or call [PHONE]")
    assert rows[0]["student"] == {"note": "write to [EMAIL]"}
    assert log.written == 13 and log.dropped == 0


def test_traffic_retention_by_age_drops_only_the_old_rows(tmp_path):
    log = TrafficLog(SqliteStore(tmp_path / "t.sqlite"), max_rows=100, max_days=2, redact=False)
    for age_days in (5, 4, 3, 1, 0):
        log.record({"ts": time.time() - age_days * 86400, "input": f"{age_days} days old"})
    log.close()
    rows = [rec["input"] for _, rec in SqliteStore(tmp_path / "t.sqlite").read(STREAM)]
    assert rows == ["1 days old", "0 days old"]


class _CallCountingStore(SqliteStore):
    """A SqliteStore that counts its append_many calls and fails the ones holding a poisoned record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def append_many(self, stream, records):
        self.calls.append(len(records))
        if any(r.get("input") == "poison" for r in records):
            raise StoreError("refused")
        return super().append_many(stream, records)


def test_traffic_log_writes_in_batches_only_when_the_writer_runs(tmp_path, monkeypatch):
    import distill.serve.traffic as traffic

    monkeypatch.setattr(traffic, "FLUSH_EVERY_S", 3600.0)  # the writer's period never comes during this test
    store = _CallCountingStore(tmp_path / "t.sqlite")
    log = TrafficLog(store, max_rows=10_000, max_days=None, redact=False)
    for i in range(traffic.BATCH_MAX + 20):
        log.record({"input": f"ticket {i}"})
    time.sleep(0.2)
    assert store.length(STREAM) == 0 and store.calls == []  # queued only: record woke nothing
    log.flush()
    assert store.calls == [traffic.BATCH_MAX, 20] and log.written == traffic.BATCH_MAX + 20
    log.record({"input": "after the flush"})
    log.close()  # close writes what is still queued
    rows = [rec["input"] for _, rec in SqliteStore(tmp_path / "t.sqlite").read(STREAM)]
    assert rows == [f"ticket {i}" for i in range(traffic.BATCH_MAX + 20)] + ["after the flush"]


def test_traffic_log_one_refused_record_loses_only_itself_and_a_full_queue_counts_drops(tmp_path, monkeypatch):
    import distill.serve.traffic as traffic

    monkeypatch.setattr(traffic, "FLUSH_EVERY_S", 3600.0)
    monkeypatch.setattr(traffic, "QUEUE_MAX", 5)
    store = _CallCountingStore(tmp_path / "t.sqlite")
    log = TrafficLog(store, max_rows=100, max_days=None, redact=False)
    for text in ("a", "poison", "b", "c", "d", "e", "f"):
        log.record({"input": text})
    log.close()
    rows = [rec["input"] for _, rec in SqliteStore(tmp_path / "t.sqlite").read(STREAM)]
    assert rows == ["a", "b", "c", "d"] and log.written == 4 and log.failed == 1 and log.dropped == 2  # e, f
    assert store.calls == [5, 1, 1, 1, 1, 1]  # the group was refused, then written one record at a time


def test_traffic_log_period_writes_without_a_flush(tmp_path, monkeypatch):
    import distill.serve.traffic as traffic

    monkeypatch.setattr(traffic, "FLUSH_EVERY_S", 0.05)
    store = _CallCountingStore(tmp_path / "t.sqlite")
    log = TrafficLog(store, max_rows=100, max_days=None, redact=False)
    for i in range(30):
        log.record({"input": f"ticket {i}"})
    deadline = time.monotonic() + 5
    while store.length(STREAM) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.length(STREAM) == 30 and len(store.calls) < 30  # grouped, not one call per record
    log.close()


def _stream(rng: random.Random, p: float, n: int) -> list[bool]:
    return [rng.random() < p for _ in range(n)]


def test_agreement_drift_alarms_on_a_drop_and_clears_on_recovery():
    rng = random.Random(3)
    detector = AgreementDrift(target=0.95, margin=0.05, min_samples=30)
    assert [c for c in map(detector.update, _stream(rng, 0.96, 3000)) if c] == []  # stationary: silent
    changes = [(i, c) for i, c in enumerate(map(detector.update, _stream(rng, 0.6, 400))) if c]
    assert changes and changes[0][1] == "alarm" and changes[0][0] < 150
    assert detector.active and detector.detail()["agreement"] < 0.9
    recovered = [c for c in map(detector.update, _stream(rng, 0.99, 2000)) if c]
    assert recovered == ["cleared"] and not detector.active


def test_answer_drift_chi_square_against_the_held_out_answers():
    enums = {"category": ["billing", "shipping", "refund"], "priority": ["low", "high"]}
    rng = random.Random(0)
    reference = [{"category": rng.choice(["billing", "shipping"]), "priority": rng.choice(["low", "high"])}
                 for _ in range(200)]
    same = AnswerDrift(reference, enums, window=100, p_value=1e-4)
    assert [c for c in (same.update(rng.choice(reference)) for _ in range(1000)) if c] == []
    shifted = AnswerDrift(reference, enums, window=100, p_value=1e-4)
    changes = [c for c in (shifted.update({"category": "refund", "priority": "low"}) for _ in range(100)) if c]
    assert changes == ["alarm"] and shifted.detail()["field"] in ("category", "priority")


@pytest.mark.benchmark
def test_drift_benchmark_tiny():
    out = subprocess.run([sys.executable, "benchmarks/drift.py", "--requests", "1500", "--change-at", "500",
                          "--seeds", "1", "--rates", "1.0", "--no-record"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")}
    assert rows["stationary"][3].strip() == "0 false alarms in 1 x 1500"
    assert 0 < float(rows["new category"][3].split()[0]) < 1000  # the alarm fired after the change, in requests


# ---------------------------------------------------------------------------------------------------------------
# the gateway: shadow, drift fallback, reload, status


PUBLISH_EXTRA = ("publish.force=true", "publish.gguf_types=[q8_0]")  # conftest's `published` run


def _copy(published: Path, dest: Path, threshold: float | None = 0.9) -> Path:
    return copy_with_route(published, dest, threshold)


def _cfg(run_dir: Path, *extra: str):
    return load_serve_config([f"run_dir={run_dir}", "serve.port=0", "serve.exact_cache.enabled=false", *extra])


def _post(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=60,
                      json={"model": TASK, "messages": [{"role": "user", "content": text}]})


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}{{{want}}}")), 0.0)


def _wait(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class GatedTeacher:
    """A fake teacher whose answers wait until the test releases them."""

    def __init__(self):
        self.release, self.arrivals = threading.Event(), 0
        self.fake = FakeTeacher(self.answer)

    def answer(self, messages):
        self.arrivals += 1
        assert self.release.wait(30)
        return json.dumps(TEACHER_SAYS)


def test_shadow_never_delays_the_reply_counts_calls_and_drops_when_full(published, tmp_path):
    run_dir = _copy(published, tmp_path / "run")
    gated = GatedTeacher()
    with gated.fake as slow, FakeStudent(lambda text: (KEPT, 0.99)) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={slow.base_url}",
                   "serve.shadow_rate=1.0", "serve.shadow_queue=1", "serve.shadow_concurrency=1")
        with background(cfg) as url:
            first = _post(url, "Ticket A: charged twice for one seat")
            # the reply is here while the teacher still holds the shadow call: the reply did not wait for it
            assert first.status_code == 200 and first.headers["x-distill-route"] == "student"
            _wait(lambda: gated.arrivals == 1)
            assert not gated.release.is_set() and _metric(url, "distill_shadow_calls_total", task=TASK,
                                                          result="paid") == 0
            replies = [_post(url, f"Ticket {c}: where is my parcel") for c in "BCD"]  # B queued, C and D dropped
            assert [r.headers["x-distill-route"] for r in replies] == ["student"] * 3
            assert _metric(url, "distill_shadow_dropped_total", task=TASK, why="queue_full") == 2
            gated.release.set()
            _wait(lambda: _metric(url, "distill_shadow_calls_total", task=TASK, result="paid") == 2)
            assert _metric(url, "distill_live_comparisons", task=TASK) == 2
            assert _metric(url, "distill_live_agreement", task=TASK, field="_all", bound="value") == 0.0
            assert _metric(url, "distill_live_agreement", task=TASK, field="priority", bound="high") > 0.0
    assert len(slow.calls) == 2  # exactly the two shadow calls; C and D never reached the teacher
    rows = {r["input"][:8]: r for r in read_traffic(cfg, run_dir)}
    assert sorted(rows) == ["Ticket A", "Ticket B", "Ticket C", "Ticket D"]
    a, c = rows["Ticket A"], rows["Ticket C"]
    assert (a["route"], a["reason"], a["student"], a["teacher"], a["teacher_source"]) == (
        "student", "confident", KEPT, TEACHER_SAYS, "shadow")
    assert a["confidence"] == pytest.approx(0.99) and a["answered_ts"] >= a["ts"] > 0 and a["status"] == 200
    assert (c["teacher"], c["teacher_source"]) == (None, None)
    from distill.serve.shadow import status_text

    report = status_text(cfg)
    assert "live agreement: 0.0% [" in report and "over 2 shadow comparisons" in report
    assert "traffic: 4 requests logged" in report and "student 4" in report


def test_a_drift_alarm_with_on_drift_fallback_sends_the_task_to_the_teacher(published, fake_answer, tmp_path):
    run_dir = _copy(published, tmp_path / "run")
    with FakeTeacher(fake_answer) as fake, FakeStudent(lambda text: (KEPT, 0.99)) as student:  # confidently wrong
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={fake.base_url}",
                   "serve.shadow_rate=1.0", "serve.on_drift=fallback", "serve.drift.min_samples=5")
        with background(cfg) as url:
            for i in range(5):
                assert _post(url, f"Ticket {i}: the app crashes on login").headers["x-distill-route"] == "student"
            _wait(lambda: _metric(url, "distill_drift_alarm", task=TASK, kind="agreement") == 1)
            after = [_post(url, f"Later ticket {i}: the app crashes on login") for i in range(3)]
            alarms = _metric(url, "distill_drift_alarms_total", task=TASK, kind="agreement")
    assert [(r.headers["x-distill-route"], r.headers["x-distill-reason"]) for r in after] == [("teacher", "drift")] * 3
    assert all(json.loads(r.json()["choices"][0]["message"]["content"]) != KEPT for r in after)
    assert alarms == 1
    (event,) = [e for e in read_events(run_dir / "serve") if e["event"] == "drift_alarm"]
    assert (event["task"], event["kind"], event["on_drift"]) == (TASK, "agreement", "fallback")
    assert event["agreement"] == 0.0 and event["window"] == 5
    rows = read_traffic(cfg, run_dir)
    assert [r["reason"] for r in rows[-3:]] == ["drift"] * 3 and rows[-1]["student"] == KEPT


def test_reload_swaps_the_rule_with_zero_failed_requests_in_flight(published, teacher, tmp_path):
    old = _copy(published, tmp_path / "old")
    new = _copy(published, tmp_path / "new", threshold=None)  # publish disabled its route: all to the teacher
    with FakeStudent(lambda text: (KEPT, 0.99), latency_s=0.3) as student:
        with background(_cfg(old, f"serve.student_endpoint={student.base_url}")) as url:
            base = url.removesuffix("/v1")
            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(_post, url, f"Ticket {i}: refund please") for i in range(16)]
                _wait(lambda: len(student.calls) >= 4)  # requests are in flight on the old rule
                swapped = httpx.post(f"{base}/admin/reload", json={"run_dir": str(new)}, timeout=60)
                during = [f.result() for f in futures]
            later = _post(url, "A ticket after the reload")
            refused = httpx.post(f"{base}/admin/reload", json={"run_dir": str(tmp_path / "nowhere")}, timeout=60)
            still = _post(url, "A ticket after the refused reload")
            health = httpx.get(f"{base}/healthz").json()
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["run_dir"] == str(new) and swapped.json()["route_enabled"] is False
    assert [r.status_code for r in during] == [200] * 16
    assert {r.headers["x-distill-route"] for r in during} <= {"student", "teacher"}
    assert "student" in {r.headers["x-distill-route"] for r in during}  # some finished on the old rule
    assert (later.headers["x-distill-route"], later.headers["x-distill-reason"]) == ("teacher", "route_disabled")
    assert refused.status_code == 400 and "keeps serving" in refused.json()["error"]["message"]
    assert still.status_code == 200 and still.headers["x-distill-reason"] == "route_disabled"
    assert health["tasks"][TASK]["route_enabled"] is False
    reloads = [e for e in read_events(old / "serve") if e["event"] == "reload"]
    assert [e["run_dir"] for e in reloads] == [str(new)]
