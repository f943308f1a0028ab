"""distill serve over loopback: the official openai client against the gateway, a fake teacher counting its calls,
a fake student answering with chosen confidences, and the real student runtime on the tiny published GGUF.

One tiny pipeline (generate -> train -> evaluate -> publish) runs once for the module, with the fake teacher kept
alive for all tests so its base URL, and so every ledger key, stays the one generate used.
"""

from __future__ import annotations

import json
import math
import re
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
from conftest import REPO, copy_with_route, wait_healthy

from distill import DistillError, paths, runio
from distill.routing import RouteSpec, load_rule
from distill.serve.command import background, load_serve_config
from distill.serve.student import Breaker
from distill.testing.fake_student import FakeStudent
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration

TASK = "support_tickets"
NEW_TICKET = "The invoice for March shows two charges of $49 for one seat; please explain or refund one."
CONFIDENT = {"category": "billing", "priority": "high"}


# conftest's `published` run: q8_0 (what serve picks) and f32 GGUFs, routing.yaml (route disabled: 4 val items),
# labelled by the module's fake `teacher`
PUBLISH_EXTRA = ("publish.force=true", "publish.gguf_types=[q8_0,f32]")


def _copy(published, tmp_path, *, threshold: float | None = None) -> Path:
    """A copy of the run (its own ledger); ``threshold`` enables the route at that confidence."""
    return copy_with_route(published, tmp_path / "run", threshold)


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


def test_the_other_openai_endpoints_of_an_app_pass_through_to_the_teacher(published, fake_answer, tmp_path,
                                                                          monkeypatch, caplog):
    """An app whose whole base URL is the gateway also embeds, and looks a model up: those reach the teacher
    unchanged with the teacher's key; a task alias there is refused by name (a task answers chat completions);
    account endpoints (files, batches) are not forwarded at all."""
    run_dir = _copy(published, tmp_path, threshold=0.9)
    teacher_key, client_key = "sk-teacher-" + "e5f6g7h8" * 4, "client-key-" + "1a2b3c4d" * 3
    monkeypatch.setenv("TEST_TEACHER_KEY", teacher_key)
    monkeypatch.setenv("TEST_GATEWAY_KEYS", client_key)
    with FakeTeacher(fake_answer, api_key=teacher_key) as keyed, FakeStudent(_answers({})) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={keyed.base_url}",
                   "teacher.api_key_env=TEST_TEACHER_KEY", "serve.api_keys_env=TEST_GATEWAY_KEYS")
        from distill.serve.command import client_keys

        caplog.set_level("INFO", logger="distill.serve.access")
        with background(cfg, client_keys(cfg)) as url:
            client = _client(url, client_key)
            vectors = client.embeddings.create(model="fake-teacher", input=["hello there", "hi"])
            teacher_model = client.models.retrieve("fake-teacher")
            task_model = client.models.retrieve(TASK)
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("no-such-model")
            with pytest.raises(openai.BadRequestError) as task_embed:
                client.embeddings.create(model=TASK, input="hello there")
            for call in (lambda c: c.embeddings.create(model="fake-teacher", input="hello there"),
                         lambda c: c.models.retrieve(TASK), lambda c: c.models.retrieve("fake-teacher")):
                with pytest.raises(openai.AuthenticationError):
                    call(_client(url, "wrong"))
            raw_body = {"model": "fake-teacher", "input": "hello there", "dimensions": 3, "user": "u-7"}
            raw = httpx.post(f"{url}/embeddings", json=raw_body, headers={"Authorization": f"Bearer {client_key}"})
            files = httpx.post(f"{url}/files", headers={"Authorization": f"Bearer {client_key}"}, content=b"x")
            nested = httpx.get(f"{url}/files/file-1/content", headers={"Authorization": f"Bearer {client_key}"})
    assert [len(d.embedding) for d in vectors.data] == [3, 3]  # the teacher's answer, relayed
    assert keyed.other_calls[-1] == ("POST", "/v1/embeddings", raw_body)  # forwarded unchanged
    assert raw.status_code == 200 and teacher_key not in raw.text
    assert (teacher_model.id, teacher_model.owned_by) == ("fake-teacher", "fake")
    assert (task_model.id, task_model.owned_by) == (TASK, f"distill:{TASK}")
    assert task_embed.value.status_code == 400 and task_embed.value.code == "unsupported_endpoint"
    assert "chat/completions" in task_embed.value.message
    # the task alias, the wrong key and the account endpoints never reached the teacher
    assert [(m, p) for m, p, _ in keyed.other_calls] == [("POST", "/v1/embeddings"), ("GET", "/v1/models/fake-teacher"),
                                                         ("GET", "/v1/models/no-such-model"), ("POST", "/v1/embeddings")]
    assert keyed.calls == []
    assert files.status_code == 404 and files.json()["error"]["code"] == "not_found"
    assert "embeddings" in files.json()["error"]["message"]
    assert nested.status_code == 404
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "distill.serve.access"]
    assert [(a["route"], a["status"]) for a in access][:3] == [("passthrough", 200)] * 2 + [("passthrough", 404)]
    assert teacher_key not in caplog.text and client_key not in caplog.text and "hello there" not in caplog.text


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
    lines = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.stdout.splitlines()
             if line.startswith("| ")]
    header, rows = lines[0], {row[0]: row for row in lines[1:]}
    cpu = header.index("gateway CPU ms/request")
    assert float(rows["gateway, student kept (route=student)"][cpu]) > 0  # gateway CPU ms per request was measured
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
            unknown = httpx.get(f"{url}/no/such/endpoint")
            wrong_method = httpx.get(f"{url}/embeddings")  # a POST endpoint (forwarded to the teacher)
            ticket = [{"role": "user", "content": NEW_TICKET}]
            several = post(json={"model": TASK, "messages": ticket, "n": 3})
            one = post(json={"model": TASK, "messages": ticket, "n": 1, "tools": []})
            tools = post(json={"model": TASK, "messages": ticket, "tools": [{"type": "function", "function": {
                "name": "lookup", "parameters": {"type": "object"}}}]})
    assert "n=3: a task request has one answer" in _error(several, 400, "unsupported_parameter")
    assert "'tools' is not used by task model" in _error(tools, 400, "unsupported_parameter")
    assert one.status_code == 200, one.text
    assert "not valid JSON" in _error(bad_json, 400, "invalid_json")
    assert "no user message" in _error(no_user, 400, "missing_user_message")
    assert "no text content" in _error(empty, 400, "missing_user_message")
    assert "'messages'" in _error(no_messages, 400, "missing_messages")
    assert "serve.max_body_kb=2" in _error(big, 413, "request_too_large")
    _error(unknown, 404, "not_found")
    _error(wrong_method, 405, "method_not_allowed")
    assert len(student.calls) == 1  # the n=1 request alone reached the student


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
    # the two admitted requests wait 5 s on the student: the third must arrive while they are in flight
    with FakeStudent(_answers({}), latency_s=5.0) as student:
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


