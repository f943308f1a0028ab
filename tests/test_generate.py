"""The generate stage against a fault-injecting teacher: exact counts of paid calls, retries, rejections, budget."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import RECIPE_DIR, tiny_overrides
from distill import DistillError, paths, pipeline
from distill.__main__ import main
from distill.config import load_config
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration

CATEGORIES = ["billing", "refund_return", "shipping_delivery", "account_access", "technical_issue",
              "product_question", "cancellation", "feedback"]
PRIORITIES = ["low", "medium", "high", "urgent"]
WORDS = ("order parcel invoice refund login password screen crash charge twice card cancel plan upgrade "
         "delivery courier damaged missing broken slow app update error account locked email receipt "
         "subscription renewal discount coupon return label warehouse tracking number weekend urgent").split()


def label_of(text: str) -> dict:
    """The fake teacher's deterministic answer for a text."""
    h = sum(map(ord, text))
    return {"category": CATEGORIES[h % 8], "priority": PRIORITIES[(h // 8) % 4]}


def answer(messages: list[dict]) -> str:
    return json.dumps(label_of(messages[-1]["content"]))


def make_recipe(root: Path, n: int, *, rows: list[dict] | None = None, inputs_name: str = "inputs.jsonl",
                extra_yaml: str = "") -> Path:
    """A copy of support_tickets in ``root`` with ``n`` distinct random tickets (or the given rows)."""
    shutil.copytree(RECIPE_DIR, root / "support_tickets")
    (root / "support_tickets" / "inputs.jsonl").unlink()
    rng = random.Random(n)
    if rows is None:
        rows = [{"id": f"t{i}", "text": f"Ticket {i}: " + " ".join(rng.choice(WORDS) for _ in range(14))}
                for i in range(n)]
    if inputs_name.endswith(".jsonl"):
        (root / "support_tickets" / inputs_name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_text = (RECIPE_DIR.parent / "support_tickets.yaml").read_text()
    yaml_text = yaml_text.replace("inputs: inputs.jsonl", f"inputs: {inputs_name}") + extra_yaml
    (root / "support_tickets.yaml").write_text(yaml_text)
    return root


def overrides(tmp_path: Path, base_url: str, recipe_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(tmp_path / "run", base_url, f"recipe_dir={recipe_dir}", "generate.limit=null", *extra)


def dataset_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for s in paths.SPLITS
            for line in paths.split_path(run_dir, s).read_text().splitlines()]


def test_chaos_every_input_lands_once_and_nothing_is_paid_twice(tmp_path):
    recipe_dir = make_recipe(tmp_path / "recipes", 2000)
    faults = {"429": 0.30, "500": 0.05, "hang": 0.02, "reset": 0.01}
    # a hang outlasts the timeout; the timeout is long enough that no answered request times out on a busy machine
    with FakeTeacher(answer, faults=faults, retry_after_s=1.0, hang_s=11, seed=7) as teacher:
        cfg = load_config(overrides(tmp_path, teacher.base_url, recipe_dir, "teacher.concurrency=64",
                                    "teacher.timeout_s=10", "teacher.max_retries=14",
                                    "teacher.backoff_initial_s=0.05", "teacher.backoff_max_s=0.5"))
        summary = pipeline.run(cfg, stages=("generate",))["generate"]
        deadline = time.monotonic() + 15
        while teacher.open_connections and time.monotonic() < deadline:  # hung handlers finish their sleep
            time.sleep(0.1)
        open_left = teacher.open_connections
    run_dir = tmp_path / "run"
    rows = dataset_rows(run_dir)
    rejected = [json.loads(x) for x in (run_dir / "generate" / paths.REJECTED).read_text().splitlines()]
    landed = Counter([r["id"] for r in rows] + [r["id"] for r in rejected])
    assert len(landed) == 2000 and set(landed.values()) == {1}
    # every fault really happened, and was retried rather than lost
    assert all(teacher.events[k] > 0 for k in faults), teacher.events
    assert max(teacher.paid.values()) == 1
    assert sum(teacher.paid.values()) == len(rows) == summary["ledger"]["successful_calls"]
    assert teacher.early_retries == 0
    assert open_left == 0
    assert all(r["teacher"] == label_of(r["input"]) for r in rows)
    retried = summary["transport_errors"]
    assert retried.get("http_429", 0) == teacher.events["429"]
    assert retried.get("http_500", 0) == teacher.events["500"]


def test_kill_9_mid_run_then_rerun_pays_each_request_once(tmp_path):
    with FakeTeacher(answer, latency_s=0.03) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=240", "teacher.concurrency=4")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-m", "distill", "generate", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ledger = paths.ledger_path(tmp_path / "run")
        deadline = time.monotonic() + 120
        rows_at_kill = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists():
                try:
                    with sqlite3.connect(ledger, timeout=1) as db:
                        rows_at_kill = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
                except sqlite3.OperationalError:
                    rows_at_kill = 0
                if rows_at_kill >= 110:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and 110 <= rows_at_kill < 240
        paid_first = sum(teacher.paid.values())

        with sqlite3.connect(ledger) as db:  # no torn rows: the file is consistent and every answer parses
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            kept = db.execute("SELECT response FROM calls").fetchall()
            assert all(json.loads(r[0]) for r in kept)
        summary = pipeline.run(load_config(args), stages=("generate",))["generate"]
    unique = 240
    assert summary["cache_hits_this_run"] == len(kept)
    assert unique <= sum(teacher.paid.values()) <= unique + 4  # at most the 4 in flight at the kill paid twice
    assert paid_first - len(kept) <= 4
    assert max(teacher.paid.values()) <= 2
    assert len(dataset_rows(tmp_path / "run")) == unique


def test_malformed_answers_are_rejected_counted_and_never_kept(tmp_path):
    faults = {"invalid_json": 0.15, "schema": 0.15, "refusal": 0.15, "length": 0.15, "malformed_body": 0.1}
    with FakeTeacher(answer, faults=faults, seed=3) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=120",
                                         "generate.max_attempts=2", "teacher.backoff_initial_s=0.01"))
        summary = pipeline.run(cfg, stages=("generate",))["generate"]
    rows = dataset_rows(tmp_path / "run")
    assert rows and all(r["teacher"] == label_of(r["input"]) for r in rows)
    failures = summary["ledger"]["failures"]
    # A truncated 200 may be billed: each one is in the ledger as a possibly billed failure, and then retried.
    assert failures == {"finish_length": teacher.events["length"], "invalid_json": teacher.events["invalid_json"],
                        "refusal": teacher.events["refusal"], "schema_violation": teacher.events["schema"],
                        "malformed_response": teacher.events["malformed_body"]}
    assert summary["ledger"]["possibly_billed_failures"] == teacher.events["malformed_body"] > 0
    assert summary["transport_errors"]["malformed_response"] == teacher.events["malformed_body"]
    assert sum(summary["rejected"].values()) + len(rows) == 120
    assert set(summary["rejected"]) <= {"finish_length", "invalid_json", "refusal", "schema_violation"}


def test_budget_stops_within_one_request_and_a_higher_cap_repays_nothing(tmp_path):
    from distill.testing.fake_teacher import body_key

    # a third of the answers are invalid, so inputs take several paid attempts: each attempt must be admitted
    with FakeTeacher(answer, faults={"invalid_json": 0.35}, seed=2) as teacher:
        # $0.05 per 1k prompt tokens, about $0.03 a call: the cap admits some 30 calls, so the chance that none of
        # them draws an invalid answer is 0.65^30 (a few in a million), and the cap still stops well short of 80 inputs
        price = "teacher.price.input_per_1m=50"

        def ledger_spend() -> tuple[float, float]:
            with sqlite3.connect(paths.ledger_path(tmp_path / "run")) as db:
                ok = db.execute("SELECT COALESCE(SUM(cost_usd), 0), MAX(cost_usd) FROM calls").fetchone()
                bad = db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM failures").fetchone()[0]
            return ok[0] + bad, ok[1]

        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=80",
                                         "generate.budget_usd=1", "teacher.concurrency=8", price))
        with pytest.raises(DistillError, match="budget cap"):
            pipeline.run(cfg, stages=("generate",))
        spent, biggest = ledger_spend()
        first_calls = len(teacher.calls)
        # never above the cap; short of it by less than one request's upper bound (a token per byte vs 4 billed)
        assert 1 - biggest * 4 - 0.02 <= spent <= 1
        assert teacher.events["invalid_json"] > 0 and 20 < first_calls < 80

        with pytest.raises(DistillError, match="budget cap"):  # the same cap again: the ledger is already there
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == first_calls

        more = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=80",
                                          "generate.budget_usd=100", price))
        pipeline.run(more, stages=("generate",))
    assert len({body_key(c) for c in teacher.calls}) == len(teacher.calls)  # no request was ever sent twice
    assert max(teacher.paid.values()) == 1


