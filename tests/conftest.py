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
