"""The cheapest rung of the student ladder, student=embed_classifier: the packaged MiniLM (frozen) + a linear head
per enum field, through generate -> train -> evaluate -> publish with a fake teacher that answers with the gold
label; its head loads without pickle, its confidence drives routing.decide, and free-text recipes are refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides

from distill import DistillError, paths, pipeline, runio
from distill.config import HeadConfig, load_config
from distill.metrics.stats import rate
from distill.routing import decide, load_rule
from distill.stages import publish
from distill.student import embed_classifier
from distill.student.embed_classifier import EmbedClassifier, fit_heads, predict_heads
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration

FIELDS = ("category", "priority")
# Low enough that the classifier's val curve reaches it at some threshold, so the routing rule is enabled and
# decide() has a threshold to apply; the gate itself is not under test here.
TARGET = "0.5"


def _overrides(run_dir: Path, base_url: str, *extra: str) -> list[str]:
    """tiny_overrides with the classifier student, all 300 shipped tickets and every test/val item scored."""
    replaced = ("student=", "generate.limit=", "eval.limit=")
    return [o for o in tiny_overrides(run_dir, base_url) if not o.startswith(replaced)] + [
        "student=embed_classifier", "generate.limit=300", "eval.limit=null", f"publish.target_agreement={TARGET}",
        "publish.min_route_items=5", *extra]


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory, fake_answer):
    """The whole pipeline once for the module: (run_dir, cfg, summaries)."""
    run_dir = tmp_path_factory.mktemp("ladder") / "run"
    with FakeTeacher(fake_answer) as teacher:
        cfg = load_config(_overrides(run_dir, teacher.base_url))
        summaries = pipeline.run(cfg)
    return run_dir, cfg, summaries


def _predictor(results: dict) -> dict:
    """What answered, as results.json says (the keys an in-process predictor fills)."""
    return {k: results["predictor"][k] for k in ("kind", "student", "decode")}


def _split(run_dir: Path, split: str) -> list[dict]:
    return runio.read_jsonl(paths.split_path(run_dir, split))


def _majority_share(train_rows: list[dict], rows: list[dict], field: str | None) -> float:
    """Share of ``rows`` the best constant answer learnt from the train split gets right: chance for a classifier
    that ignores the text. ``field`` None: the whole answer."""
    key = (lambda r: r["teacher"][field]) if field else (lambda r: json.dumps(r["teacher"], sort_keys=True))
    majority = Counter(key(r) for r in train_rows).most_common(1)[0][0]
    return sum(key(r) == majority for r in rows) / len(rows)


def test_classifier_agrees_with_the_teacher_well_above_the_majority_answer(ladder_run):
    run_dir, cfg, summaries = ladder_run
    train_rows, test_rows, val_rows = _split(run_dir, "train"), _split(run_dir, "test"), _split(run_dir, "val")
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    assert _predictor(results) == {"kind": "in_process", "student": "embed_classifier", "decode": "classifier"}
    ci = results["metrics"]["agreement_ci"]
    assert ci["exact"]["n"] == len(test_rows) >= 40
    # The margin is the bootstrap interval: its lower bound must clear the best text-blind answer.
    for field in (*FIELDS, None):
        chance = _majority_share(train_rows, test_rows, field)
        assert ci[field or "exact"]["low"] > chance, (field, ci[field or "exact"], chance)

    # Validation: the same, with an interval over the val items from the trained classifier itself.
    clf = EmbedClassifier.from_run(cfg, run_dir)
    answers = [a for a, _, _ in clf.predict([r["input"] for r in val_rows])]
    val = rate([a == r["teacher"] for a, r in zip(answers, val_rows)], resamples=1000, seed=0)
    assert val["value"] == pytest.approx(summaries["train"]["val_agreement"]["exact"], abs=1e-4)
    assert val["value"] == pytest.approx(results["val"]["agreement"], abs=1e-4)
    assert val["low"] > _majority_share(train_rows, val_rows, None), val


def test_heads_are_learnt_and_each_c_was_tried_on_val(ladder_run):
    run_dir, cfg, summaries = ladder_run
    from safetensors.numpy import load_file

    tensors = load_file(str(paths.head_path(run_dir) / paths.HEAD_WEIGHTS))
    meta = runio.read_json(paths.head_path(run_dir) / paths.HEAD_META)
    for f in meta["fields"]:
        weight = tensors[f"{f['name']}.weight"]
        assert weight.shape == (len(f["values"]), 384) and np.linalg.norm(weight) > 0.1, f["name"]
        report = summaries["train"]["fields"][f["name"]]
        assert set(report["tried"]) == {str(c) for c in cfg.student.head.c_grid}
        assert report["tried"][str(report["C"])] == max(report["tried"].values()) and report["converged"]
    predicted = [json.loads(line)["student"] for line in
                 (paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS).read_text().splitlines()]
    for field in FIELDS:  # the heads read the text: more than one answer per field
        assert len({p[field] for p in predicted}) > 1, field


def test_heads_match_scikit_learn_for_binary_multiclass_and_one_value_fields():
    """Our softmax(W x + b) is scikit-learn's predict_proba, for two classes (one sklearn row) as for many."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3
    y3 = rng.integers(0, 3, size=120)
    x = (centers[y3] + rng.normal(size=(120, 16))).astype(np.float32)
    labels = [{"three": ["a", "b", "c"][k], "two": bool(k == 0), "one": "only"} for k in y3]
    enums = {"three": ["a", "b", "c", "never"], "two": [True, False], "one": ["only", "other"]}
    hcfg = HeadConfig(c_grid=[1.0], class_weight=None)
    heads, report = fit_heads(x[:90], labels[:90], x[90:], labels[90:], enums, hcfg)

    for name in ("three", "two"):
        y = np.array([enums[name].index(r[name]) for r in labels[:90]])
        ref = LogisticRegression(C=1.0, max_iter=hcfg.max_iter).fit(x[:90], y)
        np.testing.assert_allclose(heads[name].probs(x[90:]), ref.predict_proba(x[90:]), atol=1e-4)
        assert heads[name].values == [enums[name][k] for k in ref.classes_]
    assert heads["three"].values == ["a", "b", "c"]  # a value the teacher never gave is never answered
    out = predict_heads(heads, x[90:])
    accuracy = np.mean([a["three"] == r["three"] and a["two"] == r["two"] for (a, _, _), r in zip(out, labels[90:])])
    assert accuracy > 0.9
    assert all(a["one"] == "only" and fc["one"] == pytest.approx(1.0) for a, _, fc in out)
    assert report["one"]["values_seen"] == 1
    for answer, confidence, field_conf in out:
        assert confidence == pytest.approx(np.prod(list(field_conf.values())))