def test_a_rate_limited_teacher_is_a_prompt_503_with_its_retry_after_not_a_held_request(published, fake_answer,
                                                                                        tmp_path):
    """A teacher's 429 asking for a long wait (here 30 s, generate would wait up to teacher.max_wait_s=600) is
    answered at once: 503 teacher_rate_limited with that Retry-After, one teacher call, the key left open in the
    ledger, so the same input is answered (and paid once) when the teacher is back. A short wait is waited out and
    retried (serve.teacher_max_retries); retries that run out are the same 503."""
    run_dir = _copy(published, tmp_path)
    body = {"model": TASK, "messages": [{"role": "user", "content": "A ticket no one labelled yet: " + NEW_TICKET}]}
    with FakeTeacher(fake_answer, faults={"429": 1.0}, retry_after_s=30) as limited:
        with background(_cfg(run_dir, f"teacher.base_url={limited.base_url}")) as url:
            started = time.monotonic()
            refused = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
            took = time.monotonic() - started
        calls_long = len(limited.calls)
    with FakeTeacher(fake_answer, faults={"429": 1.0}, retry_after_s=0.2) as brief:
        with background(_cfg(run_dir, f"teacher.base_url={brief.base_url}")) as url:
            spent = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        calls_short = len(brief.calls)
    with FakeTeacher(fake_answer) as back:
        with background(_cfg(run_dir, f"teacher.base_url={back.base_url}")) as url:
            answered = [httpx.post(f"{url}/chat/completions", json=body, timeout=60) for _ in range(2)]
    assert "asked to wait 30 s" in _error(refused, 503, "teacher_rate_limited")
    assert refused.headers["retry-after"] == "30" and refused.headers["x-distill-teacher-error"] == "retry_after_too_long"
    assert took < 10 and calls_long == 1  # not held for the 30 s, and not sent again
    _error(spent, 503, "teacher_rate_limited")
    assert spent.headers["retry-after"] == "1" and spent.headers["x-distill-teacher-error"] == "http_429"
    assert calls_short == 2  # the first try and serve.teacher_max_retries=1 retry after the 0.2 s asked
    assert [r.status_code for r in answered] == [200, 200]
    assert answered[0].headers["x-distill-route"] == "teacher" and len(back.calls) == 1  # paid once, then the ledger


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


