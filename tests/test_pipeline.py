"""The whole pipeline on a tiny random student and a fake OpenAI-compatible teacher over real loopback HTTP."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from conftest import tiny_overrides

from distill import DistillError, paths, runio
from distill.__main__ import main
from distill.config import load_config
from distill import pipeline
from distill.routing import load_rule
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration


def _ledger_rows(run_dir) -> int:
    with sqlite3.connect(paths.ledger_path(run_dir)) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def test_whole_pipeline_then_rerun_is_free(tmp_path, fake_answer):
    run_dir = tmp_path / "run"
    with FakeTeacher(fake_answer) as teacher:
        cfg = load_config(tiny_overrides(run_dir, teacher.base_url))
        summaries = pipeline.run(cfg)
        calls_first = len(teacher.calls)
        assert calls_first == 24  # one paid call per input, no retries needed

        for stage in paths.STAGES:
            assert runio.read_done(run_dir, stage)["fingerprint"]
        rows = [json.loads(line) for s in paths.SPLITS
                for line in paths.split_path(run_dir, s).read_text().splitlines()]
        assert len(rows) == 24 and all(r["teacher"] == r["gold"] for r in rows)
        assert _ledger_rows(run_dir) == 24

        adapter = paths.adapter_path(run_dir) / "adapter_model.safetensors"
        assert adapter.stat().st_size > 0
        results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
        assert results["metrics"]["n"] == 4
        assert results["metrics"]["teacher_vs_gold"]["exact"] == 1.0
        assert (run_dir / "evaluate" / paths.REPORT).read_text().startswith("# Evaluation")
        # train.max_steps=2 (the smoke budget here) cuts train.epochs short: results, report and card say so
        assert results["training"]["stopped_by"] == "max_steps" and results["training"]["stopped_early"]
        why = "stopped early by train.max_steps=2 (the time budget) after 2 steps"
        assert why in results["training"]["stop_reason"] and why in summaries["train"]["stop_reason"]
        assert f"- training (stopped early): {why}" in (run_dir / "evaluate" / paths.REPORT).read_text()

        routing = (run_dir / "publish" / paths.ROUTING).read_text()
        assert "schema_version: 2" in routing and "support_tickets" in routing
        ggufs = list((run_dir / "publish" / paths.MODEL_DIR).glob("*.gguf"))
        assert len(ggufs) == 1 and ggufs[0].stat().st_size > 0
        assert summaries["publish"]["checks"][ggufs[0].name]["loads"] is True
        card = (run_dir / "publish" / paths.MODEL_CARD).read_text()
        assert summaries["train"]["adapter_sha256"][:16] in card
        assert f"- training ended: {summaries['train']['stop_reason']}" in card

        # `python -m distill ledger` prints the ledger's figures: the calls and tokens the server billed.
        printed = subprocess.run([sys.executable, "-m", "distill", "ledger", f"run_dir={run_dir}"],
                                 capture_output=True, text=True, timeout=300, check=False)
        assert printed.returncode == 0, printed.stderr[-3000:]
        figures = json.loads(printed.stdout)
        with sqlite3.connect(paths.ledger_path(run_dir)) as db:
            cost = db.execute("SELECT SUM(cost_usd) FROM calls").fetchone()[0]
        assert figures["successful_calls"] == len(teacher.paid) == 24 and figures["failures"] == {}
        assert [figures["prompt_tokens"], figures["completion_tokens"]] == teacher.billed_tokens
        assert figures["cost_usd"] == pytest.approx(cost, abs=1e-6) and cost > 0

        # Same command again: every stage is skipped and the teacher is not called.
        done_before = {s: runio.read_done(run_dir, s) for s in paths.STAGES}
        pipeline.run(load_config(tiny_overrides(run_dir, teacher.base_url)))
        assert len(teacher.calls) == calls_first
        assert {s: runio.read_done(run_dir, s) for s in paths.STAGES} == done_before

        # A training change re-runs train onward (evaluate and publish of the new adapter) but never the teacher.
        pipeline.run(load_config(tiny_overrides(run_dir, teacher.base_url, "train.max_steps=3")))
        assert len(teacher.calls) == calls_first
        assert runio.read_done(run_dir, "generate") == done_before["generate"]
        done_after = {s: runio.read_done(run_dir, s) for s in paths.STAGES}
        assert done_after["train"]["summary"]["steps"] == 3
        for stage in ("train", "evaluate", "publish"):
            assert done_after[stage]["fingerprint"] != done_before[stage]["fingerprint"], stage
        new_sha = done_after["train"]["summary"]["adapter_sha256"]
        assert new_sha != summaries["train"]["adapter_sha256"]
        assert new_sha[:16] in (run_dir / "publish" / paths.MODEL_CARD).read_text()  # the card names the new one
        rule = load_rule(run_dir / "publish" / paths.ROUTING)
        assert rule.evidence.results_sha256 == runio.sha256_file(run_dir / "evaluate" / paths.RESULTS)


def test_lost_run_dir_pays_nothing_with_a_shared_ledger(tmp_path, fake_answer):
    shared = tmp_path / "shared.sqlite"
    with FakeTeacher(fake_answer) as teacher:
        for name in ("a", "b"):
            cfg = load_config(tiny_overrides(tmp_path / name, teacher.base_url, f"generate.shared_ledger={shared}",
                                             "generate.limit=10"))
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 10


def test_gate_failure_exits_3_and_blocks_publish(tmp_path, fake_answer, capsys):
    run_dir = tmp_path / "run"
    with FakeTeacher(fake_answer) as teacher:
        args = tiny_overrides(run_dir, teacher.base_url, "eval.gate.min_agreement=0.99")
        assert main(["run", *args]) == 3
    err = capsys.readouterr().err
    assert "evaluate gate failed: agreement" in err and "0.99" in err
    assert runio.read_done(run_dir, "evaluate") is not None
    assert not (run_dir / "publish").exists()


def test_unreachable_teacher_names_the_url(tmp_path, capsys):
    url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    code = main(["generate", *tiny_overrides(tmp_path / "run", url, "teacher.max_retries=0", "generate.limit=2")])
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert "Traceback" not in err
    assert len(errors) == 1 and "cannot reach the teacher at http://127.0.0.1:9/v1" in errors[0]


def test_invalid_teacher_answers_are_rejected_not_kept(tmp_path):
    with FakeTeacher(lambda messages: '{"category": "weather", "priority": "low"}') as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "generate.limit=3",
                                         "generate.max_attempts=2"))
        with pytest.raises(DistillError, match="no valid answer"):
            pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 6  # 3 inputs x 2 attempts, each a fresh sample
    with sqlite3.connect(paths.ledger_path(tmp_path / "run")) as db:
        assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 0
        assert db.execute("SELECT reason, COUNT(*) FROM failures GROUP BY reason").fetchall() == [
            ("schema_violation", 6)]


def test_dry_run_sends_nothing(tmp_path, fake_answer, capsys):
    with FakeTeacher(fake_answer) as teacher:
        code = main(["generate", *tiny_overrides(tmp_path / "run", teacher.base_url, "generate.dry_run=true")])
        assert len(teacher.calls) == 0
    assert code == 0 and "dry run: 24 requests" in capsys.readouterr().err
    recorded = (tmp_path / "run" / paths.OVERRIDES_YAML).read_text()
    assert "generate.limit=24" in recorded and "dry_run" not in recorded  # the next command runs for real


def test_api_key_never_reaches_the_run_dir(tmp_path, monkeypatch, fake_answer):
    secret = "sk-canary-" + "7" * 24
    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    with FakeTeacher(fake_answer, api_key=secret) as teacher:
        args = tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.api_key_env=DISTILL_TEST_KEY",
                              "generate.limit=4")
        assert main(["generate", *args]) == 0
        assert len(teacher.calls) == 4
    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    assert "DISTILL_TEST_KEY" in (tmp_path / "run" / paths.CONFIG_YAML).read_text()


def test_score_method_labels_by_logprobs_and_stops_at_the_budget(tmp_path, gold_by_text):
    def answer(messages: list[dict]) -> str:  # a one-token answer for the field the system prompt asks for
        gold = gold_by_text[messages[-1]["content"]]
        return gold["category"] if "the category only" in messages[0]["content"] else gold["priority"]

    with FakeTeacher(answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "teacher.method=score",
                                         "generate.limit=6", "teacher.concurrency=1"))
        pipeline.run(cfg, stages=("generate",))
        assert len(teacher.calls) == 12  # two fields x six inputs, one token each
        assert all(c["max_tokens"] == 1 and c["top_logprobs"] == 20 for c in teacher.calls)
        rows = [json.loads(line) for s in paths.SPLITS
                for line in paths.split_path(tmp_path / "run", s).read_text().splitlines()]
        assert len(rows) == 6 and all(r["provenance"]["confidence"] for r in rows)

        # $1 per prompt token: not even the first call's estimate fits a $1 budget, so nothing is sent.
        pricey = load_config(tiny_overrides(tmp_path / "pricey", teacher.base_url, "teacher.method=score",
                                            "generate.limit=6", "teacher.concurrency=1", "generate.budget_usd=1",
                                            "teacher.price.input_per_1m=1000000"))
        before = len(teacher.calls)
        with pytest.raises(DistillError, match="budget cap"):
            pipeline.run(pricey, stages=("generate",))
        assert len(teacher.calls) == before


def test_a_stage_on_a_missing_run_dir_says_so_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["evaluate", f"run_dir={missing}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_a_stage_command_on_a_run_starts_from_its_overrides_and_never_mixes_configs(tmp_path, fake_answer, capsys):
    run_dir = tmp_path / "run"
    with FakeTeacher(fake_answer) as teacher:
        args = tiny_overrides(run_dir, teacher.base_url)
        assert main(["generate", *args]) == 0
        assert main(["train", *args]) == 0
        calls = len(teacher.calls)
        # As the gate's docs write it: no recipe=, profile= or student=; the run's own overrides apply first.
        assert main(["evaluate", f"run_dir={run_dir}", "eval.gate.min_agreement=0.0"]) == 0, capsys.readouterr().err
        assert len(teacher.calls) == calls  # generate was not redone
    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    assert results["gate"]["thresholds"]["min_agreement"] == 0.0
    assert results["metrics"]["n"] == 4  # eval.limit=4 from the run's own overrides, not the default
    saved = (run_dir / paths.OVERRIDES_YAML).read_text()
    assert "student=tiny_random" in saved and "eval.gate.min_agreement=0.0" in saved and "run_dir" not in saved
    assert "name: tiny_random" in (run_dir / paths.CONFIG_YAML).read_text()

    # A stage alone that would mix configs is refused before it writes anything.
    before = {p: p.read_bytes() for p in (run_dir / paths.CONFIG_YAML, run_dir / paths.OVERRIDES_YAML,
                                          run_dir / "evaluate" / paths.DONE)}
    # Evaluating with another student than train trained would load another model under the adapter.
    assert main(["evaluate", f"run_dir={run_dir}", "student=smollm2_135m"]) == 2
    err = capsys.readouterr().err
    assert "would build on a train stage made otherwise" in err and "student.name: 'tiny_random' -> 'smollm2_135m'" in err
    assert main(["publish", f"run_dir={run_dir}", "recipe=email_extraction"]) == 2
    assert "holds a run of recipe 'support_tickets', not 'email_extraction'" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten, evaluate's DONE.json kept
    assert runio.read_done(run_dir, "evaluate") is not None


def test_a_stage_on_a_folder_that_is_no_run_writes_nothing_into_it(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's own file")
    assert main(["evaluate", f"run_dir={folder}"]) == 2
    assert "evaluate needs a finished generate stage" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]


def test_a_run_made_from_python_is_resumed_with_its_own_recipe(tmp_path, fake_answer):
    with FakeTeacher(fake_answer) as teacher:
        cfg = load_config(tiny_overrides(tmp_path / "run", teacher.base_url, "recipe=email_extraction",
                                         "generate.limit=2"))
    pipeline.save_config(cfg)  # what pipeline.run writes: config.yaml, no overrides.yaml
    assert not (tmp_path / "run" / paths.OVERRIDES_YAML).exists()
    merged, inherited = pipeline.run_overrides([f"run_dir={tmp_path / 'run'}", "eval.limit=3"])
    assert inherited == ["recipe=email_extraction"]
    assert load_config(merged).recipe.name == "email_extraction"


def test_the_recorded_recipe_dir_is_absolute(tmp_path, monkeypatch):
    import yaml

    mine = tmp_path / "recipes"
    (mine / "support_tickets").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config([f"run_dir={tmp_path / 'run'}", "recipe_dir=recipes", "generate.limit=2"])
    pipeline.save_config(cfg, ["recipe_dir=recipes", f"run_dir={tmp_path / 'run'}", "generate.limit=2"])
    saved = yaml.safe_load((tmp_path / "run" / paths.OVERRIDES_YAML).read_text())
    assert saved == [f"recipe_dir={mine}", "generate.limit=2"]
