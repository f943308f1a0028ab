"""distill serve over loopback: the official openai client against the gateway, a fake teacher counting its calls,
a fake student answering with chosen confidences, and the real student runtime on the tiny published GGUF.

One tiny pipeline (generate -> train -> evaluate -> publish) runs once for the module, with the fake teacher kept
alive for all tests so its base URL, and so every ledger key, stays the one generate used.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import REPO, tiny_overrides

from distill import DistillError, paths, pipeline, runio
from distill.config import load_config
from distill.routing import RouteSpec, load_rule
from distill.serve.command import background, load_serve_config
from distill.serve.student import Breaker
from distill.testing.fake_student import FakeStudent
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration

TASK = "support_tickets"
NEW_TICKET = "The invoice for March shows two charges of $49 for one seat; please explain or refund one."
CONFIDENT = {"category": "billing", "priority": "high"}


@pytest.fixture(scope="module")
def teacher(fake_answer):
    """The fake teacher generate labelled with, alive for every test (its URL is part of every ledger key)."""
    with FakeTeacher(fake_answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def published(teacher, tmp_path_factory):
    """A tiny published run: q8_0 (what serve picks) and f32 GGUFs, routing.yaml (route disabled: 4 val items)."""
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config(tiny_overrides(run_dir, teacher.base_url, "publish.force=true",
                                     "publish.gguf_types=[q8_0,f32]"))
    pipeline.run(cfg)
    return run_dir


def _copy(published, tmp_path, *, threshold: float | None = None) -> Path:
    """A copy of the run (its own ledger); ``threshold`` enables the route at that confidence."""
    run_dir = tmp_path / "run"
    shutil.copytree(published, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    if threshold is not None:
        path = paths.stage_dir(run_dir, "publish") / paths.ROUTING
        rule = load_rule(path)
        rule.route = RouteSpec(enabled=True, confidence_threshold=threshold, target_agreement=0.98,
                               expected_coverage=0.5, expected_agreement=0.98, reason="forced by the test")
        path.write_text(yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))
    return run_dir


def _cfg(run_dir: Path, *extra: str):
    return load_serve_config([f"run_dir={run_dir}", "serve.port=0", *extra])


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def _ask(client: openai.OpenAI, text: str, model: str = TASK, **kwargs):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}],
                                                           **kwargs)
    return raw.headers, raw.parse()


def _split(run_dir: Path, split: str) -> list[dict]:
    return runio.read_jsonl(paths.split_path(run_dir, split))


def _answers(mapping: dict[str, tuple], default=(CONFIDENT, 0.99)):
    return lambda text: mapping.get(text, default)


# ---------------------------------------------------------------------------------------------------------------
# routing: student, teacher, ledger


def test_confident_answer_is_served_by_the_student_and_costs_no_teacher_call(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({NEW_TICKET: (CONFIDENT, 0.97)})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            before = len(teacher.calls)
            headers, reply = _ask(_client(url), NEW_TICKET)
    assert headers["x-distill-route"] == "student"
    assert headers["x-distill-reason"] == "confident"
    assert float(headers["x-distill-confidence"]) == pytest.approx(0.97)
    assert json.loads(reply.choices[0].message.content) == CONFIDENT
    assert reply.model == TASK and reply.object == "chat.completion"
    assert student.calls == [NEW_TICKET]
    assert len(teacher.calls) == before


def test_low_confidence_pays_the_teacher_once_then_reads_the_ledger(published, teacher, fake_answer, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({}, default=(CONFIDENT, 0.5))) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            client = _client(url)
            before = len(teacher.calls)
            headers, reply = _ask(client, NEW_TICKET)
            assert len(teacher.calls) == before + 1  # exactly one paid fallback
            again, second = _ask(client, NEW_TICKET)
            assert len(teacher.calls) == before + 1  # the same input again: answered from the ledger
    assert headers["x-distill-route"] == again["x-distill-route"] == "teacher"
    assert headers["x-distill-reason"] == "below_threshold"
    assert float(headers["x-distill-confidence"]) == pytest.approx(0.5)
    expected = json.loads(fake_answer([{"role": "user", "content": NEW_TICKET}]))
    assert json.loads(reply.choices[0].message.content) == json.loads(second.choices[0].message.content) == expected
    # the gateway's request is generate's: the teacher got the recipe's few-shot prompt, not the student's
    sent = teacher.calls[before]
    assert sent["model"] == "fake-teacher" and len(sent["messages"]) > 2
    assert sent["messages"][-1] == {"role": "user", "content": NEW_TICKET}


def test_fallback_for_an_input_generate_labelled_costs_nothing(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    rows = _split(run_dir, "train")[:3]
    with FakeStudent(_answers({}, default=(CONFIDENT, 0.1))) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            client = _client(url)
            before = len(teacher.calls)
            replies = [_ask(client, row["input"]) for row in rows]
    assert len(teacher.calls) == before  # zero teacher calls: every answer came from generate's ledger
    for row, (headers, reply) in zip(rows, replies):
        assert headers["x-distill-route"] == "teacher"
        assert json.loads(reply.choices[0].message.content) == row["teacher"]


def test_invalid_student_answer_goes_to_the_teacher(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.5)
    broken = {"category": "not-a-category", "priority": "high"}
    with FakeStudent(_answers({NEW_TICKET: (broken, 0.99), "typo": ('{"category": "billing"', 0.99)})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            client = _client(url)
            before = len(teacher.calls)
            headers, reply = _ask(client, NEW_TICKET)
            typo_headers, _ = _ask(client, "typo")
    assert headers["x-distill-route"] == typo_headers["x-distill-route"] == "teacher"
    assert headers["x-distill-reason"] == typo_headers["x-distill-reason"] == "invalid_answer"
    assert headers["x-distill-confidence"] == "none"
    assert json.loads(reply.choices[0].message.content)["category"] != "not-a-category"
    assert len(teacher.calls) == before + 2


def test_disabled_route_sends_every_task_request_to_the_teacher(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path)  # publish disabled the route: too few val items
    assert not load_rule(paths.stage_dir(run_dir, "publish") / paths.ROUTING).route.enabled
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            before = len(teacher.calls)
            headers, _ = _ask(_client(url), "Where is my parcel? It was due on Monday.",
                              extra_body={"metadata": {"distill_task": TASK}})
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == ("teacher", "route_disabled")
    assert student.calls == []  # a disabled route never waits for the student
    assert len(teacher.calls) == before + 1


def test_metadata_names_the_task_whatever_the_model(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            headers, reply = _ask(_client(url), NEW_TICKET, model="any-model-name",
                                  metadata={"distill_task": TASK})
    assert headers["x-distill-route"] == "student"
    assert reply.model == "any-model-name"


def test_sequence_confidence_from_a_plain_openai_server(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({NEW_TICKET: (CONFIDENT, 0.95), "unsure": (CONFIDENT, 0.6)})) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.confidence=sequence")
        with background(cfg) as url:
            client = _client(url)
            sure, _ = _ask(client, NEW_TICKET)
            unsure, _ = _ask(client, "unsure")
    assert (sure["x-distill-route"], float(sure["x-distill-confidence"])) == ("student", pytest.approx(0.95))
    assert (unsure["x-distill-route"], unsure["x-distill-reason"]) == ("teacher", "below_threshold")


# ---------------------------------------------------------------------------------------------------------------
# the API surface: pass-through, streaming, models, health, metrics


def test_other_models_pass_through_with_the_teacher_key_never_the_clients(published, fake_answer, tmp_path,
                                                                          monkeypatch, caplog):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    teacher_key, client_key = "sk-teacher-" + "a1b2c3d4" * 4, "client-key-" + "9z8y7x6w" * 3
    monkeypatch.setenv("TEST_TEACHER_KEY", teacher_key)
    monkeypatch.setenv("TEST_GATEWAY_KEYS", f"other-key-123456, {client_key}")
    with FakeTeacher(fake_answer, api_key=teacher_key) as keyed, FakeStudent(_answers({})) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={keyed.base_url}",
                   "teacher.api_key_env=TEST_TEACHER_KEY", "serve.api_keys_env=TEST_GATEWAY_KEYS")
        from distill.serve.command import client_keys

        caplog.set_level("INFO", logger="distill.serve.access")
        with background(cfg, client_keys(cfg)) as url:
            body = {"model": "fake-teacher", "messages": [{"role": "user", "content": "hello there"}],
                    "temperature": 0.3, "max_tokens": 7, "user": "u-1"}
            resp = httpx.post(f"{url}/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {client_key}"})
            refused = httpx.post(f"{url}/chat/completions", json=body)
            wrong = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            models = _client(url, client_key).models.list()
    assert resp.status_code == 200, resp.text
    assert keyed.calls == [body]  # forwarded unchanged, with the teacher's key (the fake checks it)
    assert teacher_key not in resp.text and teacher_key not in str(resp.headers)
    assert "x-distill-route" not in resp.headers
    for bad in (refused, wrong):
        assert bad.status_code == 401
        assert bad.json()["error"]["code"] == "invalid_api_key"
        assert bad.headers["www-authenticate"] == "Bearer"
    assert [m.id for m in models.data] == [TASK, "fake-teacher"]
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "distill.serve.access"]
    assert [(a["route"], a["status"]) for a in access] == [("passthrough", 200), ("error", 401), ("error", 401)]
    logged = caplog.text
    assert teacher_key not in logged and client_key not in logged and "hello there" not in logged


def test_a_teacher_that_refuses_the_key_is_a_502_that_never_shows_the_key(published, fake_answer, tmp_path,
                                                                         monkeypatch):
    run_dir = _copy(published, tmp_path)
    wrong = "sk-wrong-" + "q1w2e3r4" * 4
    monkeypatch.setenv("TEST_TEACHER_KEY", wrong)
    with FakeTeacher(fake_answer, api_key="sk-right-" + "z" * 32) as keyed, FakeStudent(_answers({})) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={keyed.base_url}",
                   "teacher.api_key_env=TEST_TEACHER_KEY")
        with background(cfg) as url:
            body = {"model": TASK, "messages": [{"role": "user", "content": NEW_TICKET}]}
            first, second = (httpx.post(f"{url}/chat/completions", json=body) for _ in range(2))
            passthrough = httpx.post(f"{url}/chat/completions", json={**body, "model": "fake-teacher"})
    for resp in (first, second, passthrough):  # the gateway keeps serving after the teacher's 401
        assert "teacher" in _error(resp, 502, "teacher_unavailable")
        assert wrong not in resp.text and wrong not in str(resp.headers)
    assert first.headers["x-distill-teacher-error"] == "teacher_refused"
    assert len(keyed.calls) == 3


@pytest.mark.benchmark
def test_gateway_benchmark_tiny():
    out = subprocess.run([sys.executable, "benchmarks/gateway.py", "--requests", "40", "--concurrency", "4",
                          "--runs", "1", "--no-record"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")}
    assert float(rows["gateway, student kept (route=student)"][7]) > 0  # gateway CPU ms per request was measured
    assert "student called directly" in rows


def test_streaming_sends_one_content_chunk_then_done(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            chunks = list(_client(url).chat.completions.create(
                model=TASK, stream=True, messages=[{"role": "user", "content": NEW_TICKET}]))
            with httpx.stream("POST", f"{url}/chat/completions", json={
                    "model": TASK, "stream": True, "messages": [{"role": "user", "content": NEW_TICKET}]}) as raw:
                events = [line for line in raw.iter_lines() if line]
                headers = raw.headers
    assert [c.choices[0].delta.content for c in chunks] == [json.dumps(CONFIDENT, separators=(", ", ": ")), None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert events[-1] == "data: [DONE]" and len(events) == 3
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-distill-route"] == "student"


def test_healthz_and_metrics_count_routes_reasons_and_teacher_spend(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({"unsure": (CONFIDENT, 0.2)})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            client = _client(url)
            _ask(client, NEW_TICKET)
            _ask(client, "unsure")
            _ask(client, "unsure")
            base = url.removesuffix("/v1")
            health = httpx.get(f"{base}/healthz").json()
            metrics = httpx.get(f"{base}/metrics")
    assert health["status"] == "ok" and health["student"]["circuit"] == {TASK: "closed"}
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert f'distill_requests_total{{reason="confident",route="student",status="200",task="{TASK}"}} 1.0' in text
    assert f'distill_requests_total{{reason="below_threshold",route="teacher",status="200",task="{TASK}"}} 2.0' in text
    assert f'distill_teacher_calls_total{{result="paid",task="{TASK}"}} 1.0' in text
    assert f'distill_teacher_calls_total{{result="ledger",task="{TASK}"}} 1.0' in text
    assert 'distill_request_latency_seconds_count{route="teacher"} 2.0' in text
    spend = next(line for line in text.splitlines() if line.startswith("distill_teacher_spend_usd_total"))
    assert float(spend.split()[-1]) > 0  # the one paid fallback, priced at the teacher's price


# ---------------------------------------------------------------------------------------------------------------
# failures: OpenAI error JSON, never a traceback


def _error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["type"]
    assert "Traceback" not in resp.text
    return err["message"]


def test_bad_requests_get_400_413_with_the_problem_named(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.max_body_kb=2")) as url:
            post = lambda **kw: httpx.post(f"{url}/chat/completions", **kw)  # noqa: E731
            bad_json = post(content=b'{"model": "support_tickets", "messages": [', headers={"content-type":
                                                                                              "application/json"})
            no_user = post(json={"model": TASK, "messages": [{"role": "system", "content": "hi"}]})
            empty = post(json={"model": TASK, "messages": [{"role": "user", "content": "  "}]})
            no_messages = post(json={"model": TASK})
            big = post(json={"model": TASK, "messages": [{"role": "user", "content": "x" * 4096}]})
            unknown = httpx.get(f"{url}/embeddings")
    assert "not valid JSON" in _error(bad_json, 400, "invalid_json")
    assert "no user message" in _error(no_user, 400, "missing_user_message")
    assert "no text content" in _error(empty, 400, "missing_user_message")
    assert "'messages'" in _error(no_messages, 400, "missing_messages")
    assert "serve.max_body_kb=2" in _error(big, 413, "request_too_large")
    _error(unknown, 404, "not_found")
    assert student.calls == []


def test_a_bug_in_the_gateway_is_a_500_without_the_traceback(published, tmp_path, monkeypatch):
    from distill.serve.gateway import TaskRoute

    async def broken(self, request, text):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(TaskRoute, "handle", broken)
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}")) as url:
            resp = httpx.post(f"{url}/chat/completions", json={"model": TASK, "messages": [
                {"role": "user", "content": NEW_TICKET}]})
            still = httpx.get(url.removesuffix("/v1") + "/healthz")
    _error(resp, 500, "internal_error")
    assert "secret internal detail" not in resp.text and "RuntimeError" not in resp.text
    assert still.status_code == 200


def test_over_the_concurrency_limit_gets_429_with_retry_after(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(_answers({}), latency_s=1.0) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.max_concurrency=2")) as url:
            body = {"model": TASK, "messages": [{"role": "user", "content": NEW_TICKET}]}
            with ThreadPoolExecutor(4) as pool:
                first = [pool.submit(httpx.post, f"{url}/chat/completions", json=body, timeout=30) for _ in range(2)]
                deadline = time.monotonic() + 30
                while len(student.calls) < 2:  # both admitted and waiting on the student
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                over = httpx.post(f"{url}/chat/completions", json=body)
                done = [f.result() for f in first]
    assert [r.status_code for r in done] == [200, 200]
    assert "serve.max_concurrency=2" in _error(over, 429, "rate_limit_exceeded")
    assert over.headers["retry-after"] == "1"


def test_teacher_down_is_a_502_naming_it_or_the_students_answer_when_asked(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    with FakeStudent(_answers({}, default=(CONFIDENT, 0.3))) as student:
        common = (f"serve.student_endpoint={student.base_url}", f"teacher.base_url={dead}",
                  "teacher.backoff_initial_s=0.01")
        with background(_cfg(run_dir, *common)) as url:
            down = httpx.post(f"{url}/chat/completions", json={"model": TASK, "messages": [
                {"role": "user", "content": NEW_TICKET}]})
        with background(_cfg(run_dir, *common, "serve.on_teacher_down=student")) as url:
            headers, reply = _ask(_client(url), NEW_TICKET)
    message = _error(down, 502, "teacher_unavailable")
    assert "teacher did not answer (connection_error)" in message
    assert down.headers["x-distill-reason"] == "below_threshold"
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == ("student", "teacher_down")
    assert headers["x-distill-teacher-error"] == "connection_error"
    assert json.loads(reply.choices[0].message.content) == CONFIDENT


def test_killed_student_runtime_sends_requests_to_the_teacher_with_no_5xx(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    rows = _split(run_dir, "train") + _split(run_dir, "val")  # in the ledger: the fallbacks cost nothing
    with FakeStudent(_answers({})) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.breaker_failures=2",
                   "serve.breaker_cooldown_s=60")
        with background(cfg) as url:
            client = _client(url)
            served = [_ask(client, rows[0]["input"])[0]["x-distill-route"]]
            student.kill()
            replies = [_ask(client, row["input"]) for row in rows[1:8]]
            health = httpx.get(url.removesuffix("/v1") + "/healthz").json()
    assert served == ["student"]
    assert all(h["x-distill-route"] == "teacher" for h, _ in replies)
    reasons = [h["x-distill-reason"] for h, _ in replies]
    assert reasons[:2] == ["student_error", "student_error"]          # two failures open the circuit ...
    assert set(reasons[2:]) == {"student_unavailable"}                # ... then the student is not tried
    for row, (_, reply) in zip(rows[1:8], replies):
        assert json.loads(reply.choices[0].message.content) == row["teacher"]
    assert health["status"] == "degraded"
    assert health["student"] == {"reachable": False, "circuit": {TASK: "open"}}


def test_slow_student_times_out_to_the_teacher(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    row = _split(run_dir, "train")[0]
    with FakeStudent(_answers({}), latency_s=2.0) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.student_timeout_s=0.2")
        with background(cfg) as url:
            started = time.perf_counter()
            headers, reply = _ask(_client(url), row["input"])
            took = time.perf_counter() - started
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == ("teacher", "student_error")
    assert json.loads(reply.choices[0].message.content) == row["teacher"]
    assert took < 1.8  # the student alone would have taken 2 s


def test_breaker_opens_after_failures_and_one_request_probes_after_the_cooldown():
    now = [0.0]
    breaker = Breaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # half open: one probe at a time
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()  # the probe failed: open again
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


# ---------------------------------------------------------------------------------------------------------------
# config


def test_serve_config_comes_from_the_run_and_refuses_what_it_cannot_honour(published, tmp_path, monkeypatch):
    cfg = load_serve_config([f"run_dir={published}", "serve.port=9100", "teacher.timeout_s=5"])
    assert (cfg.recipe.name, cfg.serve.port, cfg.serve.host, cfg.teacher.timeout_s) == (TASK, 9100, "127.0.0.1", 5)
    with pytest.raises(DistillError, match="serve needs run_dir=DIR"):
        load_serve_config(["serve.port=1"])
    with pytest.raises(DistillError, match="keeps the run's config groups"):
        load_serve_config([f"run_dir={published}", "teacher=local"])
    with pytest.raises(DistillError, match="unknown config key 'serve.prot'"):
        load_serve_config([f"run_dir={published}", "serve.prot=1"])
    with pytest.raises(DistillError, match="serve.student_endpoint must be an http"):
        load_serve_config([f"run_dir={published}", "serve.student_endpoint=localhost:80"])
    from distill.serve.command import client_keys

    monkeypatch.setenv("EMPTY_KEYS", " , ")
    with pytest.raises(DistillError, match="holds no key"):
        client_keys(load_serve_config([f"run_dir={published}", "serve.api_keys_env=EMPTY_KEYS"]))


# ---------------------------------------------------------------------------------------------------------------
# the real student runtime: the published GGUF in llama.cpp


def _score(url: str, task, text: str, max_new_tokens: int) -> dict:
    resp = httpx.post(f"{url}/distill/score", json={"messages": task.student_messages(text),
                                                    "schema": task.schema.schema, "max_new_tokens": max_new_tokens},
                      timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


# f32: the same numbers up to float32 and evaluate's 6-decimal rounding; q8_0: measured within 4e-4 here
@pytest.mark.parametrize("artifact, tolerance", [("f32", 2e-5), ("q8_0", 2e-3)])
def test_runtime_confidence_is_evaluates_scored_confidence_on_the_served_gguf(published, artifact, tolerance):
    from distill.serve.runtime import StudentRuntime
    from distill.task import Task

    cfg = load_serve_config([f"run_dir={published}"])
    task = Task(cfg)
    model_dir = paths.stage_dir(published, "publish") / paths.MODEL_DIR
    (gguf,) = model_dir.glob(f"*-{artifact}.gguf")
    predictions = runio.read_jsonl(paths.stage_dir(published, "evaluate") / paths.PREDICTIONS)
    assert predictions and all(p["confidence"] is not None for p in predictions)
    with StudentRuntime(gguf, model_dir / paths.HF_DIR) as runtime:
        scored = [_score(runtime.base_url, task, p["input"], cfg.eval.max_new_tokens) for p in predictions]
    for pred, got in zip(predictions, scored):
        assert got["answer"] == pred["student"]
        assert got["confidence"] == pytest.approx(pred["confidence"], abs=tolerance)
        assert got["field_confidence"] == pytest.approx(pred["field_confidence"], abs=tolerance)
        assert math.isclose(got["confidence"], math.prod(got["field_confidence"].values()), rel_tol=1e-9)


def test_gateway_starts_the_runtime_and_routes_on_its_confidence(published, teacher, tmp_path):
    predictions = runio.read_jsonl(paths.stage_dir(published, "evaluate") / paths.PREDICTIONS)
    ranked = sorted(predictions, key=lambda p: p["confidence"])
    low, high = ranked[0], ranked[-1]
    assert low["confidence"] < high["confidence"]
    threshold = (low["confidence"] + high["confidence"]) / 2  # between the two: one kept, one to the teacher
    run_dir = _copy(published, tmp_path, threshold=round(threshold, 6))
    with background(_cfg(run_dir)) as url:
        client = _client(url)
        before = len(teacher.calls)
        kept, kept_reply = _ask(client, high["input"])
        fell, fell_reply = _ask(client, low["input"])
    assert (kept["x-distill-route"], kept["x-distill-reason"]) == ("student", "confident")
    assert float(kept["x-distill-confidence"]) == pytest.approx(high["confidence"], abs=5e-3)
    assert json.loads(kept_reply.choices[0].message.content) == high["student"]
    assert (fell["x-distill-route"], fell["x-distill-reason"]) == ("teacher", "below_threshold")
    assert json.loads(fell_reply.choices[0].message.content) == low["teacher"]
    assert len(teacher.calls) == before  # test items were labelled by generate: the ledger answered
    assert (run_dir / "serve" / "student_runtime.log").is_file()


def test_sigterm_lets_20_requests_in_flight_finish_then_stops_the_runtime(published, fake_answer, tmp_path):
    import psutil

    from distill.teacher.server import free_port

    run_dir = _copy(published, tmp_path)  # route disabled: every request waits on the slow teacher
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    inputs = [f"Ticket {i}: my order #{1000 + i} arrived broken, what now?" for i in range(20)]
    with FakeTeacher(fake_answer, latency_s=1.5) as slow:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "serve", f"run_dir={run_dir}", f"serve.port={port}",
                                 f"teacher.base_url={slow.base_url}", "teacher.concurrency=32"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
            children = psutil.Process(proc.pid).children(recursive=True)
            assert children, "the student runtime should run as a child process"
            with ThreadPoolExecutor(20) as pool:
                futures = [pool.submit(httpx.post, f"{base}/v1/chat/completions", timeout=60, json={
                    "model": TASK, "messages": [{"role": "user", "content": text}]}) for text in inputs]
                while len(slow.calls) < 20:  # all 20 are waiting on the teacher
                    assert time.monotonic() < deadline + 60
                    time.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                replies = [f.result() for f in futures]
            code = proc.wait(timeout=60)
            _, stderr = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [r.status_code for r in replies] == [200] * 20
    assert [json.loads(r.json()["choices"][0]["message"]["content"]) for r in replies] == [
        json.loads(fake_answer([{"role": "user", "content": t}])) for t in inputs]
    assert code == 0, stderr[-2000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    access = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(access) == 20
    assert {(a["task"], a["route"], a["reason"], a["status"]) for a in access} == {(TASK, "teacher",
                                                                                    "route_disabled", 200)}
    assert all(a["latency_ms"] >= 1000 for a in access)
    assert not any(text in stderr for text in inputs)  # no request body in any log line