def test_an_input_too_long_for_the_student_goes_to_the_teacher_without_opening_the_circuit(published, teacher,
                                                                                         tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.0)
    long_inputs = [f"ticket {i}: my parcel never arrived. " + "It is late. " * 60 for i in range(4)]
    paid_before = len(teacher.calls)
    with FakeStudent(_answers({}), max_input_chars=400) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.breaker_failures=2")
        with background(cfg) as url:
            client = _client(url)
            replies = [_ask(client, text) for text in long_inputs]
            short = _ask(client, NEW_TICKET)[0]
        with FakeTeacher(lambda messages: "{}", status=400) as refusing:
            cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", f"teacher.base_url={refusing.base_url}")
            with background(cfg) as url:
                resp = httpx.post(f"{url}/chat/completions", json={"model": TASK, "messages": [
                    {"role": "user", "content": long_inputs[0] + " again"}]})
    assert [(h["x-distill-route"], h["x-distill-reason"]) for h, _ in replies] == [("teacher", "input_too_long")] * 4
    assert len(teacher.calls) - paid_before == 4  # one teacher answer per long input
    assert all(json.loads(r.choices[0].message.content) for _, r in replies)
    # Four inputs that do not fit are the inputs' problem: the circuit (2 failures) stayed closed for the next one.
    assert (short["x-distill-route"], short["x-distill-reason"]) == ("student", "confident")
    # Too long for the teacher as well: the client's 400, not a 502 of the gateway.
    assert "the task input is too long" in _error(resp, 400, "context_length_exceeded")
    assert resp.headers["x-distill-reason"] == "input_too_long"


def test_slow_student_times_out_to_the_teacher(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    row = _split(run_dir, "train")[0]
    with FakeStudent(_answers({}), latency_s=30.0) as student:  # its handler threads are daemons: nobody waits 30 s
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.student_timeout_s=0.2")
        with background(cfg) as url:
            started = time.perf_counter()
            headers, reply = _ask(_client(url), row["input"])
            took = time.perf_counter() - started
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == ("teacher", "student_error")
    assert json.loads(reply.choices[0].message.content) == row["teacher"]
    assert took < 10  # the student alone would have taken 30 s


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


def _task():
    from distill.config import load_config
    from distill.task import Task

    return Task(load_config(["recipe=support_tickets"]))


def test_score_request_is_byte_for_byte_the_json_of_the_request_it_replaced():
    from distill.serve.student import ScoredStudent

    task = _task()
    student = ScoredStudent("http://127.0.0.1:1/v1", task, max_new_tokens=48, timeout_s=1, session=None)
    text = 'A "quoted" ticket\nwith a newline and ünïcode'
    body = student.body(text)
    assert body == json.dumps({"messages": task.student_messages(text), "schema": task.schema.schema,
                               "max_new_tokens": 48}).encode()
    assert json.loads(body)["messages"][-1]["content"] == text


def test_remembered_schema_check_answers_as_the_validator_and_validates_each_answer_once():
    from distill.serve.student import ValidAnswers
    from distill.task import OutputSchema

    # an integer and a boolean field: 1 and True are equal (and hash alike) in Python, not in JSON schema
    schema = OutputSchema({"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                                                            "tags": {"type": "array"}}, "required": ["n"]})
    calls = []

    class Counting:
        def errors(self, answer):
            calls.append(answer)
            return schema.errors(answer)

    answers = [{"n": 1}, {"n": True}, {"n": 1.5}, {"n": 1, "ok": True}, {"n": 1, "ok": 1}, {"ok": True},
               {"n": 2, "tags": ["a"]}, {"n": 2, "tags": "a"}]
    truth = [not schema.errors(a) for a in answers]
    assert truth == [True, False, False, True, False, False, True, False]
    valid = ValidAnswers(Counting())
    for _ in range(3):
        assert [valid(a) for a in answers] == truth
    assert valid({"ok": True, "n": 1}) is True  # the same answer, keys in another order
    assert calls == answers  # each distinct answer validated once
    small = ValidAnswers(schema, size=2)
    assert [small(a) for a in answers * 2] == truth * 2 and len(small._seen) <= 2  # bounded, still right


def test_task_reply_body_and_headers_are_exact(monkeypatch):
    from starlette.responses import JSONResponse

    from distill.serve.app import _task_response
    from distill.serve.gateway import Served

    served = Served(200, {"category": "billing", "priority": "high"}, "student", "confident", 0.9731234567)
    reply = _task_response(served, 'support "tickets" ü', stream=False)
    data = json.loads(reply.body)
    assert re.fullmatch(r"chatcmpl-distill-[0-9a-f]{24}", data["id"])
    expected = JSONResponse({"id": data["id"], "object": "chat.completion", "created": data["created"],
                             "model": 'support "tickets" ü',
                             "choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": '{"category": "billing", "priority": '
                                                                             '"high"}'},
                                          "finish_reason": "stop", "logprobs": None}]})
    assert reply.body == expected.body  # what JSONResponse rendered before, byte for byte
    assert dict(reply.headers) == {"x-distill-route": "student", "x-distill-reason": "confident",
                                   "x-distill-confidence": "0.973123", "content-length": str(len(reply.body)),
                                   "content-type": "application/json"}
    other = json.loads(_task_response(served, "m", stream=False).body)["id"]
    assert other != data["id"]