def test_soft_targets_move_the_heads_distribution_to_the_teachers():
    """train.targets=soft for the classifier: fit to the teacher's distribution (each example repeated per value,
    weighted by its probability), the head's probabilities approach the teacher's; hard labels push them to ~1."""
    from sklearn.linear_model import LogisticRegression

    from distill.student.heads import _replicate

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(2, 8)) * 4
    y = rng.integers(0, 2, size=200)
    x = (centers[y] + rng.normal(size=(200, 8))).astype(np.float32)
    labels = [{"f": ["a", "b"][k]} for k in y]
    teacher = np.where(y[:, None] == 0, [0.8, 0.2], [0.3, 0.7])  # the teacher's top value is the cluster's
    hcfg = HeadConfig(c_grid=[100.0], class_weight=None)
    hard, _ = fit_heads(x, labels, x, labels, {"f": ["a", "b"]}, hcfg)
    soft, _ = fit_heads(x, labels, x, labels, {"f": ["a", "b"]}, hcfg, soft={"f": teacher})
    gap = {name: float(np.abs(h.probs(x) - teacher).mean()) for name, h in (("hard", hard["f"]), ("soft", soft["f"]))}
    assert gap["soft"] < 0.05 < 0.15 < gap["hard"], gap  # measured: the soft head reproduces the teacher's split
    # the same answers as hard labels (the top value is the teacher's either way)
    assert (soft["f"].probs(x).argmax(1) == hard["f"].probs(x).argmax(1)).mean() > 0.95
    # the replication is exact: weighted copies give sklearn the soft cross-entropy
    xr, yr, w = _replicate(x[:3], np.array([[0.8, 0.2], [1.0, 0.0], [0.5, 0.5]]))
    assert yr.tolist() == [0, 1, 0, 0, 1] and w.tolist() == [0.8, 0.2, 1.0, 0.5, 0.5] and xr.shape == (5, 8)
    assert LogisticRegression().fit(xr, yr, sample_weight=w).classes_.tolist() == [0, 1]