def test_a_rerun_never_resends_a_rejected_answer(tmp_path):
    with FakeTeacher(answer, faults={"invalid_json": 0.5}, seed=4) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=12", "generate.max_attempts=2")
        first = pipeline.run(load_config(args), stages=("generate",))["generate"]
        sent = len(teacher.calls)
        assert first["rejected"] and len(teacher.calls) > 12
        again = pipeline.run(load_config([*args, "generate.split.train=0.6", "generate.split.val=0.2"]),
                             stages=("generate",))["generate"]
        assert len(teacher.calls) == sent and again["rejected"] == first["rejected"]
        # more attempts: only the new sample indices are paid for
        pipeline.run(load_config([*args, "generate.max_attempts=3"]), stages=("generate",))
        new = teacher.calls[sent:]
        assert new and all(c.get("seed") == 2 for c in new)


def test_secret_canary_never_reaches_files_or_logs(tmp_path, monkeypatch, capfd):
    secret = "sk-canary-" + os.urandom(12).hex()
    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    with FakeTeacher(answer, api_key="fake-the-right-key", check_key_on_models=False) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.api_key_env=DISTILL_TEST_KEY",
                              "generate.limit=4", "teacher.concurrency=1")
        code = main(["generate", *args])
        assert len(teacher.calls) == 1  # the 401 came on a chat call, echoing the key; nothing more was sent
    assert code == 2
    # What a user sees: the terminal (both file descriptors, whatever logging was set up) and the run's log file.
    out = capfd.readouterr()
    log_file = tmp_path / "run" / "distill.log"
    logged = log_file.read_text()
    assert "rejected the API key" in out.err
    assert " INFO " in out.err and " INFO " in logged  # the run did log: the check below reads real output
    for text in (out.out, out.err, logged):
        assert secret not in text and secret[:16] not in text
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert log_file in files and tmp_path / "run" / paths.CONFIG_YAML in files
    for file in files:
        assert secret.encode() not in file.read_bytes(), file


