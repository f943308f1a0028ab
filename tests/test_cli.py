"""What a new user meets at the command line: per-command help, hints for --flags, 'needs run_dir=DIR',
did-you-mean for typos, a recipe_dir that does not exist, a closed pipe, and the report's headline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from distill.__main__ import COMMANDS, main
from distill.config import Config
from distill.metrics.report import _teacher_price_note, verdict_line

TIMESTAMP = re.compile(r"\d{8}-\d{6}")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distill: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_each_command_prints_its_own_help(name, flag, capsys):
    assert main([name, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m distill {name}")
    assert "Examples:" in out and f"python -m distill {name}" in out.split("Examples:")[1]
    for group in COMMANDS[name].groups:  # every key of the groups it reads is named
        keys = Config.model_fields[group].annotation.model_fields
        line = next(line for line in out.splitlines() if line.startswith(f"  {group}: "))
        assert all(key in line for key in keys), (group, line)


def test_help_topic_and_top_level_help_list_every_command(capsys):
    assert main(["help", "evaluate"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m distill evaluate run_dir=DIR")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert re.search(rf"^    {re.escape(name)}\s+\S", out, flags=re.MULTILINE), name


@pytest.mark.parametrize("args,hint", [
    (["run", "--profile", "smoke"], "write profile=smoke"),
    (["run", "--train.max_steps=5"], "write train.max_steps=5"),
    (["config", "--resolve"], "config takes --resolved"),
    (["run", "smoke"], "'smoke' is not an override: write key=value"),
])
def test_a_flag_or_bare_word_gets_a_one_line_key_value_hint(args, hint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert hint in _err_line(capsys)
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("name", ["evaluate", "ledger", "serve", "train", "publish"])
def test_commands_on_an_existing_run_say_they_need_run_dir(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([name, "recipe=support_tickets"]) == 2
    line = _err_line(capsys)
    assert f"{name} needs run_dir=DIR" in line
    assert not TIMESTAMP.search(line)  # never a timestamped folder the user did not type
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,hint", [
    (["config", "--resolved", "train.max_step=3"], "did you mean train.max_steps?"),
    (["config", "--resolved", "eval.gate.min_agreemnt=0.9"], "did you mean eval.gate.min_agreement?"),
    (["config", "--resolved", "+eval.gate.min_field_agreemnt.priority=0.9"],
     "did you mean eval.gate.min_field_agreement?"),
    (["config", "--resolved", "recipe=support_ticket"], "did you mean recipe=support_tickets?"),
    (["config", "--resolved", "teacher=openia"], "did you mean teacher=openai?"),
    (["evalute", "run_dir=x"], "did you mean evaluate?"),
    # the listing without --resolved: an override is still checked, not ignored
    (["config", "profile=smok"], "did you mean profile=smoke?"),
    (["config", "train.lr_schedul=cosine"], "did you mean train.lr_schedule?"),
])
def test_typos_get_did_you_mean(args, hint, capsys):
    assert main(args) == 2
    assert hint in _err_line(capsys)


def test_an_unknown_key_lists_the_valid_names_beside_it(capsys):
    assert main(["config", "--resolved", "eval.gate.min_agreemnt=0.9"]) == 2
    line = _err_line(capsys)
    from distill.config import GateConfig

    assert all(key in line for key in GateConfig.model_fields)


@pytest.mark.parametrize("args", [["recipes"], ["config", "--resolved"], ["run"]])
def test_a_recipe_dir_that_does_not_exist_is_an_error(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "my_recipse"
    assert main([*args, f"recipe_dir={missing}"]) == 2
    line = _err_line(capsys)
    assert f"recipe_dir={missing}: no such folder" in line
    assert not (tmp_path / "runs").exists()


def test_a_closed_pipe_ends_quietly_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "config", "--resolved"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as `| head -1` is once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_misspelt_gate_field_fails_at_once_before_any_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    code = main(["run", f"run_dir={run_dir}", "+eval.gate.min_field_agreement.priorty=0.9"])
    elapsed = time.perf_counter() - started
    assert code == 2 and elapsed < 5.0, elapsed  # about 0.2 s: no model is loaded; the bound leaves room for a busy CI
    line = _err_line(capsys)
    assert "eval.gate.min_field_agreement names priorty" in line and "its fields: category, priority" in line
    assert not run_dir.exists()  # no stage started, not even the run folder


def test_a_missing_baseline_fails_before_evaluate_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["evaluate", f"run_dir={run_dir}", f"eval.baseline={tmp_path / 'main_results.json'}"]) == 2
    line = _err_line(capsys)
    assert "eval.baseline=" in line and "main_results.json does not exist" in line
    assert list(run_dir.iterdir()) == []  # no log, no config.yaml, no evaluate/


# --- the report's headline ------------------------------------------------------------------------------------

DEFAULTS = {"min_agreement": 0.0, "max_invalid_rate": 1.0, "min_accuracy": None, "min_field_agreement": {},
            "use_lower_bound": False, "baseline": None, "baseline_alpha": 0.05, "max_drop": None}


def test_the_verdict_says_no_gate_set_when_every_threshold_is_a_default():
    line = verdict_line({"passed": True, "reasons": [], "thresholds": DEFAULTS})
    assert line.startswith("**Gate: PASS** (no gate set:") and "eval.gate.min_agreement" in line


def test_the_verdict_shows_the_thresholds_it_was_judged_by():
    gate = {"passed": False, "reasons": ["min_agreement: 0.612 < 0.8"],
            "thresholds": {**DEFAULTS, "min_agreement": 0.8, "max_invalid_rate": 0.05,
                           "min_field_agreement": {"priority": 0.9}, "use_lower_bound": True}}
    line = verdict_line(gate)
    assert line.startswith("**Gate: FAIL** (agreement >= 80.0%, invalid <= 5.0%, priority agreement >= 90.0%; "
                           "on the interval's bound)")
    assert line.endswith("min_agreement: 0.612 < 0.8")
    assert verdict_line({**gate, "passed": True, "reasons": []}).startswith("**Gate: PASS** (agreement >= 80.0%")


def test_a_free_teacher_is_said_to_be_priced_as_a_hosted_model():
    free = {"teacher": {"model": "smollm2-135m", "priced_as": "gpt-4o-mini",
                        "price_source": "eval.cost.reference_price"}}
    assert _teacher_price_note(free) == ("smollm2-135m costs nothing to run here, so it is priced as gpt-4o-mini "
                                         "would be (eval.cost.reference_price)")
    paid = {"teacher": {"model": "gpt-4o", "priced_as": "gpt-4o", "price_source": "teacher.price"}}
    assert _teacher_price_note(paid) == "gpt-4o, teacher.price"
