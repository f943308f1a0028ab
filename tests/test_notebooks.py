"""The notebooks run top to bottom against a real (tiny) run, and are committed without outputs.

Each notebook is executed from a copy in a temporary folder with nbclient, on a kernel of this interpreter, with its
parameters cell overridden papermill-style (a cell inserted after the one tagged ``parameters``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, tiny_overrides

from distill import paths, runio
from distill.notebook.explore import NotInRun, open_run
from distill.testing.fake_teacher import FakeTeacher

NOTEBOOKS = REPO / "notebooks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def test_committed_notebooks_have_no_outputs():
    found = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.name for p in found] == ["01_explore_run.ipynb", "02_new_recipe.ipynb"]
    for path in found:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name} is committed with outputs: clear them (Kernel > Restart & Clear Output)")
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


def execute(name: str, workdir: Path, parameters: dict) -> nbformat.NotebookNode:
    """Run notebooks/<name> from a copy in ``workdir`` with ``parameters`` injected; returns the executed copy."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "# Parameters injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected))
    copy = workdir / name
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()  # the "python3" kernel's argv[0] "python" resolves to this interpreter (jupyter_client)
    finally:
        nbformat.write(nb, copy)  # kept for a failing test's post-mortem
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            for mime in ("text/plain", "text/markdown"):
                parts.append(str(out.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def _answer_from_gold(gold_by_text: dict[str, dict], broken: set[str]):
    def answer(messages: list[dict]) -> str:
        text = messages[-1]["content"]
        if text in broken:  # fails the schema on every attempt: the input ends up in rejected.jsonl
            return '{"category": "weather", "priority": "low"}'
        return json.dumps(gold_by_text.get(text, {"category": "feedback", "priority": "low"}))

    return answer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, gold_by_text):
    """A run up to evaluate (tiny random student, fake teacher) in which the teacher fails the schema on two inputs."""
    from distill import pipeline
    from distill.config import load_config

    run_dir = tmp_path_factory.mktemp("nb") / "run"
    broken = set(list(gold_by_text)[:2])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        with FakeTeacher(_answer_from_gold(gold_by_text, broken)) as teacher:
            cfg = load_config(tiny_overrides(run_dir, teacher.base_url, "generate.max_attempts=2"))
            pipeline.run(cfg, stages=("generate", "train", "evaluate"))  # notebook 01 shows nothing of publish
    return run_dir


@pytest.mark.integration
def test_explore_reads_every_part_of_a_run(tiny_run):
    run = open_run(tiny_run)
    generate = runio.read_done(tiny_run, "generate")["summary"]
    data = run.dataset()
    assert len(data) == generate["labelled"] == 22
    assert set(data["split"]) <= set(paths.SPLITS) and data["chars"].gt(0).all()
    assert (data["teacher.category"] == data["gold.category"]).all()  # the fake teacher answers with gold
    counts = run.label_distribution("category")
    assert counts["total"].sum() == 22 and len(counts) == 8  # every allowed value gets a row, even with 0
    assert run.rejections_by_reason().to_dict() == {"schema_violation": 2}
    assert run.spend()["successful_calls"] == 22 and run.spend()["failures"] == {"schema_violation": 4}
    assert len(run.ledger_calls()) == 22
    curves = run.training_curves()
    assert list(curves.index[:2]) == [1, 2] and curves["loss"].notna().sum() == 2
    assert run.metrics_table().loc["teacher vs gold", "exact"] == 1.0
    preds = runio.read_jsonl(tiny_run / "evaluate" / paths.PREDICTIONS)
    differs = {p["id"]: p.get("confidence") for p in preds if p["student"] != p["teacher"]}
    worst = run.worst_disagreements(3)
    assert len(worst) == min(3, len(differs)) and set(worst["id"]) <= set(differs)
    assert all(s != t for s, t in zip(worst["student"], worst["teacher"]))
    ranked = [-1.0 if c is None else c for c in worst["confidence"]]
    assert ranked == sorted(ranked, reverse=True)  # most confident first
    assert run.duplicates()["cross_split_leaks"] == {}

    # Each plot draws the run's own figures: 22 labelled inputs, 22 paid calls, 2 training steps.
    labels = run.plot_labels()
    assert [ax.get_title() for ax in labels.axes] == ["teacher labels: category", "teacher labels: priority"]
    assert all(sum(bar.get_width() for bar in ax.patches) == 22 for ax in labels.axes)
    (lengths,) = run.plot_lengths().axes
    assert sum(bar.get_height() for bar in lengths.patches) == 22
    dollars, tokens = run.plot_spend().axes
    calls = run.ledger_calls()
    assert list(dollars.lines[0].get_xdata()) == list(range(1, 23))
    assert dollars.lines[0].get_ydata()[-1] == pytest.approx(calls["cost_usd"].sum()) and calls["cost_usd"].sum() > 0
    assert tokens.lines[0].get_ydata()[-1] == (calls["prompt_tokens"] + calls["completion_tokens"]).sum()
    (training,) = run.plot_training().axes
    loss = next(line for line in training.lines if line.get_label() == "loss")
    assert list(loss.get_xdata()) == [1, 2] and list(loss.get_ydata()) == list(curves["loss"].dropna())


def test_explore_says_what_a_run_does_not_have(tmp_path):
    from distill import DistillError

    (tmp_path / paths.CONFIG_YAML).write_text("recipe: {output_schema: {properties: {}}}\n")
    run = open_run(tmp_path)
    for part in (run.dataset(), run.rejections(), run.results(), run.confusion("x"), run.plot_training(),
                 run.plot_cost(), run.spend(), run.worst_disagreements()):
        assert isinstance(part, NotInRun) and not part
        assert repr(part).startswith("not in this run: ")
    assert "generate did not finish" in repr(run.dataset())
    with pytest.raises(DistillError, match="is not a run directory"):
        open_run(tmp_path / "..")
    with pytest.raises(DistillError, match="no run of recipe 'nope'"):
        from distill.notebook.explore import latest_run

        latest_run("nope", tmp_path)


def test_latest_run_is_the_newest_with_a_finished_evaluate(tmp_path):
    from distill.notebook.explore import latest_run

    older, newer = tmp_path / "r" / "20260101-000000", tmp_path / "r" / "20260102-000000"
    for run_dir in (older, newer):
        run_dir.mkdir(parents=True)
        (run_dir / paths.CONFIG_YAML).write_text("{}\n")
    runio.write_done(older, "evaluate", "fp", {})
    os.utime(older, (1, 1))
    assert latest_run("r", tmp_path) == older  # the newer one never finished evaluate
    assert latest_run("r", tmp_path, finished=None) == newer
    runio.write_done(newer, "evaluate", "fp", {})
    assert latest_run("r", tmp_path) == newer


@pytest.mark.integration
def test_explore_notebook_runs_top_to_bottom(tiny_run, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    nb = execute("01_explore_run.ipynb", tmp_path, {"RUN_DIR": str(tiny_run)})
    text = outputs_text(nb)
    assert "finished: generate, train, evaluate)" in text
    assert "22 labelled inputs" in text and "schema_violation" in text
    assert sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])) >= 4
    results = runio.read_json(tiny_run / "evaluate" / paths.RESULTS)
    for key in ("confusion", "coverage_curve", "cost"):  # parts the run has are shown, not reported missing
        if key in results:
            assert not re.search(rf"not in this run: [^\n]*{key.split('_')[0]}", text), key


