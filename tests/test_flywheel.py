"""The flywheel: serve a run, log its traffic, re-distil from the log into a new run, reload the gateway onto it.

The suite's version runs on the tiny random student, a fake student runtime with chosen confidences and a fake
teacher that counts its calls (the whole loop in about a minute). The same loop on the real embedded models
(SmolLM2 teacher and student, profile=smoke) is ``benchmarks/flywheel.py``; it takes longer than the suite allows.
"""

from __future__ import annotations

import csv
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, tiny_overrides
from test_loop import _copy, _metric, _post, _wait

from distill import DistillError, paths, pipeline, runio
from distill.config import check_startup, load_config
from distill.data.dedup import normalise
from distill.ledger import Ledger
from distill.ledger.store import request_key
from distill.serve.command import background, load_serve_config
from distill.serve.traffic import read_traffic
from distill.stages.generate import traffic
from distill.task import Example
from distill.testing.fake_student import FakeStudent

BITEXT = (REPO.parent / "shared" / "data" / "bitext_customer_support"
          / "Bitext_Sample_Customer_Support_Training_Dataset.csv")
KEPT = {"category": "billing", "priority": "high"}


def new_tickets(n: int) -> list[str]:
    """``n`` distinct customer tickets the recipe has never seen: Bitext's (when the shared data is there), else
    written here."""
    if BITEXT.is_file():
        seen, out = set(), []
        with BITEXT.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                text = row["instruction"].strip()
                if len(text.split()) >= 6 and normalise(text) not in seen:
                    seen.add(normalise(text))
                    out.append(text)
                if len(out) == n:
                    return out
    items = ["invoice", "parcel", "password", "refund", "subscription", "voucher", "address", "receipt"]
    return [f"Customer {i}: my {items[i % 8]} from order {1000 + 7 * i} needs attention, week {i // 8}"
            for i in range(n)]


def _ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


@pytest.fixture(scope="module")
def served(teacher, tmp_path_factory):
    base = tmp_path_factory.mktemp("flywheel")
    pipeline.run(load_config(tiny_overrides(base / "built", teacher.base_url, "publish.force=true",
                                            "publish.gguf_types=[q8_0]")))
    return _copy(base / "built", base / "served")  # its route forced on: confident answers are kept


# ---------------------------------------------------------------------------------------------------------------
# config and units


def test_source_traffic_is_checked_before_anything_runs(served, tmp_path):
    with pytest.raises(DistillError, match="generate.source=traffic needs generate.traffic=PATH"):
        load_config(["recipe=support_tickets", "generate.source=traffic"])
    with pytest.raises(DistillError, match="generate.traffic is read only with generate.source=traffic"):
        load_config(["recipe=support_tickets", f"generate.traffic={served}"])
    missing = load_config(["recipe=support_tickets", "generate.source=traffic", f"generate.traffic={tmp_path}/no"])
    with pytest.raises(DistillError, match="does not exist; point generate.traffic at the served run's directory"):
        check_startup(missing, ("generate",))
    # a run that was never served: no traffic log yet
    never = _copy(served, tmp_path / "never", threshold=None)
    unserved = load_config(["recipe=support_tickets", "generate.source=traffic", f"generate.traffic={never}",
                            f"run_dir={tmp_path / 'new'}"])
    with pytest.raises(DistillError, match="holds no traffic log .* serve the run first"):
        check_startup(unserved, ("generate",))
    # the served run's own ledger is the one the new run uses, unless one is given
    assert unserved.generate.shared_ledger == str(paths.ledger_path(never).resolve())
    (tmp_path / "elsewhere.sqlite").write_bytes(b"")
    other = load_config(["recipe=support_tickets", "generate.source=traffic", f"generate.traffic={never}",
                         f"generate.shared_ledger={tmp_path / 'mine.sqlite'}"])
    assert other.generate.shared_ledger == str(tmp_path / "mine.sqlite")
    stray = load_config(["recipe=support_tickets", "generate.source=traffic",
                         f"generate.traffic={tmp_path / 'elsewhere.sqlite'}"])
    with pytest.raises(DistillError, match="is not inside a served run's serve/ folder"):
        check_startup(stray, ("generate",))


def test_a_logged_answer_is_used_only_when_the_ledger_lacks_the_request(tmp_path):
    plan = traffic.TrafficPlan(tmp_path, [], [], {"traffic-a": {"category": "refund", "priority": "low"},
                                                  "traffic-b": {"category": "billing", "priority": "high"}})
    examples = [Example("traffic-a", "ticket a"), Example("traffic-b", "ticket b"), Example("traffic-c", "ticket c")]
    requests = {ex.id: {"messages": [{"role": "user", "content": ex.text}]} for ex in examples}
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record_success(request_key(requests["traffic-a"]), "m", requests["traffic-a"], "{}")
        from_log = traffic.use_logged_answers(plan, examples, lambda i: [requests[examples[i].id]], ledger)
    assert from_log == {"traffic-b"}  # a: labelling reads the ledger; c: never answered, so it is asked
    assert [ex.trusted for ex in examples] == [None, {"category": "billing", "priority": "high"}, None]