def test_transport_rules(tmp_path, monkeypatch):
    # 400: that request fails at once (no retry), the input is rejected with the reason, the run goes on.
    with FakeTeacher(answer, status=400) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "a", teacher.base_url, "generate.limit=3"))
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 3
    # 404: the model is not served; the run ends with one clear line naming the model.
    with FakeTeacher(answer, status=404) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "b", teacher.base_url, "generate.limit=3",
                                         "teacher.concurrency=1"))
        with pytest.raises(DistillError, match="does not serve the model 'fake-teacher'"):
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 1
    # A Retry-After beyond teacher.max_wait_s fails explicitly instead of sleeping.
    with FakeTeacher(answer, faults={"429": 1.0}, retry_after_s=3600) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "c", teacher.base_url, "generate.limit=2",
                                         "teacher.max_wait_s=60"))
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 2
    rejected = (tmp_path / "c" / "generate" / paths.REJECTED).read_text()
    assert rejected.count("retry_after_too_long") == 2
    # retry-after-ms is honoured (and preferred over Retry-After): no request comes back early, and no wait was
    # the 5 s of Retry-After (the waits asked for are recorded, so a slow machine cannot break this).
    import asyncio

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay, *args, **kwargs):
        waits.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    with FakeTeacher(answer, faults={"429": 0.5}, retry_after_s=5, retry_after_ms=300, seed=1) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "d", teacher.base_url, "generate.limit=10",
                                         "teacher.max_retries=20", "teacher.backoff_initial_s=0.01"))
        pipeline.run(cfg, stages=("generate",))
        assert teacher.events["429"] > 0 and teacher.early_retries == 0
    retry_waits = [w for w in waits if w >= 0.29]
    assert len(retry_waits) >= teacher.events["429"] and max(retry_waits) < 1.0, waits


def _batch_args(tmp_path: Path, url: str, *extra: str) -> list[str]:
    return tiny_overrides(tmp_path / "run", url, "generate.limit=60", "generate.mode=batch",
                          "generate.batch.poll_interval_s=0.1", "teacher.backoff_initial_s=0.01", *extra)


