"""Shared fixtures. Tests never reach beyond 127.0.0.1: teachers are fake servers or llama.cpp on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "distill" / "conf" / "recipe" / "support_tickets"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gold_by_text() -> dict[str, dict]:
    """Gold labels of the shipped support tickets, keyed by text: the fake teacher answers with them."""
    rows = [json.loads(line) for line in (RECIPE_DIR / "inputs.jsonl").read_text().splitlines() if line.strip()]
    return {r["text"]: r["gold"] for r in rows}


@pytest.fixture(scope="session")
def fake_answer(gold_by_text):
    """An answer function for FakeTeacher: the gold label of the ticket in the last user message."""

    def answer(messages: list[dict]) -> str:
        text = messages[-1]["content"]
        return json.dumps(gold_by_text.get(text, {"category": "feedback", "priority": "low"}))

    return answer


def tiny_overrides(run_dir: Path, base_url: str, *extra: str) -> list[str]:
    """Config for a whole pipeline on the tiny random student and an OpenAI-compatible fake teacher."""
    return [f"run_dir={run_dir}", "profile=smoke", "student=tiny_random", "teacher=openai",
            f"teacher.base_url={base_url}", "teacher.model=fake-teacher", "teacher.api_key_env=null",
            "teacher.concurrency=4", "train.max_steps=2", "train.save_steps=1", "train.batch_size=4",
            "eval.limit=4", "eval.max_new_tokens=8", "generate.limit=24", *extra]


def cfg_for(overrides: list[str]):
    return load_config(overrides)


def publish_tiny(run_dir: Path, base_url: str, *extra: str) -> Path:
    """A whole tiny pipeline (generate through publish) into ``run_dir``, labelled by the teacher at ``base_url``."""
    from distill import pipeline

    pipeline.run(load_config(tiny_overrides(run_dir, base_url, *extra)))
    return run_dir


def wait_healthy(proc, base: str, timeout_s: float = 300) -> None:
    """Wait until the ``python -m distill serve`` subprocess ``proc`` answers 200 on ``{base}/healthz``."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the gateway exited: {proc.communicate()[1][-3000:]}"
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not become healthy"
        time.sleep(0.2)


def set_route(run_dir: Path, threshold: float) -> None:
    """Enable a published run's route at ``threshold``, whatever publish decided."""
    import yaml

    from distill import paths
    from distill.routing import RouteSpec, load_rule

    path = paths.stage_dir(run_dir, "publish") / paths.ROUTING
    rule = load_rule(path)
    rule.route = RouteSpec(enabled=True, confidence_threshold=threshold, target_agreement=0.98,
                           expected_coverage=0.5, expected_agreement=0.98, reason="forced by the test")
    path.write_text(yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))


def copy_with_route(published: Path, dest: Path, threshold: float | None = None) -> Path:
    """A copy of a published run (its own ledger); ``threshold`` enables its route at that confidence."""
    import shutil

    shutil.copytree(published, dest, ignore=shutil.ignore_patterns("checkpoints"))
    if threshold is not None:
        set_route(dest, threshold)
    return dest


@pytest.fixture(scope="module")
def teacher(fake_answer):
    """A fake teacher for one test module, alive for all its tests (its URL is part of every ledger key)."""
    from distill.testing.fake_teacher import FakeTeacher

    with FakeTeacher(fake_answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def published(teacher, tmp_path_factory, request):
    """A tiny published run labelled by the module's ``teacher``; the module's ``PUBLISH_EXTRA`` overrides add to
    the tiny config (e.g. which GGUFs to build)."""
    extra = getattr(request.module, "PUBLISH_EXTRA", ())
    return publish_tiny(tmp_path_factory.mktemp(request.module.__name__) / "run", teacher.base_url, *extra)
