"""Bad input gets one line on stderr and exit 2, never a traceback, and never echoes a secret: keys in place of
environment-variable names, keys given as settings, keys with stray whitespace, HTTP loggers at DEBUG, files that
are not UTF-8, a UTF-8 BOM, malformed or duplicate-key recipe YAML, integer enums; a user recipe leaves no
temporary folder behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from distill import DistillError, paths

RECIPES = REPO / "distill" / "conf" / "recipe"
KEY = "gsk_" + "Q7x9LmB2vT4nR8kP1wZ6yH3cJ5dF0aE7s" + "Wq2Lp9Xc4Vb8Nm1Kz6"  # Groq-shaped: 56 characters, a valid
# identifier (letters, digits, _): a name check by regex or length alone lets it through
DRY = ["generate.dry_run=true", "teacher=openai", "teacher.base_url=http://127.0.0.1:9/v1", "teacher.model=m",
       "teacher.api_key_env=null"]


def _recipe(folder: Path, name: str = "mine") -> Path:
    """A copy of support_tickets as a user recipe ``name`` in ``folder``; returns its YAML file."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RECIPES / "support_tickets", folder / name)
    yaml_file = folder / f"{name}.yaml"
    yaml_file.write_text((RECIPES / "support_tickets.yaml").read_text().replace("name: support_tickets",
                                                                                f"name: {name}"))
    return yaml_file


def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[int, str, str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "distill", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("distill: error: "), err
    errors = [line for line in lines if line.startswith("distill: error")]
    assert len(errors) == 1 and not any(line.startswith((" ", "\t")) for line in lines), err
    return errors[0]


# --- secrets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", [f"+teacher.api_key={KEY}", f"teacher.api_key_env={KEY}",
                                      f"eval.endpoint.api_key_env={KEY}", f"teacher.model={KEY}'"])
def test_a_key_on_the_command_line_is_refused_and_never_echoed(tmp_path, override):
    rc, out, err = _cli(tmp_path, "config", "--resolved", "teacher=openai", override)
    line = _one_error_line(rc, err)
    assert KEY not in out + err and KEY[:12] not in out + err
    if "api_key" in override:
        assert override.split("=")[0].lstrip("+") in line


def test_a_key_with_a_trailing_newline_is_stripped_and_one_with_inner_whitespace_refused(monkeypatch, caplog):
    from distill.config import TeacherConfig
    from distill.teacher.client import resolve_api_key

    tcfg = TeacherConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="DISTILL_TEST_KEY",
                         structured_output="json_schema")
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY + "\n")
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert resolve_api_key(tcfg) == KEY
    assert "DISTILL_TEST_KEY" in caplog.text and "stripped" in caplog.text and KEY not in caplog.text
    for broken in (KEY[:20] + "\n" + KEY[20:], KEY[:20] + " " + KEY[20:], KEY + "\u2014"):
        monkeypatch.setenv("DISTILL_TEST_KEY", broken)
        with pytest.raises(DistillError) as err:
            resolve_api_key(tcfg)
        assert "DISTILL_TEST_KEY" in str(err.value) and KEY[:20] not in str(err.value)
        assert "\n" not in str(err.value)


def test_a_key_exported_with_a_trailing_newline_reaches_the_teacher(tmp_path, monkeypatch, capsys, fake_answer):
    from distill.__main__ import main
    from distill.testing.fake_teacher import FakeTeacher

    monkeypatch.setenv("DISTILL_TEST_KEY", KEY + "\n")  # export DISTILL_TEST_KEY="$(cat key.txt)" keeps the newline
    with FakeTeacher(fake_answer, api_key=KEY) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.api_key_env=DISTILL_TEST_KEY",
                              "generate.limit=2")
        assert main(["generate", *args]) == 0
        assert len(teacher.calls) == 2
    err = capsys.readouterr().err
    assert "$DISTILL_TEST_KEY" in err and "stripped" in err
    for text in (err, (tmp_path / "run" / "distill.log").read_text()):
        assert KEY not in text and KEY[:16] not in text