def _generate_until_a_batch_is_created(args: list[str], teacher: FakeTeacher) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "generate", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while teacher.batch_creations == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc


def test_batch_kill_between_submit_and_poll_creates_one_batch(tmp_path):
    with FakeTeacher(answer, batch_hold=True) as teacher:
        args = _batch_args(tmp_path, teacher.base_url)
        proc = _generate_until_a_batch_is_created(args, teacher)
        deadline = time.monotonic() + 120  # it recorded the batch id before its first poll: kill it while polling
        while not teacher.batch_polls["batch_1"] and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert teacher.batch_polls["batch_1"] and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert teacher.batch_creations == 1 and proc.returncode == -signal.SIGKILL
        teacher.batch_release.set()
        summary = pipeline.run(load_config(args), stages=("generate",))["generate"]
    assert teacher.batch_creations == 1 and summary["batches_created_this_run"] == 0
    rows = dataset_rows(tmp_path / "run")
    assert len(rows) == 60 and sum(r["teacher"] != label_of(r["input"]) for r in rows) == 0
    assert max(teacher.paid.values()) == 1 and len(teacher.paid) == 60
    assert len(teacher.calls) == 0  # nothing went through the online endpoint


def test_batch_requeues_errored_lines_and_prices_at_the_batch_discount(tmp_path):
    with FakeTeacher(answer, batch_error_rate=0.25, seed=11) as teacher:
        summary = pipeline.run(load_config(_batch_args(tmp_path, teacher.base_url,
                                                       "teacher.price.input_per_1m=1")), stages=("generate",))["generate"]
    assert teacher.batch_creations == summary["batches_created_this_run"] >= 2
    submissions = [b["metadata"]["distill_submission"] for b in teacher.batches.values()]
    assert len(set(submissions)) == len(submissions)  # no submission was created twice
    rows = dataset_rows(tmp_path / "run")
    assert len(rows) == 60 and all(r["teacher"] == label_of(r["input"]) for r in rows)
    with sqlite3.connect(paths.ledger_path(tmp_path / "run")) as db:
        paid, prompt, completion = db.execute(
            "SELECT SUM(cost_usd), SUM(prompt_tokens), SUM(completion_tokens) FROM calls").fetchone()
    assert paid == pytest.approx((prompt * 1.0 + completion * 0.60) / 1e6 * 0.5)  # openai.yaml output price


def test_synthesize_writes_over_the_grid_then_labels_in_separate_calls(tmp_path):
    def teacher_fn(messages: list[dict]) -> str:
        if "realistic customer-support tickets" in messages[0]["content"]:
            attrs = messages[-1]["content"].splitlines()[0].split(": ", 1)[1]
            return f"As a customer ({attrs}) I need help with my last order, please."
        return answer(messages)

    with FakeTeacher(teacher_fn) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "generate.source=synthesize",
                              "generate.limit=12", "generate.dedup.enabled=false")
        summary = pipeline.run(load_config(args), stages=("generate",))["generate"]
        writes = [c for c in teacher.calls if "realistic customer-support" in c["messages"][0]["content"]]
        labels = [c for c in teacher.calls if c not in writes]
        assert len(writes) == 12 and len(labels) == 12
        assert all("response_format" not in c for c in writes) and all("response_format" in c for c in labels)
        assert summary["synthesis"]["written"] == 12 and summary["labelled"] == 12
        assert len({c["messages"][-1]["content"].splitlines()[0] for c in writes}) == 12  # 12 distinct cells
        # a rerun (new fingerprint: another split) writes and labels nothing again
        before = len(teacher.calls)
        pipeline.run(load_config([*args, "generate.split.train=0.6", "generate.split.val=0.2"]),
                     stages=("generate",))
        assert len(teacher.calls) == before