def test_request_metrics_count_every_request_through_the_bound_series():
    from prometheus_client.parser import text_string_to_metric_families

    from distill.serve.metrics import Metrics

    metrics = Metrics()
    for seconds in (0.001, 0.003, 0.2):
        metrics.request_done(TASK, "student", "confident", 200, seconds)
    metrics.request_done(TASK, "teacher", "below_threshold", 200, 0.1)
    metrics.request_done("", "error", "invalid_json", 400, 0.0005)
    metrics.answered(TASK, "student", None)
    metrics.answered(TASK, "teacher", None)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render()[0].decode()) for s in family.samples}

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("distill_requests_total", task=TASK, route="student", reason="confident", status="200") == 3
    assert value("distill_requests_total", task=TASK, route="teacher", reason="below_threshold", status="200") == 1
    assert value("distill_requests_total", task="", route="error", reason="invalid_json", status="400") == 1
    assert value("distill_request_latency_seconds_count", route="student") == 3
    assert value("distill_request_latency_seconds_bucket", route="student", le="0.005") == 2
    assert value("distill_request_latency_seconds_sum", route="teacher") == pytest.approx(0.1)
    assert value("distill_live_coverage", task=TASK) == 0.5


class _CountingStore:
    def __init__(self):
        self.writes: list[tuple[str, float]] = []

    def incr(self, key, usd):
        self.writes.append((key, usd))
        return sum(v for k, v in self.writes if k == key)


@pytest.mark.parametrize("cap", [None, 1.0])
def test_fallback_spend_is_counted_once_and_reserved_only_under_a_cap(cap):
    import asyncio
    from types import SimpleNamespace

    from distill.serve.budget import DailyBudget
    from distill.serve.gateway import TaskRoute
    from distill.serve.metrics import Metrics
    from distill.teacher.client import Outcome

    store = _CountingStore()
    cost = {"free": 0.0, "paid": 0.002}

    async def label(messages):
        if messages == "cancelled":
            raise asyncio.CancelledError
        return Outcome(CONFIDENT, None, "k", 0, 1, cost_usd=cost[messages])

    route = SimpleNamespace(task=SimpleNamespace(teacher_messages=lambda text: text), name=TASK, metrics=Metrics(),
                            budget=DailyBudget(store, cap, clock=lambda: "day"), _in_ledger=lambda m: False,
                            _bound=lambda messages: 0.01, teacher=SimpleNamespace(label=label))
    ask = lambda text: asyncio.run(TaskRoute._ask_teacher(route, text))  # noqa: E731
    assert ask("free") == (CONFIDENT, None, None) and ask("paid") == (CONFIDENT, None, None)
    with pytest.raises(asyncio.CancelledError):  # sent, maybe billed: counted at its bound
        ask("cancelled")
    key = "teacher.spend.day"
    if cap is None:  # nothing to reserve against: only what each call cost, and nothing for a free call
        assert store.writes == [(key, 0.002), (key, 0.01)]
    else:  # reserved at the bound, then settled to the cost
        assert store.writes == [(key, 0.01), (key, -0.01), (key, 0.01), (key, pytest.approx(-0.008)), (key, 0.01)]
    assert sum(v for _, v in store.writes) == pytest.approx(0.012)


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