def test_soft_targets_are_balanced_by_probability_mass():
    """class_weight=balanced with soft targets weighs each class by its share of the teacher's probability mass (as
    hard labels weigh by count), not by the copies _replicate makes (one per value per example: all equal)."""
    from sklearn.utils.class_weight import compute_class_weight

    from distill.student.heads import soft_class_weight

    y = np.array([0, 0, 0, 1, 2, 2])
    one_hot = np.eye(3)[y]
    sklearn_balanced = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert list(soft_class_weight(one_hot).values()) == pytest.approx(sklearn_balanced)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    skew = np.tile([0.9, 0.1], (300, 1))  # a teacher that gives "b" a tenth of its mass everywhere
    skew[:30] = [0.4, 0.6]
    labels = [{"f": "a" if p[0] > 0.5 else "b"} for p in skew]
    share = {}
    for cw in (None, "balanced"):
        heads, _ = fit_heads(x, labels, x, labels, {"f": ["a", "b"]}, HeadConfig(c_grid=[1.0], class_weight=cw),
                             soft={"f": skew})
        share[cw] = float(heads["f"].probs(x)[:, 1].mean())
    assert share[None] == pytest.approx(0.15, abs=0.03)  # the teacher's mean mass on "b": 0.9 x 0.1 + 0.1 x 0.6
    assert share["balanced"] == pytest.approx(0.5, abs=0.05)  # balanced: both classes weigh the same in the loss


def test_published_head_is_safetensors_and_json_and_loads_without_pickle(ladder_run, monkeypatch):
    run_dir, _, _ = ladder_run
    model_dir = paths.stage_dir(run_dir, "publish") / paths.MODEL_DIR
    head_files = sorted(p.name for p in (model_dir / paths.HEAD_DIR).iterdir())
    assert head_files == sorted([paths.HEAD_WEIGHTS, paths.HEAD_META])
    suffixes = {p.suffix for p in model_dir.rglob("*") if p.is_file()}
    assert suffixes.isdisjoint({".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt"}), suffixes

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled while loading the published classifier")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    clf = EmbedClassifier.load_published(model_dir)
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)[:12]
    for (answer, confidence, _), row in zip(clf.predict([r["input"] for r in rows]), rows):
        assert answer == row["student"] and confidence == pytest.approx(row["confidence"], abs=1e-6)


def test_decide_routes_on_the_classifier_confidence(ladder_run):
    run_dir, cfg, _ = ladder_run
    rule = load_rule(paths.stage_dir(run_dir, "publish") / paths.ROUTING)
    assert rule.student.kind == "embed_classifier" and rule.student.stop == [] and rule.student.max_tokens is None
    assert rule.route.enabled, rule.route.reason
    request = {"metadata": {"distill_task": cfg.recipe.name}}
    clf = EmbedClassifier.load_published(paths.stage_dir(run_dir, "publish") / paths.MODEL_DIR)
    evaluated = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
    reasons = Counter()
    for answer, confidence, _ in clf.predict([r["input"] for r in evaluated]):
        decision = decide(rule, request, answer, confidence)
        assert decision.use_student == (confidence >= rule.route.confidence_threshold)
        reasons[decision.reason] += 1
    assert set(reasons) <= {"confident", "below_threshold"} and reasons["confident"] > 0
    # Live, the published files keep exactly the items evaluate's confidence would have kept.
    threshold = rule.route.confidence_threshold
    assert reasons["confident"] == sum(r["confidence"] >= threshold for r in evaluated)
    assert decide(rule, request, None, 0.99).reason == "invalid_answer"