def test_trusted_labels_and_input_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "text": f"Ticket number {i}: " + " ".join(random.Random(i).choice(WORDS)
                                                                     for _ in range(12))} for i in range(10)]
    for r in rows[:4]:
        r["label"] = json.dumps({"category": "feedback", "priority": "low"})
    recipes = make_recipe(tmp_path / "recipes", 0, rows=rows, inputs_name="inputs.parquet",
                          extra_yaml="label_field: label\n")
    pq.write_table(pa.Table.from_pylist(rows), recipes / "support_tickets" / "inputs.parquet")
    with FakeTeacher(answer) as teacher:
        summary = pipeline.run(load_config(overrides(tmp_path, teacher.base_url, recipes)),
                               stages=("generate",))["generate"]
        assert len(teacher.calls) == 6 and summary["trusted_labels"] == 4
    got = {r["id"]: r for r in dataset_rows(tmp_path / "run")}
    assert all(got[f"r{i}"]["teacher"] == {"category": "feedback", "priority": "low"} for i in range(4))
    assert all(got[f"r{i}"]["provenance"]["method"] == "trusted" for i in range(4))

    # CSV and a datasets folder give the same inputs
    import csv

    from datasets import Dataset

    from distill.task import iter_records

    with (tmp_path / "in.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows({"label": "", **r} for r in rows)
    Dataset.from_list([{"label": None, **r} for r in rows]).save_to_disk(str(tmp_path / "ds"))
    for source in (tmp_path / "in.csv", tmp_path / "ds"):
        texts = [rec["text"] for _, rec, _ in iter_records(source)]
        assert texts == [r["text"] for r in rows]


def test_pii_is_redacted_before_the_teacher_sees_it_and_duplicates_are_not_paid(tmp_path):
    base = "My parcel never arrived and the tracking page shows no update since last week at all"
    rows = [{"id": "a", "text": base + ". Mail me at jane.doe@example.com or call +1 415 555 0134."},
            {"id": "b", "text": base + "!"},                                    # near-duplicate of a
            {"id": "c", "text": base.upper()},                                  # exact duplicate (normalised)
            {"id": "d", "text": "I was charged with card 4111 1111 1111 1111 twice for one invoice."},
            {"id": "e", "text": "How do I export my invoices as PDF files from the dashboard?"}]
    recipes = make_recipe(tmp_path / "recipes", 0, rows=rows)
    with FakeTeacher(answer) as teacher:
        summary = pipeline.run(load_config(overrides(tmp_path, teacher.base_url, recipes, "generate.redact_pii=true",
                                                     "generate.dedup.threshold=0.7")),
                               stages=("generate",))["generate"]
        sent = json.dumps(teacher.calls)
    assert "jane.doe@example.com" not in sent and "4111" not in sent and "555 0134" not in sent
    assert summary["qa"]["pii_redacted"] == {"email": 1, "phone": 1, "card": 1}
    assert len(teacher.calls) == 3 and summary["qa"]["exact_duplicates"] == 1
    assert summary["qa"]["near_duplicates"] == 1
    kept = dataset_rows(tmp_path / "run")
    assert sorted(r["id"] for r in kept) == ["a", "d", "e"] and "[EMAIL]" in next(
        r["input"] for r in kept if r["id"] == "a")


def test_near_duplicates_never_straddle_splits_when_kept(tmp_path):
    from distill.data.dedup import duplicate_groups

    rng = random.Random(0)
    texts = []
    for g in range(40):
        words = [rng.choice(WORDS) for _ in range(16)]
        texts += [" ".join(words), " ".join(words) + " thanks", " ".join(words[:-1]) + " please"]
    rows = [{"id": f"x{i}", "text": t} for i, t in enumerate(texts)]
    recipes = make_recipe(tmp_path / "recipes", 0, rows=rows)
    with FakeTeacher(answer) as teacher:
        pipeline.run(load_config(overrides(tmp_path, teacher.base_url, recipes, "generate.dedup.enabled=false",
                                           "generate.dedup.threshold=0.6")), stages=("generate",))
    split_of = {r["input"]: r["split"] for r in dataset_rows(tmp_path / "run")}
    groups = duplicate_groups(texts, 0.6, 128)
    by_group: dict[int, set] = {}
    for t, g in zip(texts, groups):
        by_group.setdefault(g, set()).add(split_of[t])
    assert len(by_group) <= 45 and all(len(s) == 1 for s in by_group.values())
    assert len({s for v in by_group.values() for s in v}) == 3  # all three splits are used


def test_self_consistency_keeps_the_majority_and_drops_low_vote_share(tmp_path):
    flips: Counter = Counter()

    def noisy(messages: list[dict]) -> str:
        text = messages[-1]["content"]
        flips[text] += 1
        label = label_of(text)
        if text.endswith("7") and flips[text] % 2 == 0:  # these inputs disagree with themselves
            label = {"category": "feedback", "priority": "low"}
        return json.dumps(label)

    rows = [{"id": f"s{i}", "text": f"Case {i}: " + " ".join(random.Random(i).choice(WORDS) for _ in range(10))
             + f" ref {i}"} for i in range(20)]
    recipes = make_recipe(tmp_path / "recipes", 0, rows=rows)
    with FakeTeacher(noisy) as teacher:
        summary = pipeline.run(load_config(overrides(tmp_path, teacher.base_url, recipes,
                                                     "generate.self_consistency=4",
                                                     "generate.min_vote_share=0.75")), stages=("generate",))["generate"]
        assert len(teacher.calls) == 80 and len({json.dumps(c, sort_keys=True) for c in teacher.calls}) == 80
    kept = dataset_rows(tmp_path / "run")
    assert summary["rejected"] == {"low_vote_share": 2}  # inputs 7 and 17 split 2:2
    assert len(kept) == 18 and all(r["provenance"]["confidence"]["vote_share"] == 1.0 for r in kept)


def test_nearest_few_shot_picks_similar_seeds(tmp_path):
    from distill.task import Task

    rows = [{"id": "n1", "text": "I was billed twice on my credit card for the same invoice this month."},
            {"id": "n2", "text": "I cannot log in: the password reset email never arrives and my account is locked."}]
    recipes = make_recipe(tmp_path / "recipes", 0, rows=rows)
    with FakeTeacher(answer) as teacher:
        cfg = load_config(overrides(tmp_path, teacher.base_url, recipes, "generate.few_shot=nearest",
                                    "generate.few_shot_k=2"))
        pipeline.run(cfg, stages=("generate",))
        shots = {c["messages"][-1]["content"]: [m["content"] for m in c["messages"][1:-1:2]] for c in teacher.calls}
    few = dict(Task(cfg).few_shot)
    assert len(shots[rows[0]["text"]]) == 2
    assert few[shots[rows[0]["text"]][-1]]["category"] == "billing"
    assert few[shots[rows[1]["text"]][-1]]["category"] == "account_access"


def test_requests_per_minute_limit_spaces_calls(tmp_path):
    with FakeTeacher(answer) as teacher:
        pipeline.run(load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=6",
                                                "teacher.rpm=120")), stages=("generate",))
    # 120/min: a bucket of 2 per second, so the 6 requests reach the server over about 2 seconds (unlimited: 0.01 s);
    # the bound leaves room for a first request slowed by opening its connection on a busy machine
    assert len(teacher.arrivals) == 6 and teacher.arrivals[-1] - teacher.arrivals[0] >= 1.5


