"""The answer schema, input loading, the ledger and fingerprints."""

from __future__ import annotations

import json

import pytest

from distill import paths, runio
from distill.config import load_config
from distill.ledger import Ledger, request_key
from distill.pipeline import _slice
from distill.stages.generate import assign_split
from distill.task import OutputSchema, Task

SCHEMA = {"type": "object", "properties": {"category": {"type": "string", "enum": ["a", "b"]},
                                           "priority": {"type": "string", "enum": ["low", "high"]}},
          "required": ["category", "priority"], "additionalProperties": False}


def test_schema_parse_outcomes():
    s = OutputSchema(SCHEMA)
    assert s.parse('{"category": "a", "priority": "low"}') == ({"category": "a", "priority": "low"}, None)
    assert s.parse('```json\n{"category": "b", "priority": "high"}\n```')[0] == {"category": "b", "priority": "high"}
    assert s.parse("not json at all") == (None, "invalid_json")
    assert s.parse('{"category": "c", "priority": "low"}') == (None, "schema_violation")
    assert s.parse('{"category": "a"}') == (None, "schema_violation")
    assert s.parse("") == (None, "empty")
    assert s.enums == {"category": ["a", "b"], "priority": ["low", "high"]}


def test_response_format_dialects():
    s = OutputSchema(SCHEMA)
    assert s.response_format("json_schema")["type"] == "json_schema"
    assert s.response_format("json_schema")["json_schema"]["schema"] == SCHEMA
    assert s.response_format("llama_cpp") == {"type": "json_object", "schema": SCHEMA}
    assert s.response_format("guided_json") is None and s.extra_body("guided_json") == {"guided_json": SCHEMA}


def test_bad_input_lines_are_skipped_and_counted(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": "1", "text": "hello"}\nthis is not json\n{"id": "2", "text": ""}\n'
                      '{"id": "1", "text": "dup"}\n{"id": "3", "text": "ok", "gold": {"category": "zzz"}}\n')
    cfg = load_config([f"recipe.inputs={inputs}", f"run_dir={tmp_path}"])
    report = Task(cfg).load_inputs()
    assert [e.id for e in report.examples] == ["1", "3"]
    assert report.examples[1].gold is None  # a gold label that breaks the schema is dropped, not trusted
    assert sum(report.skipped.values()) == 3
    assert any("not valid JSON" in k for k in report.skipped)


def test_teacher_prompt_keeps_static_text_first(tmp_path):
    task = Task(load_config([f"run_dir={tmp_path}"]))
    a, b = task.teacher_messages("first ticket"), task.teacher_messages("second ticket")
    assert a[:-1] == b[:-1] and a[-1]["content"] == "first ticket"
    assert len(a) == 2 + 2 * len(task.few_shot)


def test_ledger_records_and_summarises(tmp_path):
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    key = request_key(request)
    assert key == request_key(json.loads(json.dumps(request)))  # canonical: key order does not matter
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert ledger.get(key) is None
        ledger.record_success(key, "m", request, '{"a": 1}', prompt_tokens=10, completion_tokens=2, cost_usd=0.5)
        ledger.record_success(key, "m", request, '{"a": 1}', prompt_tokens=10, completion_tokens=2, cost_usd=0.5)
        ledger.record_failure("other", "invalid_json", "zzz", cost_usd=0.1)
        assert ledger.count() == 1
        assert ledger.get(key)["response"] == '{"a": 1}'
        summary = ledger.summary()
    assert summary["successful_calls"] == 1 and summary["failures"] == {"invalid_json": 1}
    assert summary["cost_usd"] == pytest.approx(0.6)
    with Ledger(tmp_path / "l.sqlite") as ledger:  # survives reopening
        assert ledger.count() == 1


def test_fingerprint_slices_follow_what_each_stage_reads(tmp_path):
    base = load_config([f"run_dir={tmp_path}"])
    more_steps = load_config([f"run_dir={tmp_path}", "train.max_steps=99"])
    faster = load_config([f"run_dir={tmp_path}", "teacher.concurrency=8"])
    other_teacher = load_config([f"run_dir={tmp_path}", "teacher.temperature=0.5"])
    fp = lambda cfg, stage: runio.sha256_obj(_slice(cfg, stage))  # noqa: E731
    assert fp(base, "generate") == fp(more_steps, "generate")
    assert fp(base, "train") != fp(more_steps, "train")
    assert fp(base, "generate") == fp(faster, "generate")
    assert fp(base, "generate") != fp(other_teacher, "generate")


def test_splits_are_deterministic_and_roughly_proportional():
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    texts = [f"ticket number {i}" for i in range(2000)]
    first = [assign_split(t, fractions, 0) for t in texts]
    assert first == [assign_split(t, fractions, 0) for t in texts]
    assert assign_split("Hello  World", fractions, 0) == assign_split("hello world", fractions, 0)
    share = {s: first.count(s) / len(first) for s in paths.SPLITS}
    assert abs(share["train"] - 0.7) < 0.04 and abs(share["test"] - 0.2) < 0.04


def test_done_json_is_atomic_and_trusted_only_when_complete(tmp_path):
    assert runio.read_done(tmp_path, "train") is None
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / paths.DONE).write_text('{"fingerprint": "ab')  # torn write
    assert runio.read_done(tmp_path, "train") is None
    runio.write_done(tmp_path, "train", "abc", {"steps": 1})
    assert runio.read_done(tmp_path, "train")["fingerprint"] == "abc"