def test_publish_folder_is_complete_without_gguf_or_llama_cpp(ladder_run):
    run_dir, _, summaries = ladder_run
    out = paths.stage_dir(run_dir, "publish")
    for name in (paths.DONE, paths.ROUTING, paths.ROUTING_SCHEMA, paths.SERVING, paths.PARITY, paths.MODEL_CARD):
        assert (out / name).is_file(), name
    encoder = out / paths.MODEL_DIR / paths.ENCODER_DIR
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (encoder / name).is_file(), name
    assert runio.sha256_file(encoder / "model.safetensors") == summaries["train"]["encoder"]["sha256"]
    assert not list(out.rglob("*.gguf")) and not (out / paths.LITELLM).exists() and not (out / paths.MODELFILE).exists()
    parity = runio.read_json(out / paths.PARITY)
    assert parity[paths.MODEL_DIR]["parity"] == 1.0
    assert parity[paths.MODEL_DIR]["n"] == summaries["evaluate"]["metrics"]["n"]
    card = (out / paths.MODEL_CARD).read_text()
    assert "rung: embed_classifier" in card and "LogisticRegression" in card and "lora" not in card.lower()
    assert "EmbedClassifier.load_published" in (out / paths.SERVING).read_text()
    train_done = runio.read_done(run_dir, "train")
    assert set(train_done["outputs"]) == {paths.HEAD_DIR}
    assert yaml.safe_load((out / paths.ROUTING).read_text())["student"]["artifacts"] == {
        "safetensors-embed_classifier": paths.MODEL_DIR}


def test_calibration_and_coverage_read_the_classifier_confidence(ladder_run):
    run_dir, _, _ = ladder_run
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    preds = runio.read_jsonl(paths.stage_dir(run_dir, "evaluate") / paths.PREDICTIONS)
    for p in preds:
        assert p["confidence"] == pytest.approx(np.prod([p["field_confidence"][f] for f in FIELDS]))
    whole = results["calibration"]["whole"]
    assert 0 <= whole["ece"] <= 1 and sum(b["n"] for b in whole["bins"]) == len(preds)
    for field in FIELDS:
        assert sum(b["n"] for b in results["calibration"]["fields"][field]["bins"]) == len(preds)
    coverage = [p["coverage"] for p in results["coverage_curve"]]
    assert coverage[0] == 1.0 and coverage == sorted(coverage, reverse=True) and coverage[-1] < 1.0
    assert results["val_coverage_curve"]


def _copy_without_publish(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=lambda d, names: ["publish"] if Path(d) == run_dir else [])
    return dest


def test_a_published_copy_that_answers_differently_is_not_published(ladder_run, tmp_path, monkeypatch):
    run_dir = _copy_without_publish(ladder_run[0], tmp_path / "run")
    cfg = load_config(_overrides(run_dir, "http://127.0.0.1:9/v1"))
    real = EmbedClassifier.predict

    def one_flipped(self, texts, batch_size=64):
        out = real(self, texts, batch_size)
        answer, confidence, fc = out[0]
        values = self.heads["category"].values
        out[0] = ({**answer, "category": values[(values.index(answer["category"]) + 1) % len(values)]}, confidence, fc)
        return out

    monkeypatch.setattr(EmbedClassifier, "predict", one_flipped)
    with pytest.raises(DistillError, match=r"answers differently from the evaluated one on 1 of \d+ items"):
        publish.run(cfg, run_dir)
    assert not (run_dir / "publish").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".publish-staging")]