def test_tokens_per_minute_limit_holds_requests_back(tmp_path):
    import asyncio

    from distill.ledger import Ledger
    from distill.task import Task
    from distill.teacher.client import TeacherClient

    with FakeTeacher(answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.tpm=1200",
                                         "teacher.max_tokens=12", "teacher.concurrency=8"))
        body = {"model": "fake-teacher", "max_tokens": 12, "messages": [{"role": "user", "content": "x" * 32}]}

        async def go():  # 20 estimated tokens per request: 60 fit the minute's bucket, then 1 per second
            client = TeacherClient(cfg.teacher, teacher.base_url, Task(cfg).schema, Ledger(tmp_path / "l.sqlite"))
            try:
                started = time.monotonic()
                await asyncio.gather(*(client._send(body) for _ in range(63)))
                return time.monotonic() - started
            finally:
                await client.close()

        elapsed = asyncio.run(go())
    assert len(teacher.calls) == 63 and elapsed >= 2.5  # 3 requests over the bucket: about a second each


def test_408_409_are_retried_403_ends_the_run_and_an_http_date_retry_after_is_honoured(tmp_path):
    with FakeTeacher(answer, faults={"408": 0.3, "409": 0.3}, seed=9) as teacher:
        summary = pipeline.run(load_config(tiny_overrides(tmp_path / "a", teacher.base_url, "generate.limit=10",
                                                          "teacher.max_retries=20",
                                                          "teacher.backoff_initial_s=0.01")),
                               stages=("generate",))["generate"]
        assert summary["labelled"] == 10 and teacher.events["408"] and teacher.events["409"]
        assert summary["transport_errors"] == {"http_408": teacher.events["408"], "http_409": teacher.events["409"]}
    with FakeTeacher(answer, status=403) as teacher:
        with pytest.raises(DistillError, match=r"refused access \(HTTP 403\)"):
            pipeline.run(load_config(tiny_overrides(tmp_path / "b", teacher.base_url, "generate.limit=5",
                                                    "teacher.concurrency=1")), stages=("generate",))
        assert len(teacher.calls) == 1
    with FakeTeacher(answer, faults={"429": 0.5}, retry_after_s=1.2, retry_after_date=True, seed=5) as teacher:
        pipeline.run(load_config(tiny_overrides(tmp_path / "c", teacher.base_url, "generate.limit=6",
                                                "teacher.max_retries=20", "teacher.backoff_initial_s=0.01")),
                     stages=("generate",))
        assert teacher.events["429"] and teacher.early_retries == 0