@pytest.mark.parametrize("extra_values,max_nodes", [(0, None), (40, 512), (40, None)])
def test_one_tree_decode_per_field_gives_the_candidate_by_candidate_scores(published, extra_values, max_nodes,
                                                                           monkeypatch):
    """The runtime scores an enum field's values in one llama.cpp decode (a token trie, one sequence per value) and
    gets what scoring each value on its own gets; afterwards the cache holds only the prompt's sequence, so the
    next request is not disturbed by the last one's values. A trie over ``TRIE_MAX_NODES`` is scored candidate by
    candidate (the bound's path), with the same answers."""
    from llama_cpp import llama_cpp as lib

    from distill.serve import runtime
    from distill.serve.runtime import Scorer
    from distill.task import Task

    if max_nodes:
        monkeypatch.setattr(runtime, "TRIE_MAX_NODES", max_nodes)
    tree_on = max_nodes is not None or extra_values == 0

    cfg = load_serve_config([f"run_dir={published}"])
    task = Task(cfg)
    schema = json.loads(json.dumps(task.schema.schema))
    field = next(iter(task.schema.enums))
    schema["properties"][field]["enum"] += [f"extra_value_{j}" for j in range(extra_values)]
    n_values = sum(len(v) for v in Task(cfg).schema.enums.values()) + extra_values
    model_dir = paths.stage_dir(published, "publish") / paths.MODEL_DIR
    (gguf,) = model_dir.glob("*-f32.gguf")
    texts = [p["input"] for p in runio.read_jsonl(paths.stage_dir(published, "evaluate") / paths.PREDICTIONS)][:6]
    tree, alone = Scorer(gguf, model_dir / paths.HF_DIR), Scorer(gguf, model_dir / paths.HF_DIR)
    alone.model.trie_seqs = 0  # the candidate-by-candidate path
    assert tree.model.trie_seqs >= n_values

    def run(scorer, order):
        calls, out = [], {}
        for i in order:
            before = scorer.model.decode_calls
            out[i] = scorer.score(task.student_messages(texts[i]), schema, cfg.eval.max_new_tokens)
            calls.append(scorer.model.decode_calls - before)
        return out, calls

    order = list(range(len(texts)))
    got, tree_calls = run(tree, order)
    want, alone_calls = run(alone, order)
    again, _ = run(tree, order[::-1])  # another order: what an earlier request left in the cache changes nothing
    n_fields = len(task.schema.enums)
    for i in order:
        assert got[i]["answer"] == want[i]["answer"] == again[i]["answer"]
        assert got[i]["confidence"] == pytest.approx(want[i]["confidence"], abs=1e-5)
        assert got[i]["field_confidence"] == pytest.approx(want[i]["field_confidence"], abs=1e-5)
        assert again[i]["confidence"] == pytest.approx(got[i]["confidence"], abs=1e-6)
    # one decode per field (the uncached prompt rides in the first), against the prompt's and one per candidate
    if tree_on:
        assert max(tree_calls) <= n_fields < min(alone_calls)
    else:
        assert n_fields < min(tree_calls) < min(alone_calls)  # the large field one by one, the small ones at once
    mem = tree.model.llm._ctx.memory
    assert lib.llama_memory_seq_pos_max(mem, 0) >= 0
    assert all(lib.llama_memory_seq_pos_max(mem, s) == -1 for s in range(1, n_values + 2))


def test_runtime_decodes_on_one_thread_whichever_thread_asks(published):
    """llama.cpp runs a decode on an OpenMP team of the calling thread, and an idle team keeps spinning for a
    while: decodes called from a server's pool threads in turn took cores from each other. Every decode of a
    Scorer runs on its one worker thread, and concurrent requests get the answers they get one at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from distill.serve.runtime import Scorer
    from distill.task import Task

    cfg = load_serve_config([f"run_dir={published}"])
    task = Task(cfg)
    model_dir = paths.stage_dir(published, "publish") / paths.MODEL_DIR
    (gguf,) = model_dir.glob("*-q8_0.gguf")
    texts = [p["input"] for p in runio.read_jsonl(paths.stage_dir(published, "evaluate") / paths.PREDICTIONS)][:8]
    scorer = Scorer(gguf, model_dir / paths.HF_DIR)
    threads = []
    for name in ("_eval", "_decode_tree"):
        inner = getattr(scorer.model, name)

        def recorded(*a, _inner=inner, **k):
            threads.append(threading.get_ident())
            return _inner(*a, **k)

        setattr(scorer.model, name, recorded)

    def score(text):
        return scorer.score(task.student_messages(text), task.schema.schema, cfg.eval.max_new_tokens)

    alone = [score(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(score, texts))
    assert len(threads) >= 2 * len(texts) and len(set(threads)) == 1
    assert threads[0] != threading.get_ident()
    assert [a["answer"] for a in together] == [a["answer"] for a in alone]


def test_runtime_answers_an_input_longer_than_its_context_with_400_context_length_exceeded(published):
    """The runtime's 400 carries OpenAI's ``context_length_exceeded`` code for a prompt that does not fit (the
    gateway then sends the request to the teacher without counting it against the runtime's breaker), and a plain
    400 for a malformed request; the context it keeps is still usable afterwards."""
    from starlette.testclient import TestClient

    from distill.serve.runtime import SCORE_PATH, Scorer, create_app
    from distill.task import Task

    cfg = load_serve_config([f"run_dir={published}"])
    task = Task(cfg)
    model_dir = paths.stage_dir(published, "publish") / paths.MODEL_DIR
    (gguf,) = model_dir.glob("*-q8_0.gguf")
    short = runio.read_jsonl(paths.stage_dir(published, "evaluate") / paths.PREDICTIONS)[0]["input"]
    client = TestClient(create_app(Scorer(gguf, model_dir / paths.HF_DIR, n_ctx=256), "student"))

    def score(text):
        return client.post(f"/v1{SCORE_PATH}", json={"messages": task.student_messages(text),
                                                     "schema": task.schema.schema, "max_new_tokens": 8})

    too_long = score(" ".join(["order"] * 400)).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "context of 256" in too_long["message"]
    malformed = client.post(f"/v1{SCORE_PATH}", json={"messages": []})
    assert malformed.status_code == 400 and malformed.json()["error"].get("code") is None
    assert score(short).status_code == 200


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
            wait_healthy(proc, base, timeout_s=120)
            deadline = time.monotonic() + 120
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


# ---------------------------------------------------------------------------------------------------------------
# money, coverage, caches, the day's budget (distill/serve/metrics.py, budget.py)


def _metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if labels else f"{name} "):
            return float(line.split()[-1])
    return None


def _exposed(text: str) -> set[str]:
    """Every series name /metrics exposes, from its # TYPE lines (labelled metrics with no sample yet included)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            names |= {name + s for s in suffixes.get(kind, ())}
    return names


DASHBOARD_SCHEMA = {  # the part of Grafana's dashboard JSON model an import needs
    "type": "object", "required": ["title", "panels", "schemaVersion", "templating"],
    "properties": {
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "type": {"enum": ["timeseries", "stat", "gauge", "table"]},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"],
                            "properties": {k: {"type": "integer", "minimum": 0} for k in "hwxy"}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr"],
                    "properties": {"expr": {"type": "string", "minLength": 1}}}}}}}}}