def test_http_loggers_never_write_the_key_even_at_debug(tmp_path, capsys):
    from distill.__main__ import _setup_logging

    other = "sk-proj-" + "Zq8Wm3Nc7Rb1Xv5Kt9Lp2Hd6" * 2  # not in the environment: caught by its shape
    _setup_logging(tmp_path, [KEY + "\n", KEY])
    root = logging.getLogger()
    try:
        root.setLevel(logging.DEBUG)
        logging.getLogger("httpcore.http11").debug("send_request_headers.failed exception=LocalProtocolError(\"Illegal "
                                                   "header value b'Bearer %s\\n'\")", KEY)
        logging.getLogger("httpx").warning("HTTP Request: POST headers={'authorization': 'Bearer %s'}", KEY)
        logging.getLogger("openai._base_client").warning("Request options: %s", {"api_key": KEY})
        try:
            raise RuntimeError(f"Illegal header value b'Bearer {KEY}'")
        except RuntimeError:
            logging.getLogger("distill").exception("teacher call failed; Authorization: Bearer %s", other)
        logging.getLogger("distill").info("teacher.api_key_env=GROQ_API_KEY, max_tokens=64")
        for handler in root.handlers:
            handler.flush()
        err = capsys.readouterr().err
        log_text = (tmp_path / "distill.log").read_text()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(logging.WARNING)
    for text in (err, log_text):
        assert "teacher call failed" in text and "RuntimeError" in text  # the record and its traceback kept
        assert "GROQ_API_KEY, max_tokens=64" in text  # names and ordinary settings are left alone
        assert KEY not in text and KEY[:16] not in text and other not in text and other[:16] not in text, text
        assert "send_request_headers" not in text  # httpcore's DEBUG lines are off


# --- files that are not UTF-8, a BOM ------------------------------------------------------------------------


def test_non_utf8_inputs_get_one_line_naming_the_file_and_byte(tmp_path):
    _recipe(tmp_path / "recipes")
    inputs = tmp_path / "recipes" / "mine" / "inputs.jsonl"
    lines = inputs.read_bytes().splitlines(keepends=True)
    bad = b'{"id": "latin1", "text": "caf\xe9 au lait"}\n'
    inputs.write_bytes(b"".join(lines[:3]) + bad + b"".join(lines[3:]))
    offset = len(b"".join(lines[:3])) + bad.index(b"\xe9")
    rc, _, err = _cli(tmp_path, "generate", "recipe=mine", f"run_dir={tmp_path / 'run'}", *DRY)
    line = _one_error_line(rc, err)
    assert "inputs.jsonl" in line and "line 4" in line and f"byte offset {offset}" in line and "UTF-8" in line


# --- recipe YAML --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail,expect", [
    (b"id_field: other\n", ["line 36", "'id_field' appears twice", "line 7"]),
    (b"bad: [unclosed\n", ["line 37", "flow sequence that starts on line 36"]),
    (b"x: 1\n  y: 2\n", ["line 37", "mapping values are not allowed"]),
    (b"description: caf\xe9\n", ["byte offset", "line 36", "UTF-8"]),
])
def test_bad_recipe_yaml_gets_one_line_naming_the_file_and_line(tmp_path, tail, expect):
    yaml_file = _recipe(tmp_path / "recipes")
    assert len(yaml_file.read_bytes().splitlines()) == 35  # the line numbers below count on it
    yaml_file.write_bytes(yaml_file.read_bytes() + tail)
    for args in (("config", "--resolved", "recipe=mine"), ("recipes",)):
        rc, _, err = _cli(tmp_path, *args)
        line = _one_error_line(rc, err)
        assert str(yaml_file) in line, line
        for part in expect:
            assert part in line, line


def test_a_recipe_file_that_is_not_a_mapping_is_named(tmp_path):
    yaml_file = _recipe(tmp_path / "recipes")
    yaml_file.write_text("- name: mine\n- inputs: inputs.jsonl\n")
    rc, _, err = _cli(tmp_path, "config", "--resolved", "recipe=mine")
    line = _one_error_line(rc, err)
    assert str(yaml_file) in line and "mapping" in line