def test_batch_kill_before_the_create_answer_arrives_still_creates_one_batch(tmp_path):
    with FakeTeacher(answer, batch_hold_create=True) as teacher:
        # the dead process's claim on the upload lapses after the lease; then the rerun looks for the batch
        args = _batch_args(tmp_path, teacher.base_url, "teacher.claim_lease_s=2")
        proc = _generate_until_a_batch_is_created(args, teacher)
        proc.send_signal(signal.SIGKILL)  # the batch exists on the server; the client never saw its id
        proc.wait()
        teacher.batch_create_release.set()
        with sqlite3.connect(paths.ledger_path(tmp_path / "run")) as db:
            assert db.execute("SELECT batch_id, status FROM batches").fetchall() == [(None, "uploaded")]
        summary = pipeline.run(load_config(args), stages=("generate",))["generate"]
    assert teacher.batch_creations == 1 and summary["batches_created_this_run"] == 0
    rows = dataset_rows(tmp_path / "run")
    assert len(rows) == 60 and all(r["teacher"] == label_of(r["input"]) for r in rows)


def test_an_expired_batch_sends_its_missing_lines_again(tmp_path):
    with FakeTeacher(answer, batch_expire_first=True) as teacher:
        summary = pipeline.run(load_config(_batch_args(tmp_path, teacher.base_url)), stages=("generate",))["generate"]
    assert teacher.batches["batch_1"]["status"] == "expired" and teacher.batch_creations == 2
    assert teacher.batches["batch_2"]["request_counts"]["total"] == 30  # only the half that never ran
    assert summary["labelled"] == 60 and max(teacher.paid.values()) == 1


@pytest.mark.parametrize("end", ["failed", "cancelled"])
def test_a_failed_or_cancelled_batch_loses_no_paid_answer_and_sends_the_rest_again(tmp_path, caplog, end):
    with FakeTeacher(answer, batch_end={"batch_1": end}) as teacher:
        with caplog.at_level("INFO", logger="distill"):
            summary = pipeline.run(load_config(_batch_args(tmp_path, teacher.base_url)),
                                   stages=("generate",))["generate"]
    first, second = teacher.batches["batch_1"], teacher.batches["batch_2"]
    assert first["status"] == end and teacher.batch_creations == summary["batches_created_this_run"] == 2
    ran_first = 0 if end == "failed" else 30  # a failed batch runs nothing; the cancelled one ran its first half
    assert first["request_counts"]["completed"] == ran_first
    assert second["request_counts"]["total"] == 60 - ran_first  # only what the first did not answer
    assert any(f"batch batch_1 {end}" in r.getMessage() for r in caplog.records)
    assert summary["labelled"] == 60 and len(teacher.paid) == 60 and max(teacher.paid.values()) == 1
    with sqlite3.connect(paths.ledger_path(tmp_path / "run")) as db:
        assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 60
    assert len(teacher.calls) == 0  # nothing went through the online endpoint


def test_a_batch_that_always_fails_ends_the_run_after_its_rounds(tmp_path):
    with FakeTeacher(answer, batch_end={f"batch_{i}": "failed" for i in range(1, 50)}) as teacher:
        cfg = load_config(_batch_args(tmp_path, teacher.base_url, "generate.batch.max_rounds=2"))
        with pytest.raises(DistillError, match="no valid answer") as err:
            pipeline.run(cfg, stages=("generate",))
    assert teacher.batch_creations == 2 + cfg.generate.max_attempts, err.value
    assert all(b["status"] == "failed" for b in teacher.batches.values()) and not teacher.paid
    rejected = (tmp_path / "run" / "generate" / paths.REJECTED).read_text().splitlines()
    assert len(rejected) == 60 and all("batch_unfinished" in line for line in rejected)