def test_live_coverage_saved_money_and_the_dashboard_over_metrics(published, teacher, tmp_path):
    import jsonschema

    run_dir = _copy(published, tmp_path, threshold=0.9)
    rule = load_rule(paths.stage_dir(run_dir, "publish") / paths.ROUTING)
    price = rule.cost.teacher_usd_per_1k / 1000
    assert price > 0
    sure = [f"Ticket {i}: I was charged twice for order #{i}." for i in range(3)]
    with FakeStudent(_answers({"unsure 1": (CONFIDENT, 0.2), "unsure 2": (CONFIDENT, 0.3)})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}",
                             "serve.exact_cache.enabled=true")) as url:
            client = _client(url)
            routes = [_ask(client, text)[0]["x-distill-route"] for text in (*sure, "unsure 1", "unsure 2")]
            text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert routes == ["student"] * 3 + ["teacher"] * 2
    assert _metric(text, "distill_saved_usd_total", task=TASK) == pytest.approx(3 * price, rel=1e-9)
    assert _metric(text, "distill_live_coverage", task=TASK) == pytest.approx(3 / 5)
    assert _metric(text, "distill_teacher_price_usd", task=TASK) == pytest.approx(price)
    assert _metric(text, "distill_cache_lookups", task=TASK, cache="exact", result="miss") == 5
    dashboard = json.loads((paths.stage_dir(run_dir, "publish") / paths.GRAFANA).read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"])
    named = {n for e in exprs for n in re.findall(r"\bdistill_[a-z_]+", e)}
    assert {"distill_saved_usd_total", "distill_live_coverage", "distill_teacher_spend_usd_total"} <= named
    assert named <= _exposed(text), named - _exposed(text)


def test_exact_cache_counts_in_metrics_and_no_cached_student_answer_while_drifted(published, teacher, tmp_path,
                                                                                 monkeypatch):
    from distill.serve.shadow import Watch

    run_dir = _copy(published, tmp_path, threshold=0.9)
    drifted = [False]
    monkeypatch.setattr(Watch, "drifted", lambda self: drifted[0])
    with FakeStudent(_answers({})) as student:
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.exact_cache.enabled=true",
                             "serve.on_drift=fallback")) as url:
            client = _client(url)
            first, _ = _ask(client, NEW_TICKET)
            cached, _ = _ask(client, NEW_TICKET)
            drifted[0] = True  # an active alarm with serve.on_drift=fallback
            before = len(teacher.calls)
            during, reply = _ask(client, NEW_TICKET)
            text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert (first["x-distill-route"], "x-distill-cache" in first) == ("student", False)
    assert (cached["x-distill-route"], cached["x-distill-cache"]) == ("student", "exact")
    assert (during["x-distill-route"], during["x-distill-reason"]) == ("teacher", "drift")
    assert "x-distill-cache" not in during and len(teacher.calls) == before + 1
    assert len(student.calls) == 2  # the cached reply did not ask it; the drifted one did (and was overruled)
    assert _metric(text, "distill_cache_lookups", task=TASK, cache="exact", result="hit") == 1
    assert _metric(text, "distill_cache_lookups", task=TASK, cache="exact", result="miss") == 2


