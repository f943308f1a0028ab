"""The teacher client's HTTP transport: what a fresh install gets (aiohttp), that its calls really go through it,
that the choice is logged and recorded in generate's summary, and that a fallback to httpx names its reason."""

from __future__ import annotations

import asyncio
import builtins
import json
import logging

import openai
import pytest

from conftest import tiny_overrides
from distill import paths, pipeline
from distill.config import load_config
from distill.ledger import Ledger
from distill.task import Task
from distill.teacher import client as client_module
from distill.teacher.client import TeacherClient
from distill.teacher.transport import http_client
from distill.testing.fake_teacher import FakeTeacher
from test_generate import answer, make_recipe


def _client(tmp_path, base_url: str) -> TeacherClient:
    cfg = load_config(tiny_overrides(tmp_path / "run", base_url))
    return TeacherClient(cfg.teacher, base_url, Task(cfg).schema, Ledger(tmp_path / "ledger.sqlite"))


def test_a_fresh_install_sends_every_teacher_call_through_aiohttp(tmp_path, monkeypatch, caplog):
    import aiohttp

    client_module._logged_transports.clear()
    sent = []
    real_request = aiohttp.ClientSession._request

    def counting(self, method, url, *args, **kwargs):
        sent.append((method, str(url)))
        return real_request(self, method, url, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", counting)
    body = {"model": "fake-teacher", "max_tokens": 12, "messages": [{"role": "user", "content": "my invoice"}]}
    with FakeTeacher(answer) as teacher, caplog.at_level(logging.INFO, logger="distill"):
        async def go():
            client = _client(tmp_path, teacher.base_url)
            try:
                return client, await client._send(body)
            finally:
                await client.close()

        client, (resp, _latency) = asyncio.run(go())
    assert client.transport == f"aiohttp {aiohttp.__version__} (openai {openai.__version__})"
    assert isinstance(client.client._client, openai.DefaultAioHttpClient)
    assert resp["choices"][0]["message"]["content"]
    assert len(teacher.calls) == 1
    assert [m for m, url in sent] == ["POST"] and sent[0][1].endswith("/chat/completions")
    said = [r.getMessage() for r in caplog.records if "teacher client: transport" in r.getMessage()]
    assert said == [f"teacher client: transport {client.transport}"]


def test_without_aiohttp_the_client_falls_back_to_httpx_and_says_why(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_aiohttp(name, *args, **kwargs):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_aiohttp)
    http, name = http_client(30)
    assert http is None
    assert name == "httpx (fallback: aiohttp is not installed; pip install 'openai[aiohttp]')"

    client_module._logged_transports.clear()
    with FakeTeacher(answer) as teacher, caplog.at_level(logging.INFO, logger="distill"):
        async def go():
            client = _client(tmp_path, teacher.base_url)
            try:
                await client._send({"model": "fake-teacher", "messages": [{"role": "user", "content": "x"}]})
                return client
            finally:
                await client.close()

        client = asyncio.run(go())
    assert client.transport == name
    assert not isinstance(client.client._client, openai.DefaultAioHttpClient)  # the SDK's own httpx pool
    assert len(teacher.calls) == 1
    warned = [r for r in caplog.records if "teacher client: transport" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in warned] == [(logging.WARNING, f"teacher client: transport {name}")]


def test_an_sdk_whose_aiohttp_extra_is_incomplete_is_named_as_the_reason(monkeypatch):
    class Missing:  # what the SDK puts in place of its aiohttp client when httpx_aiohttp cannot be imported
        def __init__(self, **_kwargs):
            raise RuntimeError("To use the aiohttp client you must have installed the package with the `aiohttp` "
                               "extra")

    monkeypatch.setattr(openai, "DefaultAioHttpClient", Missing)
    assert http_client(30) == (None, "httpx (fallback: To use the aiohttp client you must have installed the "
                                     "package with the `aiohttp` extra)")
    monkeypatch.delattr(openai, "DefaultAioHttpClient")
    http, name = http_client(30)
    assert http is None and name.startswith(f"httpx (fallback: openai {openai.__version__} has no aiohttp client")


def test_generate_records_the_transport_in_its_summary(tmp_path):
    import aiohttp

    recipe_dir = make_recipe(tmp_path / "recipes", 6)
    with FakeTeacher(answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, f"recipe_dir={recipe_dir}"))
        summary = pipeline.run(cfg, stages=("generate",))["generate"]
    done = json.loads((paths.stage_dir(tmp_path / "run", "generate") / paths.DONE).read_text())
    expected = f"aiohttp {aiohttp.__version__} (openai {openai.__version__})"
    assert summary["teacher"]["transport"] == expected
    assert expected in json.dumps(done)
    assert len(teacher.calls) >= 6


