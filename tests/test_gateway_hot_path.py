"""The gateway's kept path: one schema check per answer, the event loop and HTTP parser it runs on, the collector
settings of a gateway process (the traffic log's batching is tested in test_loop.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from conftest import REPO

from distill import routing
from distill.config import load_config
from distill.serve.command import _uvicorn_config
from distill.task import OutputSchema, Task

KEPT = {"category": "billing", "priority": "high"}


def _rule(task: Task) -> routing.RoutingRule:
    return routing.RoutingRule(
        task=routing.TaskSpec(id="support_tickets", match=routing.Match(model_aliases=["support_tickets"]),
                              output_schema=task.schema.schema),
        student=routing.StudentSpec(model="s", endpoint="http://127.0.0.1:1/v1", artifacts={}, stop=["<|im_end|>"],
                                    max_tokens=48),
        fallback=routing.FallbackSpec(model="t", endpoint="http://127.0.0.1:2/v1"),
        route=routing.RouteSpec(enabled=True, confidence_threshold=0.9, target_agreement=0.98,
                                expected_coverage=1.0, reason="test"),
        cost=routing.CostSpec(), evidence=routing.Evidence(results_sha256="0" * 64, curve="val_coverage_curve"))


def test_a_kept_answer_is_schema_checked_once_not_again_in_decide(monkeypatch):
    import distill.serve.student as student_mod
    from distill.serve.gateway import TaskRoute
    from distill.serve.metrics import Metrics

    cfg = load_config(["recipe=support_tickets"])
    task = Task(cfg)
    checks = []
    real = OutputSchema.errors
    monkeypatch.setattr(OutputSchema, "errors", lambda self, answer: checks.append(answer) or real(self, answer))
    replies = iter([KEPT, KEPT, KEPT, {"category": "weather", "priority": "high"}])

    async def post(session, url, body, timeout):
        return {"answer": next(replies), "confidence": 0.97, "invalid_reason": None, "text": ""}

    monkeypatch.setattr(student_mod, "_post", post)
    student = student_mod.ScoredStudent("http://127.0.0.1:1/v1", task, max_new_tokens=48, timeout_s=1, session=None)
    route = TaskRoute(cfg, _rule(task), task, student, teacher=None, metrics=Metrics())
    request = {"model": "support_tickets"}
    served = [asyncio.run(route._answer(request, f"ticket {i}")) for i in range(3)]
    assert [(s.route, s.reason, s.answer) for s in served] == [("student", "confident", KEPT)] * 3
    assert checks == [KEPT]  # the student client's check, remembered; decide did not validate it again
    reply, _ = asyncio.run(route._ask_student("ticket 4"))  # an answer the schema rejects reaches decide as None
    assert reply.answer is None and reply.invalid_reason == "schema_violation"
    assert routing.decide(route.rule, request, reply.answer, reply.confidence, checked=True).reason == \
        "invalid_answer"


def test_the_gateway_runs_on_uvloop_and_httptools():
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = _uvicorn_config(lambda scope, receive, send: None, load_config(["recipe=support_tickets"]), 0)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_tune_for_good_freezes_the_start_up_heap_and_raises_the_young_threshold():
    # in a child process: the collector settings are process-wide, and a test process must keep its own
    code = ("import gc; import distill.serve.app; from distill.collector import GC_GEN0, tune_for_good; "
            "before = gc.get_threshold(); tune_for_good(); "
            "print(gc.get_freeze_count(), gc.get_threshold()[0] == GC_GEN0, gc.get_threshold()[1:] == before[1:])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    frozen, gen0, older = out.split()
    assert int(frozen) > 10_000 and gen0 == "True" and older == "True"  # the imported modules' objects, at least