def test_daily_teacher_budget_is_shared_through_the_store_and_spent_means_503(published, teacher, tmp_path):
    from distill.serve.budget import utc_day
    from distill.serve.store import open_store

    run_dir = _copy(published, tmp_path, threshold=0.9)
    labelled = _split(run_dir, "train")[0]
    common = ("serve.teacher_budget_usd_per_day=0.5",)
    with FakeStudent(_answers({}, default=(CONFIDENT, 0.1))) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", *common)
        with background(cfg) as url:
            client = _client(url)
            before = len(teacher.calls)
            _ask(client, NEW_TICKET)  # one paid fallback under the cap
            assert len(teacher.calls) == before + 1
            text = httpx.get(url.removesuffix("/v1") + "/metrics").text
            spent = _metric(text, "distill_teacher_budget_spent_usd")
            assert spent == pytest.approx(_metric(text, "distill_teacher_spend_usd_total", task=TASK)) and spent > 0
            other = open_store(cfg, run_dir)  # another replica on the same store spends the rest of the day's cap
            other.incr(f"teacher.spend.{utc_day()}", 0.5)
            other.close()
            refused = httpx.post(f"{url}/chat/completions", json={"model": TASK, "messages": [
                {"role": "user", "content": "A new ticket nobody labelled yet."}]})
            free_headers, free_reply = _ask(client, labelled["input"])  # in the ledger: served whatever the day
            assert len(teacher.calls) == before + 1
        with background(_cfg(run_dir, f"serve.student_endpoint={student.base_url}", *common,
                             "serve.on_teacher_down=student")) as url:
            fallback_headers, fallback_reply = _ask(_client(url), "Another unlabelled ticket.")
    message = _error(refused, 503, "teacher_budget")
    assert "serve.teacher_budget_usd_per_day=0.5" in message and int(refused.headers["retry-after"]) > 0
    assert free_headers["x-distill-route"] == "teacher"
    assert json.loads(free_reply.choices[0].message.content) == labelled["teacher"]
    assert (fallback_headers["x-distill-route"], fallback_headers["x-distill-reason"]) == ("student", "teacher_budget")
    assert json.loads(fallback_reply.choices[0].message.content) == CONFIDENT
    assert len(teacher.calls) == before + 1


# ---------------------------------------------------------------------------------------------------------------
# several runs, and the embedding classifier in process


def _retask(run_dir: Path, name: str) -> None:
    """Give a copied run's routing rule another task name (a second task served beside the first)."""
    path = paths.stage_dir(run_dir, "publish") / paths.ROUTING
    rule = load_rule(path)
    rule.task.id = name
    rule.task.match.model_aliases = [name]
    rule.task.match.metadata = {"distill_task": name}
    path.write_text(yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))


def test_several_run_dirs_serve_their_tasks_side_by_side(published, teacher, tmp_path):
    from distill.serve.command import load_serve_configs

    run_a = _copy(published, tmp_path / "a", threshold=0.9)
    run_b = _copy(published, tmp_path / "b", threshold=0.99)
    _retask(run_b, "tickets_b")
    with FakeStudent(_answers({}, default=(CONFIDENT, 0.95))) as student:
        cfgs = load_serve_configs([f"run_dir={run_a}", f"run_dir={run_b}", "serve.port=0",
                                   f"serve.student_endpoint={student.base_url}"])
        with background(cfgs) as url:
            client = _client(url)
            models = [m.id for m in client.models.list().data]
            a, _ = _ask(client, NEW_TICKET)
            b, _ = _ask(client, NEW_TICKET, model="tickets_b")
            by_meta, _ = _ask(client, NEW_TICKET, model="anything", metadata={"distill_task": "tickets_b"})
            health = httpx.get(url.removesuffix("/v1") + "/healthz").json()
    assert [Path(c.run_dir) for c in cfgs] == [run_a, run_b]
    assert models == [TASK, "tickets_b", "fake-teacher"]
    assert (a["x-distill-route"], a["x-distill-reason"]) == ("student", "confident")        # threshold 0.9
    assert (b["x-distill-route"], b["x-distill-reason"]) == ("teacher", "below_threshold")  # threshold 0.99
    assert by_meta["x-distill-reason"] == "below_threshold"
    assert set(health["tasks"]) == {TASK, "tickets_b"}
    with pytest.raises(DistillError, match="names the same run twice"):
        load_serve_configs([f"run_dir={run_a}", f"run_dir={run_a}"])
    from distill.serve.command import prepare

    twin = _copy(published, tmp_path / "twin")
    with pytest.raises(DistillError, match="both serve the model 'support_tickets'"):
        with prepare(load_serve_configs([f"run_dir={run_a}", f"run_dir={twin}",
                                         f"serve.student_endpoint={student.base_url}"])):
            pass