def test_one_ctrl_c_stops_labelling_even_when_the_cancellation_is_swallowed(monkeypatch):
    """asyncio turns Ctrl-C into a cancellation of the main task; a library that swallows it must not keep the run
    paying: nothing more is sent and the run still ends with KeyboardInterrupt."""
    import asyncio
    import os
    import signal
    from types import SimpleNamespace

    from distill.teacher import labelling

    sent: list[int] = []

    async def label_all_that_swallows(client, messages, budget):
        for i in range(len(messages)):
            if client.fatal:
                break
            sent.append(i)
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, during the second call
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass  # what some client libraries do with a cancellation
        return [None] * len(messages)

    async def nothing(*args, **kwargs):
        return None

    monkeypatch.setattr(labelling, "label_all", label_all_that_swallows)
    monkeypatch.setattr(labelling, "probe", nothing)
    client = SimpleNamespace(fatal=False, close=nothing)
    cfg = SimpleNamespace(generate=SimpleNamespace(mode="online"))
    requests = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(labelling.teach(client, cfg, None, "generate", [], requests, None, None, None))
    assert sent == [0, 1] and client.fatal is True


def test_answers_of_one_loop_turn_share_a_commit_and_none_is_handed_on_before_its_row_is_in_the_file(tmp_path):
    """Group commit: 48 calls in flight at once are claimed and recorded in far fewer transactions than writes, and
    every answer ``label`` returns is already readable by another connection (another process) at that moment."""
    import sqlite3

    from distill.ledger import grouped
    from distill.ledger.store import request_key as key_of

    messages = [[{"role": "user", "content": f"ticket {i}: my invoice is wrong"}] for i in range(48)]
    with FakeTeacher(answer, latency_s=0.05) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.concurrency=48"))
        ledger = Ledger(tmp_path / "ledger.sqlite")
        seen_in_file: list[bool] = []

        async def go():
            client = TeacherClient(cfg.teacher, teacher.base_url, Task(cfg).schema, ledger)

            async def one(m):
                outcome = await client.label(m)
                with sqlite3.connect(tmp_path / "ledger.sqlite") as other:  # what a kill -9 right now would leave
                    seen_in_file.append(other.execute("SELECT COUNT(*) FROM calls WHERE key = ?",
                                                      (outcome.key,)).fetchone()[0] == 1)
                return outcome

            try:
                return await asyncio.gather(*(one(m) for m in messages)), grouped(ledger)
            finally:
                await client.close()

        outcomes, group = asyncio.run(go())
    assert [o.answer for o in outcomes] == [json.loads(answer(m)) for m in messages]
    assert seen_in_file == [True] * 48
    assert outcomes[0].key == key_of(client_request(cfg, messages[0]))
    assert group.writes == 96  # a claim and a record per call
    assert group.commits <= 49, (group.commits, group.writes)  # the 48 claims of the first turn: one transaction
    assert ledger.count() == 48 and sum(teacher.paid.values()) == 48
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # the row keeps the canonical request it was keyed by
        stored = db.execute("SELECT request FROM calls WHERE key = ?", (outcomes[0].key,)).fetchone()[0]
    assert json.loads(stored) == client_request(cfg, messages[0])


def client_request(cfg, messages):
    from distill.teacher.request import build_chat_request

    return build_chat_request(cfg.teacher, Task(cfg).schema, messages, 0, None)


def test_the_fast_benchmark_server_answers_the_client_as_a_chat_completion(tmp_path):
    from distill.testing.fast_teacher import FastTeacher

    messages = [[{"role": "user", "content": f"ticket {i}"}] for i in range(20)]
    with FastTeacher(answer, latency_s=0.01) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.concurrency=8"))

        async def go():
            client = TeacherClient(cfg.teacher, teacher.base_url, Task(cfg).schema, Ledger(tmp_path / "l.sqlite"))
            try:
                return await asyncio.gather(*(client.label(m) for m in messages))
            finally:
                await client.close()

        outcomes = asyncio.run(go())
        calls = teacher.calls
    assert [o.answer for o in outcomes] == [json.loads(answer(m)) for m in messages]
    assert calls == 20 and all(o.paid_calls == 1 for o in outcomes)


