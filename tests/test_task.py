"""The answer schema, input loading, the ledger and fingerprints."""

from __future__ import annotations

import json

import pytest

from distill import paths, runio
from distill.config import load_config
from distill.ledger import Ledger, request_key
from distill.pipeline import _slice
from distill.data.split import assign_split
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


def test_a_utf8_bom_keeps_the_first_jsonl_row_and_the_csv_header(tmp_path):
    rows = [{"id": "1", "text": "first"}, {"id": "2", "text": "second"}]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    report = Task(load_config([f"recipe.inputs={jsonl}", f"run_dir={tmp_path}"])).load_inputs()
    assert [e.id for e in report.examples] == ["1", "2"] and not report.skipped
    csv_file = tmp_path / "in.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfid,text\r\n1,first\r\n2,second\r\n")
    report = Task(load_config([f"recipe.inputs={csv_file}", f"run_dir={tmp_path}"])).load_inputs()
    assert [(e.id, e.text) for e in report.examples] == [("1", "first"), ("2", "second")]


def test_input_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    from distill import DistillError

    jsonl = tmp_path / "in.jsonl"
    head = b'{"id": "1", "text": "first"}\n'
    jsonl.write_bytes(head + b'{"id": "2", "text": "caf\xe9"}\n')
    with pytest.raises(DistillError) as err:
        Task(load_config([f"recipe.inputs={jsonl}", f"run_dir={tmp_path}"])).load_inputs()
    offset = len(head) + head.index(b'"first') + 1  # the same position on line 2: 'caf' starts where 'firs' did
    assert str(jsonl) in str(err.value) and "line 2" in str(err.value) and f"byte offset {offset + 3}" in str(err.value)
    assert "UTF-8" in str(err.value)
    csv_file = tmp_path / "in.csv"
    csv_file.write_bytes(b"id,text\n1,first\n2,caf\xe9\n")
    with pytest.raises(DistillError) as err:
        Task(load_config([f"recipe.inputs={csv_file}", f"run_dir={tmp_path}"])).load_inputs()
    assert str(csv_file) in str(err.value) and "line 3" in str(err.value) and "byte offset 21" in str(err.value)


def test_recipe_text_files_that_are_not_utf8_are_named(tmp_path):
    from distill import DistillError

    for name, data in (("teacher_prompt.md", b"Label the ticket.\nCaf\xe9\n"),
                       ("few_shot.jsonl", b'{"text": "caf\xe9", "label": {"category": "billing"}}\n')):
        target = tmp_path / name
        target.write_bytes(data)
        key = name.split(".")[0]
        with pytest.raises(DistillError) as err:
            Task(load_config([f"recipe.{key}={target}", f"run_dir={tmp_path}"]))
        assert str(target) in str(err.value) and "line" in str(err.value) and "byte offset" in str(err.value)
    bom_prompt = tmp_path / "bom_prompt.md"
    bom_prompt.write_bytes(b"\xef\xbb\xbfLabel the ticket.")
    assert Task(load_config([f"recipe.teacher_prompt={bom_prompt}", f"run_dir={tmp_path}"])).teacher_system == \
        "Label the ticket."


def test_integer_and_boolean_enums_are_scored_by_their_json_text():
    from distill.teacher.scoring import few_shot_log_prior, value_scores

    schema = OutputSchema({"type": "object", "properties": {"stars": {"type": "integer", "enum": [1, 2, 3]},
                                                            "reply": {"type": "boolean", "enum": [True, False]}}})
    assert schema.enums == {"stars": [1, 2, 3], "reply": [True, False]} and schema.enum_problem() is None
    scores = value_scores([("2", -0.1), ("3", -2.0)], [1, 2, 3])
    assert scores[1] == -0.1 and scores[2] == -2.0 and scores[0] < -2.0
    assert value_scores([(" true", -0.2)], [True, False])[0] == -0.2
    prior = few_shot_log_prior(["2", "2", "True"], [1, 2, 3])
    assert prior[1] > prior[0] == prior[2]
    assert few_shot_log_prior(["True", "true"], [True, False])[0] > few_shot_log_prior(["True"], [True, False])[1]


@pytest.mark.parametrize("enum,problem", [([], "empty enum"), ([1, "1"], "read the same"),
                                          ([{"a": 1}, 2], "not a string, number")])
def test_enums_that_cannot_be_scored_are_refused_with_the_field(tmp_path, enum, problem):
    from distill import DistillError

    cfg = load_config(["recipe.few_shot=null", f"run_dir={tmp_path}"])
    cfg.recipe.output_schema = {"type": "object", "properties": {"stars": {"enum": enum}}}
    with pytest.raises(DistillError, match=f"output_schema field 'stars'.*{problem}"):
        Task(cfg)
