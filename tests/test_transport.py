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
