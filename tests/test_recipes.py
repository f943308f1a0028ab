"""Recipes: the shipped extraction recipe is sound data, any recipe folder is found by name, and the CLI says what
exists (commands, recipes, the options of every config group)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from distill import DistillError, paths, runio
from distill.__main__ import main
from distill.config import group_options, list_recipes, load_config
from distill.task import Task
from distill.testing.fake_teacher import FakeTeacher

RECIPES = REPO / "distill" / "conf" / "recipe"
EMAILS = RECIPES / "email_extraction"


def _email_gold() -> dict[str, dict]:
    rows = [json.loads(line) for line in (EMAILS / "inputs.jsonl").read_text().splitlines() if line.strip()]
    return {r["text"]: r["gold"] for r in rows}


def test_email_extraction_inputs_are_labelled_and_consistent(tmp_path):
    cfg = load_config(["recipe=email_extraction", f"run_dir={tmp_path}"])
    task = Task(cfg)
    report = task.load_inputs()
    assert len(report.examples) >= 120 and not report.skipped and report.bad_gold == 0
    assert all(ex.gold is not None for ex in report.examples)
    assert task.schema.fields == ["order_id", "product", "issue_type", "requested_action"]
    enums = task.schema.enums
    assert set(enums) == {"issue_type", "requested_action"}
    for field, values in enums.items():  # every class has examples to learn and be scored on
        counts = {v: sum(ex.gold[field] == v for ex in report.examples) for v in values}
        assert min(counts.values()) >= 8, (field, counts)
    for ex in report.examples:  # an extracted order id is copied from the email itself
        if ex.gold["order_id"] is not None:
            assert ex.gold["order_id"] in ex.text, ex.id
    assert sum(ex.gold["order_id"] is None for ex in report.examples) >= 8  # "none given" is a real answer
    assert len(task.few_shot) >= 5
    texts = {ex.text for ex in report.examples}
    assert not any(shot_text in texts for shot_text, _ in task.few_shot)  # few-shot never leaks into the data


def test_an_answer_missing_a_field_breaks_the_email_schema(tmp_path):
    task = Task(load_config(["recipe=email_extraction", f"run_dir={tmp_path}"]))
    ok = {"order_id": None, "product": "kettle", "issue_type": "defective", "requested_action": "refund"}
    assert task.schema.errors(ok) == []
    assert task.schema.parse(json.dumps({k: v for k, v in ok.items() if k != "order_id"}))[1] == "schema_violation"
    assert task.schema.parse(json.dumps({**ok, "issue_type": "weather"}))[1] == "schema_violation"


def _copy_recipe(src_name: str, folder: Path, new_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RECIPES / src_name, folder / new_name)
    text = (RECIPES / f"{src_name}.yaml").read_text().replace(f"name: {src_name}", f"name: {new_name}")
    (folder / f"{new_name}.yaml").write_text(text)


@pytest.mark.integration
def test_a_recipe_copied_outside_the_repo_runs_by_name(tmp_path, monkeypatch, capsys):
    """The extraction recipe, copied to ./recipes of an unrelated folder, runs end to end by name from there."""
    gold = _email_gold()
    _copy_recipe("email_extraction", tmp_path / "recipes", "my_emails")
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    assert re.search(r"^my_emails\s+Extract order id.*\[.*recipes\]$", capsys.readouterr().out, flags=re.MULTILINE)

    def answer(messages: list[dict]) -> str:
        return json.dumps(gold[messages[-1]["content"]])

    run_dir = tmp_path / "run"
    with FakeTeacher(answer) as teacher:
        # publish.force: a random student writes no valid free-text field, so the evaluate gate fails by design
        args = tiny_overrides(run_dir, teacher.base_url, "recipe=my_emails", "publish.gguf_types=[q8_0]",
                              "publish.force=true")
        assert main(["run", *args]) == 0, capsys.readouterr().err[-2000:]
        assert len(teacher.calls) == 24
    for stage in paths.STAGES:
        assert runio.read_done(run_dir, stage) is not None, stage
    rows = [r for s in paths.SPLITS for r in runio.read_jsonl(paths.split_path(run_dir, s))]
    assert len(rows) == 24 and all(r["teacher"] == r["gold"] for r in rows)
    assert set(rows[0]["teacher"]) == {"order_id", "product", "issue_type", "requested_action"}
    assert runio.read_json(run_dir / "evaluate" / paths.RESULTS)["recipe"] == "my_emails"
    assert "my_emails" in (run_dir / "publish" / paths.ROUTING).read_text()


def test_recipe_dir_shadows_the_package_and_lists_its_own(tmp_path, capsys):
    folder = tmp_path / "elsewhere"
    _copy_recipe("support_tickets", folder, "support_tickets")
    found = list_recipes(str(folder))
    assert found["support_tickets"] == folder.resolve() / "support_tickets.yaml"  # the user's copy wins
    assert found["email_extraction"] == RECIPES / "email_extraction.yaml"
    cfg = load_config(["recipe=support_tickets", f"recipe_dir={folder}", f"run_dir={tmp_path / 'run'}"])
    assert cfg.recipe.dir == folder.resolve() / "support_tickets"


def test_a_recipe_missing_its_prompt_file_is_named(tmp_path):
    _copy_recipe("email_extraction", tmp_path, "broken")
    (tmp_path / "broken" / "teacher_prompt.md").unlink()
    cfg = load_config(["recipe=broken", f"recipe_dir={tmp_path}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(DistillError, match="teacher_prompt file .*teacher_prompt.md does not exist"):
        Task(cfg)


# -- discoverability ---------------------------------------------------------------------------------------------


def test_help_lists_every_command_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "generate", "train", "evaluate", "publish", "recipes", "config", "ledger"):
        assert re.search(rf"^    {command}\s+\S", out, flags=re.MULTILINE), command
    assert "Examples:" in out and "recipe=email_extraction profile=smoke" in out


def test_recipes_lists_each_with_its_description(capsys):
    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "Extract order id, product, issue type and requested action" in lines["email_extraction"]
    assert "Route a customer-support ticket" in lines["support_tickets"]


def test_config_lists_every_option_of_every_group_with_a_line(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for group, options in group_options().items():
        assert f"{group}:  (pick one with {group}=NAME)" in out
        for option in options:
            line = re.search(rf"^  {option}\s+(.*)$", out, flags=re.MULTILINE)
            assert line and len(line.group(1)) > 10, (group, option)


def test_config_resolved_prints_every_key_for_the_overrides(capsys):
    import yaml

    assert main(["config", "--resolved", "teacher=openai", "train.max_steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["teacher"]["api_key_env"] == "OPENAI_API_KEY" and cfg["train"]["max_steps"] == 7
    assert main(["config", "--resolved", "teacher=gpt9"]) == 2
    assert "teacher/gpt9" in capsys.readouterr().err


def test_a_copied_recipe_that_keeps_the_old_name_is_refused(tmp_path):
    shutil.copytree(EMAILS, tmp_path / "mine")
    shutil.copyfile(RECIPES / "email_extraction.yaml", tmp_path / "mine.yaml")  # name: still email_extraction
    with pytest.raises(DistillError, match="says name: 'email_extraction'; set it to 'mine'"):
        load_config(["recipe=mine", f"recipe_dir={tmp_path}", f"run_dir={tmp_path / 'run'}"])
