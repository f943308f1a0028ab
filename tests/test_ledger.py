"""The ledger's promise across processes, failures and bad input: never pay twice, never lose a paid answer.

Each test counts what the fake teacher made and billed and compares it with what the ledger holds.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from distill import DistillError, paths, pipeline
from distill.config import load_config
from distill.ledger import Ledger, request_key
from distill.task import OutputSchema
from distill.testing.fake_teacher import FakeTeacher
from test_generate import answer, dataset_rows, label_of, make_recipe

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PRICE_IN, PRICE_OUT = 100.0, 0.60  # $ per 1M tokens: input priced up so a few calls reach a small cap


def _billed_usd(teacher: FakeTeacher) -> float:
    return (teacher.billed_tokens[0] * PRICE_IN + teacher.billed_tokens[1] * PRICE_OUT) / 1e6


def _ledger_rows(path: Path, table: str = "calls") -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "distill", "generate", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _two_at_once(tmp_path: Path, base_url: str, recipe_dir: Path, *extra: str) -> list[tuple[int, str]]:
    """Two `python -m distill generate` processes on one shared ledger, started together; (exit code, stderr)."""
    shared = tmp_path / "shared.sqlite"
    procs = [_spawn(tiny_overrides(tmp_path / f"run{i}", base_url, f"recipe_dir={recipe_dir}",
                                   "generate.limit=null", f"generate.shared_ledger={shared}", *extra))
             for i in range(2)]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def test_two_processes_on_one_shared_ledger_pay_each_key_once(tmp_path):
    recipe_dir = make_recipe(tmp_path / "recipes", 60)
    with FakeTeacher(answer, latency_s=0.25) as teacher:
        results = _two_at_once(tmp_path, teacher.base_url, recipe_dir, "teacher.concurrency=4")
    assert [code for code, _ in results] == [0, 0], "\n".join(err for _, err in results)
    assert len(teacher.paid) == 60 and max(teacher.paid.values()) == 1  # 60 keys, 60 paid answers
    with Ledger(tmp_path / "shared.sqlite") as ledger:
        summary = ledger.summary()
        with_tokens = ledger.db.execute("SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM calls").fetchone()
    assert summary["successful_calls"] == 60
    assert list(with_tokens) == teacher.billed_tokens  # the ledger records exactly what was billed
    for i in range(2):
        rows = dataset_rows(tmp_path / f"run{i}")
        assert len(rows) == 60 and all(r["teacher"] == label_of(r["input"]) for r in rows)
    paid_by_run = [json.loads((tmp_path / f"run{i}" / "generate" / paths.DONE).read_text())["summary"]
                   ["paid_calls_this_run"] for i in range(2)]
    assert sum(paid_by_run) == 60


def test_two_processes_sharing_a_ledger_hold_one_budget_cap(tmp_path):
    recipe_dir = make_recipe(tmp_path / "recipes", 60)
    with FakeTeacher(answer, latency_s=0.1) as teacher:
        results = _two_at_once(tmp_path, teacher.base_url, recipe_dir, "teacher.concurrency=4",
                               "generate.budget_usd=1", f"teacher.price.input_per_1m={PRICE_IN}")
    assert all(code == 2 and "budget cap" in err for code, err in results), results
    billed = _billed_usd(teacher)
    assert 0.5 < billed <= 1.0  # one cap over both processes, not one each
    with sqlite3.connect(tmp_path / "shared.sqlite") as db:
        recorded = db.execute("SELECT SUM(cost_usd) FROM calls").fetchone()[0]
    assert recorded == pytest.approx(billed)  # and the ledger records every dollar billed
    assert max(teacher.paid.values()) == 1


def test_two_batch_runs_started_together_create_one_batch_and_join_it_once(tmp_path):
    recipe_dir = make_recipe(tmp_path / "recipes", 40)
    with FakeTeacher(answer) as teacher:
        results = _two_at_once(tmp_path, teacher.base_url, recipe_dir, "generate.mode=batch",
                               "generate.batch.poll_interval_s=0.1", "teacher.backoff_initial_s=0.01")
    assert [code for code, _ in results] == [0, 0], "\n".join(err for _, err in results)
    assert teacher.batch_creations == 1
    assert len(teacher.paid) == 40 and max(teacher.paid.values()) == 1
    with Ledger(tmp_path / "shared.sqlite") as ledger:
        assert ledger.count() == 40 and ledger.summary()["failures"] == {}
        assert ledger.db.execute("SELECT status, COUNT(*) FROM batches GROUP BY status").fetchall() == [("done", 1)]
    for i in range(2):
        assert len(dataset_rows(tmp_path / f"run{i}")) == 40


def test_list_of_parts_content_is_read_and_an_answer_that_cannot_be_read_is_never_bought_again(tmp_path,
                                                                                             monkeypatch):
    with FakeTeacher(answer, content_parts=True) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=12"))
        real_parse = OutputSchema.parse

        def broken(self, text):
            raise ValueError("a parser bug")

        monkeypatch.setattr(OutputSchema, "parse", broken)
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
        ledger = paths.ledger_path(tmp_path / "run")
        assert _ledger_rows(ledger, "responses") == 12 and len(teacher.calls) == 12  # paid, kept raw

        monkeypatch.setattr(OutputSchema, "parse", real_parse)
        summary = pipeline.run(cfg, stages=("generate",))["generate"]
    assert len(teacher.calls) == 12 and summary["paid_calls_this_run"] == 0  # read again, not bought again
    assert summary["labelled"] == 12 and _ledger_rows(ledger, "responses") == 0
    assert all(r["teacher"] == label_of(r["input"]) for r in dataset_rows(tmp_path / "run"))
    with Ledger(ledger) as led:
        assert led.spent() == pytest.approx(led.db.execute("SELECT SUM(cost_usd) FROM calls").fetchone()[0])


def test_a_full_disk_stops_the_run_at_the_first_failed_write_and_the_rerun_pays_only_the_rest(tmp_path,
                                                                                            monkeypatch):
    real_init = Ledger.__init__

    def small_disk(self, path):
        real_init(self, path)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages + 3}")  # SQLITE_FULL a few rows from now

    with FakeTeacher(answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=40",
                                         "teacher.concurrency=1"))
        monkeypatch.setattr(Ledger, "__init__", small_disk)
        with pytest.raises(DistillError, match="cannot write the teacher ledger .*full"):
            pipeline.run(cfg, stages=("generate",))
        kept = _ledger_rows(paths.ledger_path(tmp_path / "run"))
        paid_first = sum(teacher.paid.values())
        assert 0 < kept < 40 and paid_first - kept <= 1  # it stopped at the first answer it could not record

        monkeypatch.setattr(Ledger, "__init__", real_init)
        pipeline.run(cfg, stages=("generate",))
    assert sum(teacher.paid.values()) - paid_first == 40 - kept
    assert len(dataset_rows(tmp_path / "run")) == 40


def test_billed_timeouts_are_charged_and_capped_per_key_across_runs(tmp_path):
    with FakeTeacher(answer, faults={"billed_hang": 1.0}, hang_s=1.5) as teacher:
        cfg = load_config(tiny_overrides(
            tmp_path / "run", teacher.base_url, "generate.limit=4", "teacher.timeout_s=0.4",
            "teacher.max_retries=5", "teacher.max_billed_attempts=2", "teacher.backoff_initial_s=0.01",
            f"teacher.price.input_per_1m={PRICE_IN}"))
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
        first = len(teacher.calls)
        with Ledger(paths.ledger_path(tmp_path / "run")) as ledger:
            summary = ledger.summary()
        assert first == 8 and summary["possibly_billed_failures"] == 8  # 2 per key, not 6
        assert summary["cost_usd"] == pytest.approx(summary["possibly_billed_usd"]) and summary["cost_usd"] > 0
        assert summary["cost_usd"] >= _billed_usd(teacher)  # charged at least what the server billed
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
    assert len(teacher.calls) == first  # the cap per key holds across runs
    rejected = [json.loads(x) for x in (tmp_path / "run" / "generate" / paths.REJECTED).read_text().splitlines()]
    assert {r["reason"] for r in rejected} == {"max_billed_attempts"}


def test_cjk_inputs_billed_a_token_per_character_never_exceed_the_cap(tmp_path):
    import random

    rng = random.Random(5)
    rows = [{"id": f"c{i}", "text": "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(300))}
            for i in range(60)]
    recipe_dir = make_recipe(tmp_path / "recipes", 60, rows=rows)
    with FakeTeacher(answer, tokens_per_char=True) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, f"recipe_dir={recipe_dir}",
                                         "generate.limit=null", "generate.budget_usd=0.5", "teacher.concurrency=8",
                                         f"teacher.price.input_per_1m={PRICE_IN}"))
        with pytest.raises(DistillError, match="budget cap"):
            pipeline.run(cfg, stages=("generate",))
    assert 0 < _billed_usd(teacher) <= 0.5
    assert len(teacher.calls) < 60


def test_a_batch_the_api_no_longer_knows_is_marked_lost_and_its_lines_are_sent_again(tmp_path):
    from test_generate import _batch_args, _generate_until_a_batch_is_created

    with FakeTeacher(answer, batch_hold=True) as teacher:
        args = _batch_args(tmp_path, teacher.base_url)
        proc = _generate_until_a_batch_is_created(args, teacher)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the ledger recorded the batch id, then kill
            with sqlite3.connect(paths.ledger_path(tmp_path / "run"), timeout=5) as db:
                if db.execute("SELECT batch_id FROM batches WHERE batch_id IS NOT NULL").fetchone():
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        teacher.batches.clear()  # the provider forgot it: retrieve answers 404
        teacher.batch_release.set()
        summary = pipeline.run(load_config(args), stages=("generate",))["generate"]
    assert summary["labelled"] == 60 and teacher.batch_creations == 2
    with Ledger(paths.ledger_path(tmp_path / "run")) as ledger:
        statuses = sorted(r[0] for r in ledger.db.execute("SELECT status FROM batches"))
        ids = ledger.db.execute("SELECT COUNT(*) FROM batch_ids").fetchone()[0]
    assert statuses == ["done", "lost"] and ids == 2  # every batch id ever created is kept


def test_reservations_of_another_process_and_of_open_batches_count_against_the_cap(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as a, Ledger(tmp_path / "l.sqlite") as b:
        assert a.claim("k1", "A", 0.6, cap=1.0, lease_s=30).status == "claimed"
        assert b.claim("k1", "B", 0.6, cap=1.0, lease_s=30).status == "busy"  # A holds it
        assert b.claim("k2", "B", 0.6, cap=1.0, lease_s=30).status == "wait"  # A's reservation fills the cap
        a.record_success("k1", "m", {}, "{}", cost_usd=0.1, owner="A")
        assert b.claim("k1", "B", 0.6, cap=1.0, lease_s=30).status == "hit"
        assert b.claim("k2", "B", 0.6, cap=1.0, lease_s=30).status == "claimed"
        b.release("k2", "B")
        # an open batch (another run's, joined later) reserves its lines too
        sub, keys, over, mine = a.claim_batch_round("A", [("k3", {}, 0.5), ("k4", {}, 0.5)], cap=1.0, lease_s=30)
        assert keys == ["k3"] and over == ["k4"] and mine
        assert b.claim("k5", "B", 0.5, cap=1.0, lease_s=30).status == "wait"
        # a dead owner's claim lapses and is taken over
        assert a.claim("k6", "A", 0.0, cap=None, lease_s=0.05).status == "claimed"
        time.sleep(0.1)
        assert b.claim("k6", "B", 0.0, cap=None, lease_s=30).status == "claimed"


def test_a_request_key_covers_what_changes_the_answer_and_nothing_else(tmp_path):
    from distill.config import TeacherConfig
    from distill.teacher.request import build_chat_request

    schema = OutputSchema({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "y"]}},
                           "required": ["a"]})
    other_schema = OutputSchema({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "z"]}},
                                 "required": ["a"]})
    messages = [{"role": "user", "content": "hello"}]
    gguf_a, gguf_b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    gguf_a.write_bytes(b"model a")
    gguf_b.write_bytes(b"model b")

    def key(schema=schema, structured=True, **teacher) -> str:
        base = {"kind": "llama_cpp", "model": "teacher", "structured_output": "llama_cpp",
                "model_path": str(gguf_a)}
        tcfg = TeacherConfig(**{**base, **teacher})
        return request_key(build_chat_request(tcfg, schema, messages, 0, None, structured=structured))

    # a local teacher: its model file and context size change the answer (it has no base_url: distill starts it on
    # a loopback port of its choosing, which is not part of the key)
    assert key() != key(model_path=str(gguf_b))
    assert key() != key(n_ctx=512)
    # a remote teacher: another provider serving the same model name is another teacher
    remote = {"kind": "openai", "structured_output": "json_schema", "model_path": None}
    assert key(**remote, base_url="https://one.example/v1") != key(**remote, base_url="https://two.example/v1")
    assert key(**remote, base_url="https://one.example/v1") == key(**remote, base_url="https://one.example/v1/")
    # credentials in a URL never reach the key (nor the request the ledger stores)
    assert key(**remote, base_url="https://one.example/v1") == key(**remote, base_url="https://u:pw@ONE.example/v1")
    # the schema is part of a structured request's key, and not of a free-text one (it is not sent)
    assert key() != key(schema=other_schema)
    assert key(structured=False) == key(schema=other_schema, structured=False)


def test_a_read_only_ledger_reads_usage_and_calls_and_refuses_every_write(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_success("k1", "m", {}, "{}", prompt_tokens=120, cached_tokens=20, completion_tokens=7,
                              cost_usd=0.25, latency_s=0.5)
        ledger.record_success("k2", "m", {}, "{}", prompt_tokens=80, completion_tokens=3, cost_usd=0.125)
        ledger.record_failure("k3", "timeout", cost_usd=0.5, billed=True)
    before = path.read_bytes()
    with Ledger.read_only(path) as ledger:
        assert ledger.usage(["k2", "k1", "k1", "missing"]) == {"k1": (120, 20, 7, 0.5), "k2": (80, 0, 3, 0.0)}
        assert [(c["prompt_tokens"], c["cost_usd"]) for c in ledger.calls()] == [(120, 0.25), (80, 0.125)]
        assert ledger.summary()["cost_usd"] == 0.875 and ledger.summary()["possibly_billed_failures"] == 1
        with pytest.raises(DistillError, match="cannot write the teacher ledger"):
            ledger.record_success("k4", "m", {}, "{}", cost_usd=1.0)
    assert path.read_bytes() == before
    with pytest.raises(DistillError, match="no teacher ledger at"):
        Ledger.read_only(tmp_path / "absent.sqlite")


def test_the_dry_run_forecast_and_the_cap_bound_use_one_price_formula(tmp_path):
    from distill.teacher import pricing

    cfg = load_config(["teacher=openai", "teacher.model=m", "teacher.base_url=http://127.0.0.1:9/v1",
                       "teacher.max_tokens=100", "teacher.price.input_per_1m=2.0", "teacher.price.output_per_1m=8.0",
                       "teacher.price.cached_input_per_1m=0.5", f"run_dir={tmp_path / 'run'}"])
    price = cfg.teacher.price
    # 1,000 prompt tokens (200 cached) and 50 completion tokens: 800 x $2 + 200 x $0.5 + 50 x $8 per 1M
    assert pricing.usd(price, 1000, 200, 50) == pytest.approx(2100 / 1e6)
    assert pricing.usd(price, 1000, 200, 50, batch=True) == pytest.approx(2100 / 1e6 * price.batch_discount)
    english = [{"role": "user", "content": "a" * 400}]
    cjk = [{"role": "user", "content": "字" * 400}]
    assert pricing.forecast_tokens(english) == 100 == pricing.forecast_tokens(cjk)  # 4 characters a token
    assert pricing.prompt_token_bound(english) == 400 + 2 * pricing.TEMPLATE_TOKENS_PER_MESSAGE
    assert pricing.prompt_token_bound(cjk) == 1200 + 2 * pricing.TEMPLATE_TOKENS_PER_MESSAGE  # 3 bytes each
    with Ledger(tmp_path / "l.sqlite") as ledger:
        requests = [{"messages": english}, {"messages": cjk, "max_tokens": 20}]
        ledger.record_success(request_key(requests[0]), "m", requests[0], "{}")
        got = pricing.estimate(price, requests, cfg.teacher.max_tokens, votes=3, ledger=ledger)
    assert got["requests"] == 3 and got["already_paid"] == 1  # only the CJK request is left: 3 votes of it
    assert got["usd"] == round(pricing.usd(price, 100, 0, 10) * 3, 4)  # half of its 20 completion tokens
    assert got["upper_bound_usd"] == round(pricing.usd(price, 1216, 0, 20) * 3, 4)