def test_train_or_val_never_says_test_and_keeps_other_splits():
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    from distill.data.split import assign_split

    keys = [f"ticket {i}" for i in range(400)]
    splits = [traffic.train_or_val(k, fractions, 0) for k in keys]
    assert "test" not in splits and {"train", "val"} == set(splits)
    first = [assign_split(k, fractions, 0) for k in keys]
    assert all(s == f for s, f in zip(splits, first) if f != "test")


# ---------------------------------------------------------------------------------------------------------------
# the loop end to end (tiny student, fake student runtime, fake teacher)


def test_flywheel_serve_log_redistil_compare_and_reload(served, teacher, tmp_path):
    tickets = new_tickets(60)
    test_rows = runio.read_jsonl(paths.split_path(served, "test"))
    # two more requests repeat test items (case and punctuation changed): they must stay out of train and val
    repeats = [test_rows[0]["input"].upper() + "!!", test_rows[1]["input"].lower()]
    unsure = set(tickets[::3])  # a third go to the teacher as fallbacks; shadow calls pick some of the rest
    student = FakeStudent(lambda text: (KEPT, 0.5 if text in unsure else 0.99))
    new = tmp_path / "new"
    served_ledger = paths.ledger_path(served)
    with student:
        cfg = load_serve_config([f"run_dir={served}", "serve.port=0", f"serve.student_endpoint={student.base_url}",
                                 "serve.shadow_rate=0.3", "serve.shadow_queue=64"])
        with background(cfg) as url:
            replies = [_post(url, text) for text in tickets + repeats]
            assert [r.status_code for r in replies] == [200] * 62
            _wait(lambda: len(read_traffic(cfg, served)) == 62)
            rows = read_traffic(cfg, served)
            sent = {r["input"] for r in rows if r["teacher"] is not None}
            assert {r["input"] for r in rows if r["teacher_source"] == "fallback"} == unsure
            calls_before, ledger_before = len(teacher.calls), _ledger_rows(served_ledger)

            # re-distil from the log while the gateway keeps serving
            summaries = pipeline.run(load_config(tiny_overrides(
                new, teacher.base_url, "publish.gguf_types=[q8_0]", "generate.source=traffic",
                f"generate.traffic={served}", f"eval.baseline={served / 'evaluate' / paths.RESULTS}")))
            generate = summaries["generate"]
            new_train = [r for s in ("train", "val") for r in runio.read_jsonl(paths.split_path(new, s))]
            logged_kept = {r["input"] for r in new_train if r["id"].startswith(traffic.PREFIX)}
            never_sent = logged_kept - sent
            # paid: exactly the kept logged inputs the gateway never sent to the teacher, one call each
            assert len(teacher.calls) - calls_before == len(never_sent) == generate["paid_calls_this_run"] > 0
            assert _ledger_rows(served_ledger) - ledger_before == len(never_sent) == generate["new_ledger_rows"]
            t = generate["traffic"]
            assert t["paid_calls_for_sent_inputs"] == 0 and t["answered_from_log"] == 0  # all read from the ledger
            assert t["answered_from_ledger"] == t["sent_inputs_kept"] == len(logged_kept & sent) > 0
            assert t["paid_calls_for_never_sent_inputs"] == len(never_sent)
            assert t["distinct_inputs"] == 62 and t["left_out_test_duplicates"] >= 2
            assert not paths.ledger_path(new).exists()  # one ledger: the served run's
            # the test split is the served run's, row for row; nothing of it (or its repeats) in train or val
            assert runio.read_jsonl(paths.split_path(new, "test")) == test_rows
            test_norms = {normalise(r["input"]) for r in test_rows}
            assert not {normalise(r["input"]) for r in new_train} & test_norms
            assert len(logged_kept) >= 40  # the new tickets are in training
            # compared with the served run on the same test ids, paired (McNemar), and published because not worse
            results = runio.read_json(new / "evaluate" / paths.RESULTS)
            base = runio.read_json(served / "evaluate" / paths.RESULTS)
            assert [p["id"] for p in results["per_item"]] == [p["id"] for p in base["per_item"]]
            baseline = results["gate"]["baseline"]
            assert baseline["mode"] == "paired" and baseline["n_shared"] == len(base["per_item"])
            assert results["gate"]["passed"] is True and runio.read_done(new, "publish") is not None

            # reload onto the new run with requests in flight: none fails
            student.latency_s = 0.2
            gw = url.removesuffix("/v1")
            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(_post, url, f"{text} (again)") for text in tickets[:16]]
                _wait(lambda: len(student.calls) >= 62 + 4)
                swapped = httpx.post(f"{gw}/admin/reload", json={"run_dir": str(new)}, timeout=120)
                during = [f.result() for f in futures]
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["run_dir"] == str(new)
            assert [r.status_code for r in during] == [200] * 16
            # after the swap a fallback the old gateway paid for is read from the same ledger: no new call
            _wait(lambda: len(read_traffic(cfg, served)) == 62 + 16)  # shadow calls of the requests above ended
            calls = len(teacher.calls)
            again = [_post(url, text) for text in sorted(unsure)[:5]]
            assert [(r.status_code, r.headers["x-distill-route"]) for r in again] == [(200, "teacher")] * 5
            assert len(teacher.calls) == calls
            assert _metric(url, "distill_reloads_total", result="ok") == 1