def test_writes_queued_in_one_turn_are_one_transaction_and_a_failed_one_fails_them_all(tmp_path):
    from distill import LedgerWriteError
    from distill.ledger import grouped

    ledger = Ledger(tmp_path / "l.sqlite")

    async def go(n: int):
        group = grouped(ledger)
        await asyncio.gather(*(group.add(("success", (f"k{i}", "m", {"i": i}, "{}"), {"cost_usd": 0.5}))
                               for i in range(n)))
        return group.commits, group.writes

    assert asyncio.run(go(10)) == (1, 10)
    assert ledger.count() == 10 and ledger.spent() == 5.0
    ledger.db.execute("CREATE TRIGGER no_more BEFORE INSERT ON calls BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(LedgerWriteError, match="disk full"):
        asyncio.run(go(3))
    assert ledger.count() == 10  # none of the failed group's rows is in the file


def test_the_direct_transport_raises_what_the_sdk_raises_so_the_retry_rules_read_it_the_same(tmp_path):
    """A 429 comes back as the SDK's RateLimitError with the server's Retry-After; a refused connection is a
    connection error that was never billed; a truncated 200 is a malformed response (resent, possibly billed)."""
    from distill.teacher.transport import DirectPost, failure_reason, possibly_billed, retry_after_s
    from distill.teacher.server import free_port

    async def post(base_url: str):
        direct = DirectPost(openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0), 5)
        try:
            return await direct(b'{"model": "fake-teacher", "messages": [{"role": "user", "content": "x"}]}')
        except Exception as exc:
            return exc
        finally:
            await direct.close()

    with FakeTeacher(answer, faults={"429": 1.0}, retry_after_s=7) as teacher:
        limited = asyncio.run(post(teacher.base_url))
    with FakeTeacher(answer, faults={"malformed_body": 1.0}) as teacher:
        cut = asyncio.run(post(teacher.base_url))
    refused = asyncio.run(post(f"http://127.0.0.1:{free_port()}/v1"))
    assert isinstance(limited, openai.RateLimitError) and limited.status_code == 429
    assert retry_after_s(limited) == 7 and failure_reason(limited) == "http_429" and not possibly_billed(limited)
    assert "Rate limit reached" in limited.message
    assert isinstance(refused, openai.APIConnectionError) and failure_reason(refused) == "connection_error"
    assert not possibly_billed(refused)
    assert failure_reason(cut) == "malformed_response" and possibly_billed(cut)


def test_the_retry_layer_makes_max_retries_more_attempts_each_waiting_longer_and_counts_every_failure(
        tmp_path, monkeypatch):
    import httpx

    from distill.teacher.transport import RequestFailed

    waits: list[float] = []

    async def no_sleep(delay, *args, **kwargs):
        waits.append(delay)

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def status(code: int) -> openai.APIStatusError:
        return openai.APIStatusError("injected", response=httpx.Response(code, request=request), body=None)

    def run(failures: list[Exception], **teacher) -> tuple[list[int], object, TeacherClient]:
        cfg = load_config(tiny_overrides(tmp_path / "run", "http://127.0.0.1:9/v1", "teacher.backoff_initial_s=0.1",
                                         "teacher.backoff_max_s=100",
                                         *(f"teacher.{k}={v}" for k, v in teacher.items())))
        client = TeacherClient(cfg.teacher, cfg.teacher.base_url, Task(cfg).schema, Ledger(tmp_path / "l.sqlite"))
        calls: list[int] = []

        async def attempt():
            calls.append(len(calls) + 1)
            if len(calls) <= len(failures):
                raise failures[len(calls) - 1]
            return "answer"

        async def go():
            try:
                return await client.retrying(attempt)
            except RequestFailed as exc:
                return exc
            finally:
                await client.close()

        return calls, asyncio.run(go()), client

    # two 503s then an answer: three attempts, two counted failures, two waits that grow
    calls, result, client = run([status(503), status(503)], max_retries=5)
    assert result == "answer" and calls == [1, 2, 3] and len(waits) == 2 and waits[1] > waits[0] > 0
    assert sum(client.transport_errors.values()) == 2
    # always failing: 1 + max_retries attempts, every failure counted (the last one too), then RequestFailed
    waits.clear()
    calls, result, client = run([status(500)] * 10, max_retries=3)
    assert isinstance(result, RequestFailed) and len(calls) == 4 and len(waits) == 3
    assert sum(client.transport_errors.values()) == 4
    # no retries allowed: one attempt, no wait
    waits.clear()
    calls, result, client = run([status(500)] * 10, max_retries=0)
    assert isinstance(result, RequestFailed) and len(calls) == 1 and waits == []
    # a 400 is never retried, and not counted as a transport error
    calls, result, client = run([status(400)] * 10, max_retries=5)
    assert isinstance(result, RequestFailed) and len(calls) == 1 and not client.transport_errors


def test_the_labelling_loop_runs_with_fewer_collections_and_gives_the_settings_back():
    import gc

    from types import SimpleNamespace

    from distill.collector import GC_GEN0
    from distill.teacher.labelling import label_all

    seen = []

    class _Client:
        fatal = False

        class tcfg:
            concurrency = 2

        async def label(self, messages):
            seen.append((gc.get_threshold()[0], gc.get_freeze_count() > 0))
            return messages[0]["content"]

    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    got = asyncio.run(label_all(_Client(), [[{"role": "user", "content": str(i)}] for i in range(3)],
                                SimpleNamespace(spent_this_run=0.0)))
    assert got == ["0", "1", "2"] and seen == [(GC_GEN0, True)] * 3
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen_before