def test_a_head_refuses_an_encoder_it_was_not_trained_on(ladder_run, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(paths.head_path(ladder_run[0]), head)
    meta = runio.read_json(head / paths.HEAD_META)
    meta["encoder"]["sha256"] = "0" * 64
    runio.write_json(head / paths.HEAD_META, meta)
    with pytest.raises(DistillError, match="not the one the head .* was trained on"):
        EmbedClassifier.load(head, embed_classifier.encoder_folder(ladder_run[1].student))


def test_free_text_recipe_is_refused_before_any_stage_runs(tmp_path):
    with pytest.raises(DistillError, match=r"free-text fields order_id, product; pick a causal-LM student"):
        load_config(["recipe=email_extraction", "student=embed_classifier", f"run_dir={tmp_path / 'x'}"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "distill", "run", "recipe=email_extraction",
                           "student=embed_classifier", f"run_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "student=embed_classifier" in lines[0] and "email_extraction" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_classifier_settings_are_checked_with_the_valid_choices(tmp_path):
    with pytest.raises(DistillError, match=r"student: .*source package .* or hf .*not 'random'"):
        load_config(["student=embed_classifier", "student.source=random", f"run_dir={tmp_path}"])
    with pytest.raises(DistillError, match=r"student.head.c_grid must be > 0"):
        load_config(["student=embed_classifier", "student.head.c_grid=[1.0,0]", f"run_dir={tmp_path}"])


# ---------------------------------------------------------------------------------------------------------------
# student=auto: the ladder climbs from the classifier to the LM only while the val agreement misses the target

AUTO = ("student=auto", "student.auto.rungs=[embed_classifier,tiny_random]")


def _auto_run(ladder_run, dest: Path, *extra: str, stages=("train", "evaluate", "publish")):
    """A run dir holding ladder_run's generate stage (same splits and labels), then ``stages`` with ``extra``."""
    dest.mkdir(parents=True)
    shutil.copytree(ladder_run[0] / "generate", dest / "generate")
    cfg = load_config([o for o in _overrides(dest, "http://127.0.0.1:9/v1") if o != "student=embed_classifier"]
                      + list(extra))
    return cfg, pipeline.run(cfg, stages)


@pytest.fixture(scope="module")
def auto_met(ladder_run, tmp_path_factory):
    """student=auto with a target the classifier meets on val: the whole pipeline."""
    run_dir = tmp_path_factory.mktemp("auto_met") / "run"
    cfg, summaries = _auto_run(ladder_run, run_dir, *AUTO)
    return run_dir, cfg, summaries


def test_auto_stops_at_the_classifier_when_it_meets_the_target(auto_met, ladder_run):
    run_dir, cfg, summaries = auto_met
    assert cfg.student.kind == "auto"
    lad = runio.read_json(paths.stage_dir(run_dir, "train") / paths.LADDER)
    assert lad["chosen"] == "embed_classifier" and lad["met_target"] is True
    first, second = lad["rungs"]
    assert first["rung"] == "embed_classifier" and first["trained"] and first["outcome"] == "chosen"
    # the ladder's val agreement is the classifier's own on val (the same heads as student=embed_classifier's)
    assert first["val_agreement"]["value"] == pytest.approx(ladder_run[2]["train"]["val_agreement"]["exact"],
                                                            abs=1e-4)
    assert first["val_agreement"]["value"] >= float(TARGET)
    assert first["val_agreement"]["n"] == len(_split(run_dir, "val"))
    assert first["usd_per_1k"] > 0 and first["items_per_s"] > 0 and first["latency_p50_s"] > 0
    assert second == {"rung": "tiny_random", "kind": "causal_lm", "trained": False,
                      "outcome": "not trained: embed_classifier met the target"}
    # the LM rung never trained: no adapter, no checkpoint, no step log
    train_dir = paths.stage_dir(run_dir, "train")
    assert not paths.adapter_path(run_dir).exists() and not (train_dir / paths.CHECKPOINTS_DIR).exists()
    assert not (train_dir / paths.TRAIN_METRICS).exists()
    done = runio.read_done(run_dir, "train")["summary"]
    assert done["rung"] == "embed_classifier" and done["student_kind"] == "embed_classifier"
    assert done["head_sha256"] == runio.sha256_tree(paths.head_path(run_dir)) and done["ladder"] == lad


def test_the_chosen_classifier_is_what_evaluate_publish_and_routing_use(auto_met, ladder_run):
    run_dir, cfg, summaries = auto_met
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    assert results["student"] == "embed_classifier"
    assert _predictor(results) == {"kind": "in_process", "student": "embed_classifier", "decode": "classifier"}
    # the same heads as the student=embed_classifier run: the same answers on every test item
    ref = runio.read_json(paths.stage_dir(ladder_run[0], "evaluate") / paths.RESULTS)
    assert results["metrics"]["agreement"] == ref["metrics"]["agreement"]
    assert results["ladder"]["chosen"] == "embed_classifier"
    assert results["embedding_baseline"]["status"] == "is_student"
    assert results["cost"]["student"]["name"] == "embed_classifier"
    rule = load_rule(paths.stage_dir(run_dir, "publish") / paths.ROUTING)
    assert rule.student.kind == "embed_classifier" and rule.student.model.endswith("embed_classifier")
    publish_dir = paths.stage_dir(run_dir, "publish")
    assert (publish_dir / paths.MODEL_DIR / paths.HEAD_DIR / paths.HEAD_WEIGHTS).is_file()
    assert not list(publish_dir.rglob("*.gguf"))
    card = (publish_dir / paths.MODEL_CARD).read_text()
    assert "rung: embed_classifier" in card and "## Student ladder (student=auto)" in card
    assert "| tiny_random | n/a |" in card
    report = (paths.stage_dir(run_dir, "evaluate") / paths.REPORT).read_text()
    assert "## Student ladder (student=auto)" in report and "Chosen: **embed_classifier**" in report


@pytest.fixture(scope="module")
def auto_climbed(ladder_run, tmp_path_factory):
    """student=auto with a target of 1.0, which neither rung reaches on this val split (the classifier agrees on
    about 59% of it): both rungs trained and measured; train + evaluate."""
    run_dir = tmp_path_factory.mktemp("auto_climb") / "run"
    cfg, summaries = _auto_run(ladder_run, run_dir, *AUTO, "publish.target_agreement=1.0",
                               stages=("train", "evaluate"))
    return run_dir, cfg, summaries


def test_auto_climbs_when_the_classifier_misses_and_keeps_the_better_rung(auto_climbed):
    run_dir, cfg, summaries = auto_climbed
    lad = runio.read_json(paths.stage_dir(run_dir, "train") / paths.LADDER)
    clf, lm = lad["rungs"]
    assert clf["trained"] and lm["trained"] and not clf["met_target"] and not lm["met_target"]
    assert lad["met_target"] is False and lad["why"].startswith("no rung met publish.target_agreement=1.0 ")
    # the LM rung was trained: its adapter is on disk and its weights moved away from LoRA's zero init
    from safetensors.torch import load_file

    lora = load_file(str(paths.adapter_path(run_dir) / "adapter_model.safetensors"))
    assert any(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k)
    assert lm["val_agreement"]["n"] == clf["val_agreement"]["n"] == len(_split(run_dir, "val"))
    # the LM rung's training was cut by the budget (train.max_steps) before train.epochs: the ladder says so
    assert lm["training"]["stopped_by"] == "max_steps" and "training" not in clf
    assert f"stopped early by train.max_steps={cfg.train.max_steps}" in lm["outcome"]
    # the rule: the best val agreement, or the cheaper rung whose interval overlaps it
    best, other = (clf, lm) if clf["val_agreement"]["value"] >= lm["val_agreement"]["value"] else (lm, clf)
    overlap = other["val_agreement"]["high"] >= best["val_agreement"]["low"]
    cheaper = min((clf, lm), key=lambda r: r["usd_per_1k"])
    expected = cheaper["rung"] if overlap and cheaper is other else best["rung"]
    assert lad["chosen"] == expected, lad
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    assert results["student"] == expected == summaries["train"]["rung"]
    assert results["predictor"]["decode"] == ("classifier" if expected == "embed_classifier" else cfg.eval.decode)
    assert [r["outcome"] for r in results["ladder"]["rungs"]].count("chosen") == 1


def test_choose_keeps_the_cheaper_rung_when_the_intervals_overlap():
    from distill.student.ladder import choose

    def rung(name, value, low, high, usd, met=False):
        return {"rung": name, "val_agreement": {"value": value, "low": low, "high": high}, "usd_per_1k": usd,
                "met_target": met}

    assert choose([rung("c", 0.99, 0.95, 1.0, 0.01, True), rung("l", 0.995, 0.97, 1.0, 0.5, True)], 0.98)[0] == 0
    pick, why = choose([rung("c", 0.80, 0.70, 0.88, 0.01), rung("l", 0.85, 0.76, 0.92, 0.5)], 0.98)
    assert pick == 0 and "overlaps" in why and "kept c" in why
    pick, why = choose([rung("c", 0.60, 0.50, 0.70, 0.01), rung("l", 0.90, 0.84, 0.95, 0.5)], 0.98)
    assert pick == 1 and "the best val agreement" in why


@pytest.fixture(scope="module")
def auto_lm(ladder_run, tmp_path_factory):
    """student=auto with the LM rung only: train + evaluate, so the baseline is measured beside an LM student."""
    run_dir = tmp_path_factory.mktemp("auto_lm") / "run"
    cfg, summaries = _auto_run(ladder_run, run_dir, "student=auto", "student.auto.rungs=[tiny_random]",
                               stages=("train", "evaluate"))
    return run_dir, cfg, summaries


def test_an_lm_rung_is_scored_by_evaluate_with_the_embedding_baseline_beside_it(auto_lm, ladder_run):
    run_dir, cfg, summaries = auto_lm
    assert summaries["train"]["rung"] == "tiny_random" and paths.adapter_path(run_dir).is_dir()
    assert not paths.head_path(run_dir).exists()
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    assert _predictor(results) == {"kind": "in_process", "student": "tiny_random", "decode": cfg.eval.decode}
    base = results["embedding_baseline"]
    assert base["status"] == "measured" and base["n"] == results["metrics"]["n"]
    # fit on the same train split and labels, C chosen on the same val split: it answers as the classifier student
    ref = runio.read_json(paths.stage_dir(ladder_run[0], "evaluate") / paths.RESULTS)
    for key in (*FIELDS, "exact"):
        assert base["agreement_ci"][key]["value"] == pytest.approx(ref["metrics"]["agreement"][key], abs=1e-4)
    assert base["vs_gold_ci"]["exact"]["value"] == pytest.approx(ref["metrics"]["student_vs_gold"]["exact"], abs=1e-4)
    student = results["metrics"]["agreement"]["exact"]
    assert base["student_minus_baseline"]["value"] == pytest.approx(student - base["agreement_ci"]["exact"]["value"],
                                                                    abs=1e-3)
    assert base["usd_per_1k"] > 0
    report = (paths.stage_dir(run_dir, "evaluate") / paths.REPORT).read_text()
    assert "embedding baseline (MiniLM + logistic regression" in report
    assert "| embedding baseline agreement with teacher |" in report


def test_the_baseline_can_be_turned_off(auto_lm):
    from distill.stages import evaluate

    run_dir, cfg, _ = auto_lm
    off = load_config([o for o in _overrides(run_dir, "http://127.0.0.1:9/v1") if o != "student=embed_classifier"]
                      + ["student=auto", "student.auto.rungs=[tiny_random]", "eval.embedding_baseline=false"])
    evaluate.run(off, run_dir)
    results = runio.read_json(paths.stage_dir(run_dir, "evaluate") / paths.RESULTS)
    base = results["embedding_baseline"]
    assert (base["status"], base["reason"]) == ("off", "eval.embedding_baseline=false")
    assert base["agreement_ci"] == {} and base["n"] is None
    assert "embedding baseline: eval.embedding_baseline=false" in \
        (paths.stage_dir(run_dir, "evaluate") / paths.REPORT).read_text()


def test_auto_settings_are_checked(tmp_path):
    with pytest.raises(DistillError, match=r"student.auto.rungs names 'nope', which is no student option"):
        load_config(["student=auto", "student.auto.rungs=[embed_classifier,nope]", f"run_dir={tmp_path}"])
    with pytest.raises(DistillError, match=r"student.auto.overrides names phi3_mini, which is not in"):
        load_config(["student=auto", "+student.auto.overrides.phi3_mini.path=x", f"run_dir={tmp_path}"])
    cfg = load_config(["profile=demo", f"run_dir={tmp_path}"])
    assert cfg.student.kind == "auto" and cfg.student.auto.rungs == ["embed_classifier", "smollm2_135m"]
    assert load_config(["profile=demo", "student=smollm2_135m", f"run_dir={tmp_path}"]).student.kind == "causal_lm"