def test_the_embedding_classifier_is_served_in_process_with_its_heads_confidence(published, teacher, tmp_path):
    from distill.config import HeadConfig
    from distill.data import embed
    from distill.student import embed_classifier as ec

    run_dir = _copy(published, tmp_path)
    pub = paths.stage_dir(run_dir, "publish")
    cfg = _cfg(run_dir)
    from distill.task import Task

    task_enums = Task(cfg).schema.enums
    train, val = _split(run_dir, "train"), _split(run_dir, "val")
    encoder = embed.model_dir()
    meta = {"format": ec.FORMAT, "version": ec.FORMAT_VERSION,
            "encoder": {"name": encoder.name, "source": "package", "pooling": ec.POOLING, "max_seq_len": 128,
                        "sha256": runio.sha256_file(encoder / ec.ENCODER_WEIGHTS)}}
    clf = ec.EmbedClassifier(encoder, {}, meta)
    heads, _ = ec.fit_heads(clf.embed([r["input"] for r in train]), [r["teacher"] for r in train],
                            clf.embed([r["input"] for r in val]), [r["teacher"] for r in val], task_enums,
                            HeadConfig(c_grid=[1.0]))
    shutil.rmtree(pub / paths.MODEL_DIR)
    shutil.copytree(encoder, pub / paths.MODEL_DIR / paths.ENCODER_DIR)
    ec.EmbedClassifier(encoder, heads, meta).save(pub / paths.MODEL_DIR / paths.HEAD_DIR)
    published_clf = ec.EmbedClassifier.load_published(pub / paths.MODEL_DIR)
    texts = [r["input"] for r in _split(run_dir, "test")]
    scored = sorted(zip((c for _, c, _ in published_clf.predict(texts)), texts))
    (low_conf, low), (high_conf, high) = scored[0], scored[-1]
    assert low_conf < high_conf
    path = pub / paths.ROUTING
    rule = load_rule(path)
    rule.student = rule.student.model_copy(update={"kind": "embed_classifier", "stop": [], "max_tokens": None,
                                                   "artifacts": {"safetensors-embed_classifier": paths.MODEL_DIR}})
    rule.route = RouteSpec(enabled=True, confidence_threshold=round((low_conf + high_conf) / 2, 6),
                           target_agreement=0.9, expected_coverage=0.5, reason="forced by the test")
    path.write_text(yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))
    with background(cfg) as url:  # no student_endpoint, no runtime: the heads answer in the gateway
        client = _client(url)
        before = len(teacher.calls)
        kept, kept_reply = _ask(client, high)
        fell, _ = _ask(client, low)
        health = httpx.get(url.removesuffix("/v1") + "/healthz").json()
    assert not list((run_dir / "serve").glob("student_runtime.log"))
    assert (kept["x-distill-route"], kept["x-distill-reason"]) == ("student", "confident")
    assert float(kept["x-distill-confidence"]) == pytest.approx(high_conf, rel=1e-5)
    assert json.loads(kept_reply.choices[0].message.content) == published_clf.predict([high])[0][0]
    assert (fell["x-distill-route"], fell["x-distill-reason"]) == ("teacher", "below_threshold")
    assert float(fell["x-distill-confidence"]) == pytest.approx(low_conf, rel=1e-5)
    assert len(teacher.calls) == before  # test items are in generate's ledger
    assert health["student"]["reachable"] is True


def test_a_gateway_that_cannot_start_says_why_and_closes_what_it_opened(published, tmp_path, monkeypatch):
    """A Redis that is not there stops serve before any child server starts; any other start-up failure is named
    in serve's error (not "could not listen ... in use?"), and what the failed start opened is closed."""
    from distill.serve import command, hub

    prepare = command.prepare

    def no_children(cfgs):
        raise AssertionError("prepare() started child servers for a gateway whose store is down")

    monkeypatch.setattr(command, "prepare", no_children)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    cfg = load_serve_config([f"run_dir={published}", "serve.store=redis", f"serve.redis_url=redis://127.0.0.1:{port}/0"])
    with pytest.raises(DistillError, match=f"cannot reach Redis at redis://127.0.0.1:{port}/0"):
        command.serve(cfg)

    monkeypatch.setattr(command, "prepare", prepare)
    opened = []
    real_open = hub.Gateway.open

    async def failing_open(self):
        await real_open(self)
        opened.append(self.session)
        raise DistillError("the ledger is on a read-only disk")

    monkeypatch.setattr(hub.Gateway, "open", failing_open)
    run_dir = _copy(published, tmp_path)
    with FakeStudent(_answers({})) as student:
        with pytest.raises(DistillError) as failed:
            command.serve(_cfg(run_dir, f"serve.student_endpoint={student.base_url}"))
    assert str(failed.value) == "the gateway did not start: the ledger is on a read-only disk"
    assert opened and opened[0].closed


def test_a_taken_port_fails_in_a_second_before_any_child_server_starts(published, tmp_path, monkeypatch):
    from distill.serve import command

    def no_children(cfgs):
        raise AssertionError("prepare() started child servers for a gateway that cannot listen")

    monkeypatch.setattr(command, "prepare", no_children)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_serve_config([f"run_dir={published}", f"serve.port={port}"])
        with pytest.raises(DistillError, match=f"serve.port={port} on 127.0.0.1 is already in use"):
            command.serve(cfg)
    cfg = load_serve_config([f"run_dir={published}", "serve.host=192.0.2.1"])  # TEST-NET-1: no interface has it
    with pytest.raises(DistillError, match="serve.host=192.0.2.1 is not an address of this machine"):
        command.serve(cfg)