def _review_answer(messages: list[dict]) -> str:
    """A deterministic fake teacher for notebook 02's product-review recipe."""
    text = messages[-1]["content"].lower()
    sentiment = "negative" if any(w in text for w in ("late", "rude", "stopped", "no.", "missing")) else "positive"
    topic = next((t for t, words in (("price", ("price", "cheap", "expensive", "value")),
                                     ("delivery", ("deliver", "arrive", "parcel", "courier", "came")),
                                     ("service", ("support", "service", "refund", "charged")))
                  if any(w in text for w in words)), "quality")
    return json.dumps({"sentiment": sentiment, "topic": topic,
                       "wants_reply": "yes" if "please" in text or "?" in text else "no"})


@pytest.mark.integration
def test_new_recipe_notebook_authors_previews_estimates_and_runs(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    work, run_dir = tmp_path / "my_recipes", tmp_path / "run"
    with FakeTeacher(_review_answer) as teacher:
        teacher_args = ["teacher=openai", f"teacher.base_url={teacher.base_url}", "teacher.model=fake-teacher",
                        "teacher.api_key_env=null", "teacher.concurrency=4"]
        run_args = ["profile=smoke", "student=tiny_random", "train.max_steps=2", "train.save_steps=1",
                    "train.batch_size=4", "eval.limit=4", "eval.max_new_tokens=8", "publish.gguf_types=[q8_0]"]
        nb = execute("02_new_recipe.ipynb", tmp_path,
                     {"WORK_DIR": str(work), "TEACHER": teacher_args, "RUN_OVERRIDES": run_args,
                      "RUN_DIR": str(run_dir)})
        posts = len(teacher.calls)
    assert (work / "product_reviews.yaml").exists() and (work / "product_reviews" / "inputs.jsonl").exists()
    generate = runio.read_done(run_dir, "generate")["summary"]
    labelled = generate["labelled"]
    assert labelled == 30 and generate["cache_hits_this_run"] == 5
    assert posts == 30  # five preview calls, then only the 25 the ledger did not hold
    for stage in paths.STAGES:
        assert runio.read_done(run_dir, stage) is not None, stage
    text = outputs_text(nb)
    assert "teacher calls paid by this run: 25 | answers reused from the ledger: 5" in text
    assert "30 reviews" in text
    # the authored recipe is an ordinary recipe: found by name from its folder
    from distill.config import list_recipes

    assert list_recipes(str(work))["product_reviews"] == work / "product_reviews.yaml"


def test_duplicates_show_the_removed_texts_and_cross_split_leaks(tmp_path):
    """A hand-made run dir: generate removed a002 as a duplicate, and one text sits in two splits."""
    import yaml
    from conftest import RECIPE_DIR

    from distill.config import load_config, public_dict

    cfg = public_dict(load_config([f"run_dir={tmp_path}"]))
    (tmp_path / paths.CONFIG_YAML).write_text(yaml.safe_dump(cfg))
    row = {"id": "a001", "input": "Where is my parcel?", "teacher": {}, "gold": None}
    runio.write_jsonl(paths.split_path(tmp_path, "train"), [{**row, "split": "train"}])
    runio.write_jsonl(paths.split_path(tmp_path, "val"), [])
    runio.write_jsonl(paths.split_path(tmp_path, "test"), [{**row, "id": "a009", "input": "where is my  PARCEL",
                                                             "split": "test"}])
    runio.write_json(paths.stage_dir(tmp_path, "generate") / paths.QA,
                     {"exact_duplicates": 1, "near_duplicates": 0, "removed_ids": ["a002"]})
    runio.write_done(tmp_path, "generate", "fp", {"qa": {"exact_duplicates": 1}})
    dups = open_run(tmp_path).duplicates()
    a002 = json.loads((RECIPE_DIR / "inputs.jsonl").read_text().splitlines()[1])
    assert dups["exact_duplicates"] == 1
    assert dups["removed"].to_dict("records") == [{"id": "a002", "input": a002["text"]}]
    assert dups["cross_split_leaks"] == {"where is my parcel": ["test", "train"]}