# --- temporary folders --------------------------------------------------------------------------------------


def test_a_user_recipe_run_leaves_no_temp_folder(tmp_path):
    yaml_file = _recipe(tmp_path / "recipes")
    yaml_file.write_bytes(b"\xef\xbb\xbf" + yaml_file.read_bytes())  # a BOM: still a recipe
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rc, out, err = _cli(tmp_path, "config", "--resolved", "recipe=mine", env={"TMPDIR": str(tmp)})
    assert rc == 0 and "name: mine" in out, err
    rc, _, err = _cli(tmp_path, "config", "--resolved", "recipe=mine", "train.nonsense=1", env={"TMPDIR": str(tmp)})
    assert rc == 2 and "train.nonsense" in err
    assert not list(tmp.glob("distill-recipes-*"))


# --- integer enums ------------------------------------------------------------------------------------------


STARS_YAML = """\
name: stars
description: A review -> its star rating (an integer enum) and whether it needs a reply (a boolean enum).
inputs: inputs.jsonl
gold_field: gold
few_shot: few_shot.jsonl
teacher_prompt: teacher_prompt.md
student_prompt: student_prompt.md
output_schema:
  type: object
  properties:
    stars: {type: integer, enum: [1, 2, 3]}
    reply: {type: boolean, enum: [true, false]}
  required: [stars, reply]
  additionalProperties: false
"""
REVIEWS = {f"review number {i}: {'awful' if i % 3 == 0 else 'fine' if i % 3 == 1 else 'great'}":
           {"stars": i % 3 + 1, "reply": i % 3 == 0} for i in range(12)}


def test_an_integer_enum_recipe_is_labelled_by_score_end_to_end(tmp_path):
    from distill import pipeline
    from distill.config import load_config
    from distill.testing.fake_teacher import FakeTeacher

    folder = tmp_path / "recipes"
    (folder / "stars").mkdir(parents=True)
    (folder / "stars.yaml").write_text(STARS_YAML)
    (folder / "stars" / "teacher_prompt.md").write_text("Rate the review.")
    (folder / "stars" / "student_prompt.md").write_text("Rate the review.")
    (folder / "stars" / "inputs.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "text": text, "gold": gold}) + "\n"
        for i, (text, gold) in enumerate(REVIEWS.items())))
    (folder / "stars" / "few_shot.jsonl").write_text(
        json.dumps({"text": "terrible", "label": {"stars": 1, "reply": True}}) + "\n"
        + json.dumps({"text": "lovely", "label": {"stars": 3, "reply": False}}) + "\n")

    def answer(messages: list[dict]) -> str:  # one token: the JSON text of the value asked for
        gold = REVIEWS[messages[-1]["content"]]
        return json.dumps(gold["stars"] if "the stars only" in messages[0]["content"] else gold["reply"])

    with FakeTeacher(answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "recipe=stars", f"recipe_dir={folder}",
                                         "teacher.method=auto", "generate.limit=12", "generate.dedup.enabled=false",
                                         "teacher.concurrency=2"))
        pipeline.run(cfg, stages=("generate",))
    systems = {c["messages"][0]["content"].rsplit("\n", 1)[-1] for c in teacher.calls}
    assert "For this request answer with the stars only, exactly one of: 1, 2, 3." in systems
    assert "For this request answer with the reply only, exactly one of: true, false." in systems
    assert all(c["max_tokens"] == 1 for c in teacher.calls)  # auto chose score: every field has an enum
    rows = [json.loads(line) for s in paths.SPLITS
            for line in paths.split_path(tmp_path / "run", s).read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:  # answers carry the schema's typed values, not their text
        assert type(row["teacher"]["stars"]) is int and type(row["teacher"]["reply"]) is bool
    assert sum(row["teacher"] == row["gold"] for row in rows) >= 10
