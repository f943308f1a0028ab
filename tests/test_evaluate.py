"""Evaluate: metrics with known answers, the scored decoder against brute force, endpoints that fail, the CI gate."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import tiny_overrides

from distill import DistillError, paths, runio
from distill.config import load_config
from distill.data import dedup as decontam
from distill.metrics import stats
from distill.metrics.gate import evaluate_gate, junit_xml
from distill.stages import evaluate
from distill.student import scored
from distill.student.endpoint import predict_endpoint
from distill.student.predict import predict_in_process
from distill.student.predictions import agreement
from distill.task import common_prefix
from distill.task import Task
from distill.testing.fake_teacher import FakeTeacher


# ---------------------------------------------------------------------------------------------------------------
# statistics with known answers


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert stats.bootstrap_ci(np.ones(40)) == (1.0, 1.0)
    assert stats.rate([False] * 25) == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 25}


def test_bootstrap_interval_matches_the_binomial_normal_interval():
    # 300 agreements out of 1000: the analytic 95% interval is p +- 1.96 sqrt(p(1-p)/n) = 0.3 +- 0.0284.
    flags = np.array([1] * 300 + [0] * 700)
    low, high = stats.bootstrap_ci(flags, resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert low == pytest.approx(0.3 - half, abs=0.004)
    assert high == pytest.approx(0.3 + half, abs=0.004)
    # ten times fewer items: an interval about sqrt(10) times wider
    small = stats.rate([1] * 30 + [0] * 70, resamples=4000, seed=1)
    assert (small["high"] - small["low"]) / (high - low) == pytest.approx(math.sqrt(10), rel=0.15)


def test_vectorised_macro_f1_equals_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    ref, pred = rng.integers(0, 5, 200), rng.integers(-1, 5, 200)  # -1: invalid answers
    classes = np.arange(5)
    expected = f1_score(ref, pred, labels=classes, average="macro", zero_division=0)
    assert stats.macro_f1(ref, pred, classes) == pytest.approx(expected)
    batch = np.stack([ref, ref])
    assert stats.macro_f1(batch, np.stack([pred, ref]), classes).tolist() == pytest.approx([expected, 1.0])


def test_class_report_counts_invalid_answers_as_wrong():
    report = stats.class_report(["a", "b", "a", "b"], ["a", "b", None, "a"], ["a", "b", "c"])
    assert report["accuracy"]["value"] == 0.5
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["c"]["support"] == 0
    conf = stats.confusion(["a", "b", "a", "b"], ["a", "b", None, "a"], ["a", "b", "c"])
    assert conf["labels"] == ["a", "b", "c", stats.INVALID]
    assert conf["matrix"][0] == [1, 0, 0, 1] and conf["matrix"][1] == [1, 1, 0, 0]


def test_coverage_curve_on_a_known_confidence_list():
    # the item without a confidence (an invalid answer) is never covered, not even at threshold 0: the gateway's
    # decide sends it to the teacher, so counting it as kept would overstate coverage at a threshold of 0
    curve = stats.coverage_curve([0.9, 0.5, None, 0.7, 0.9], [True, False, False, True, False])
    assert [p["threshold"] for p in curve] == [0.0, 0.5, 0.7, 0.9]
    assert [p["n"] for p in curve] == [4, 4, 3, 2]
    assert [p["coverage"] for p in curve] == [0.8, 0.8, 0.6, 0.4]
    assert [p["agreement"] for p in curve] == [0.5, 0.5, 0.6667, 0.5]


def test_a_threshold_between_listed_points_keeps_what_the_upper_point_keeps():
    # 0.52286 would round UP to a listed threshold of 0.5229, which does not keep the item itself: a threshold between
    # 0 and that point then kept the item while the curve's upper point (what routing.point_at reads) did not
    from distill.routing import point_at

    conf = [0.52286, 0.9, 0.61, None, 0.70004]
    curve = stats.coverage_curve(conf, [True, True, False, False, True])
    for c in (c for c in conf if c is not None):  # every item is kept at the threshold listed for it
        listed = max(p["threshold"] for p in curve if p["threshold"] <= c)
        assert point_at(curve, listed)["n"] == sum(x is not None and x >= listed for x in conf)
    for t in (0.3, 0.55, 0.65, 0.8, 0.95):
        assert point_at(curve, t)["n"] == sum(x is not None and x >= t for x in conf), t


def test_calibration_table_and_ece_by_hand():
    conf = [0.95, 0.95, 0.55, 0.55, None]
    ok = [True, False, True, True, False]
    cal = stats.calibration(conf, ok, bins=10)
    assert cal["n"] == 4 and cal["n_without_confidence"] == 1
    assert [(b["n"], b["accuracy"]) for b in cal["bins"]] == [(2, 1.0), (2, 0.5)]
    # half the items are 0.45 under-confident (0.55 vs 1.0), half 0.45 over-confident (0.95 vs 0.5)
    assert cal["ece"] == pytest.approx(0.45)


def test_mcnemar_detects_a_real_drop_and_ignores_a_wobble():
    assert stats.mcnemar_drop([1] * 40, [1] * 30 + [0] * 10)["p_value"] < 0.01
    assert stats.mcnemar_drop([1] * 39 + [0], [1] * 38 + [0, 1])["p_value"] > 0.4


def test_decontamination_finds_exact_and_near_duplicates_only():
    train = [{"id": "t1", "input": "My order #123 never arrived, where is it?"},
             {"id": "t2", "input": "How do I reset my password for the mobile app on my new phone today?"},
             {"id": "t3", "input": "Cancel my subscription please"}]
    test = [{"id": "x1", "input": "my order 123 never arrived where is it"},            # exact after normalising
            {"id": "x2", "input": "How do I reset my password for the mobile app on my new phone?"},  # near
            {"id": "x3", "input": "The invoice shows a double charge for March."}]  # unrelated
    found = decontam.find_duplicates(train, test, threshold=0.8)
    assert found["x1"] == {"train_id": "t1", "kind": "exact", "jaccard": 1.0}
    assert found["x2"]["train_id"] == "t2" and found["x2"]["kind"] == "near" and found["x2"]["jaccard"] >= 0.8
    assert "x3" not in found
    assert "x2" not in decontam.find_duplicates(train, test, threshold=0.99)


# ---------------------------------------------------------------------------------------------------------------
# predictions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, task, model, tokenizer) of the tiny random student; no training needed to test the decoders."""
    from distill.student.models import load_base

    cfg = load_config(tiny_overrides(tmp_path_factory.mktemp("run"), "http://127.0.0.1:9/v1"))
    model, tokenizer = load_base(cfg)
    return cfg, Task(cfg), model.eval(), tokenizer


ROWS = [{"id": "r1", "input": "I was charged twice this month"},
        {"id": "r2", "input": "the app crashes when I open settings, please help asap"},
        {"id": "r3", "input": "where is my parcel"}]


def test_scored_decoding_equals_brute_force_log_likelihood(tiny):
    """The KV-cached, batched candidate scoring gives the same value probabilities as scoring each full text."""
    import torch

    from distill.task import dump_answer
    from distill.student.template import end_of_turn, render_prompt

    cfg, task, model, tokenizer = tiny
    preds = predict_in_process(cfg, task, ROWS, model, tokenizer)
    assert all(a is not None for a in preds.answers) and preds.failures == {}
    eot = end_of_turn(tokenizer)
    enums = task.schema.enums
    for row, answer, fconf, conf in zip(ROWS, preds.answers, preds.field_confidence, preds.confidence):
        prompt = tokenizer(render_prompt(tokenizer, task.student_messages(row["input"])),
                           add_special_tokens=False)["input_ids"]

        def loglik(text: str, start_text: str) -> float:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            head = tokenizer(start_text, add_special_tokens=False)["input_ids"]
            n = common_prefix(head, ids)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0].float().log_softmax(-1)
            return sum(logits[len(prompt) + j - 1, ids[j]].item() for j in range(n, len(ids)))

        # category first (no earlier field), then priority after the chosen category
        cat_head = '{"category": '
        cat = [loglik(cat_head + json.dumps(v) + ",", cat_head) for v in enums["category"]]
        probs = np.exp(np.array(cat) - np.logaddexp.reduce(cat))
        assert enums["category"][int(np.argmax(probs))] == answer["category"]
        assert fconf["category"] == pytest.approx(probs.max(), abs=1e-4)
        pri_head = dump_answer({"category": answer["category"]})[:-1] + ', "priority": '
        pri = [loglik(pri_head + json.dumps(v) + "}" + eot, pri_head) for v in enums["priority"]]
        probs = np.exp(np.array(pri) - np.logaddexp.reduce(pri))
        assert enums["priority"][int(np.argmax(probs))] == answer["priority"]
        assert fconf["priority"] == pytest.approx(probs.max(), abs=1e-4)
        assert conf == pytest.approx(fconf["category"] * fconf["priority"], rel=1e-4)


def test_free_decoding_reports_invalid_answers_honestly(tiny):
    cfg, task, model, tokenizer = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.eval.decode, cfg.eval.max_new_tokens = "free", 6
    preds = predict_in_process(cfg, task, ROWS, model, tokenizer)
    assert len(preds.raw) == 3 and all(isinstance(t, str) for t in preds.raw)
    # a random model does not write valid JSON: every item is counted, none is dropped
    assert sum(preds.failures.values()) == sum(a is None for a in preds.answers) == 3
    assert preds.items_per_s > 0 and len(preds.latency_s) == 3


def test_free_text_fields_are_generated_in_scored_mode(tiny):
    cfg, _, model, tokenizer = tiny
    cfg = cfg.model_copy(deep=True)
    cfg.recipe.output_schema = {"type": "object", "properties": {
        "order_id": {"type": ["string", "null"]}, "category": {"type": "string", "enum": ["billing", "shipping"]}},
        "required": ["order_id", "category"]}
    cfg.recipe.few_shot = None  # the shipped few-shot labels follow the shipped schema
    cfg.eval.max_new_tokens = 6
    preds = predict_in_process(cfg, Task(cfg), ROWS, model, tokenizer)
    for answer, why, raw in zip(preds.answers, preds.invalid_reason, preds.raw):
        # a random model rarely closes its string: counted with what it wrote, never raised
        assert (answer is None) == (why is not None) and raw.startswith('{"order_id": ')


def test_a_generated_value_is_cut_at_its_end_and_scored_on_its_own_tokens(tiny):
    """The value is parsed from what the model wrote after the head; its confidence is the mean probability of
    the tokens that make up the value, not of what follows it."""
    import torch
    from types import SimpleNamespace

    _, _, _, tokenizer = tiny
    written = tokenizer('"ORD-7", "category', add_special_tokens=False)["input_ids"]
    in_value = len(tokenizer('"ORD-7"', add_special_tokens=False)["input_ids"])

    class Stub:
        device = torch.device("cpu")

        def generate(self, input_ids, **kwargs):
            rows = torch.tensor([written] * input_ids.shape[0])
            return SimpleNamespace(sequences=torch.cat([input_ids, rows], 1), scores=None)

        def compute_transition_scores(self, sequences, scores, normalize_logits):
            lp = torch.full((sequences.shape[0], len(written)), math.log(0.1))
            lp[:, :in_value] = math.log(0.5)
            return lp

    prompts = [[1, 2, 3], [4, 5]]
    out = list(scored._generate_values(Stub(), tokenizer, prompts, ['{"order_id": '] * 2, "<|im_end|>", 8))
    assert [(v, why) for v, _, why, _ in out] == [("ORD-7", None), ("ORD-7", None)]
    assert out[0][1] == pytest.approx(0.5)


def test_agreement_never_matches_none():
    a = [{"x": 1}, None, {"x": 2}]
    assert agreement(a, [{"x": 1}, None, {"x": 3}]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        agreement(a, a[:2])


def _cfg(tmp_path, *extra):
    return load_config(tiny_overrides(tmp_path / "run", "http://127.0.0.1:9/v1", *extra))


def test_endpoint_down_is_counted_not_raised(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path, "eval.endpoint.max_retries=0")
    preds = predict_endpoint(cfg, Task(cfg), ROWS, f"http://127.0.0.1:{port}/v1", "student")
    assert preds.answers == [None, None, None]
    assert preds.failures == {"connection_error": 1, "not_sent_endpoint_down": 2}


def test_endpoint_garbage_and_errors_are_counted(tmp_path, gold_by_text):
    answers = iter(['{"category": "billing", "priority": "high"}', "lorem ipsum", '{"category": "weather"}'])
    cfg = _cfg(tmp_path)
    cfg.eval.endpoint.concurrency = 1
    with FakeTeacher(lambda messages: next(answers)) as server:
        preds = predict_endpoint(cfg, Task(cfg), ROWS, server.base_url, "student")
        assert len(server.calls) == 3 and server.calls[0]["messages"][-1]["content"] == ROWS[0]["input"]
    assert preds.answers[0] == {"category": "billing", "priority": "high"}
    assert preds.failures == {"invalid_json": 1, "schema_violation": 1}
    assert 0 < preds.confidence[0] <= 1 and preds.confidence[1] is None
    cfg.eval.endpoint.max_retries = 0
    with FakeTeacher(lambda m: "{}", status=500) as broken:
        failed = predict_endpoint(cfg, Task(cfg), ROWS, broken.base_url, "student")
    assert failed.failures == {"http_500": 3}


# ---------------------------------------------------------------------------------------------------------------
# the gate


def _synthetic(n_agree: int, n: int = 40):
    rows = [{"id": f"i{k}", "input": f"text {k}", "teacher": {"category": "billing", "priority": "low"},
             "gold": None} for k in range(n)]
    preds = [{"category": "billing", "priority": "low"} if k < n_agree else {"category": "feedback",
                                                                              "priority": "low"}
             for k in range(n)]
    return rows, preds


def _gate(cfg, rows, preds):
    metrics = evaluate.score(rows, preds, Task(cfg).schema)
    per_item = [{"id": r["id"], "agree": p == r["teacher"], "contaminated": False} for r, p in zip(rows, preds)]
    return metrics, per_item, evaluate_gate(cfg, metrics, per_item, ["category", "priority"])


def test_gate_fails_above_the_measured_value_and_passes_below(tmp_path):
    rows, preds = _synthetic(30)  # agreement 0.75
    _, _, above = _gate(_cfg(tmp_path, "eval.gate.min_agreement=0.8"), rows, preds)
    assert not above["passed"] and above["reasons"] == [
        "agreement 0.750 < eval.gate.min_agreement 0.8"]
    _, _, below = _gate(_cfg(tmp_path, "eval.gate.min_agreement=0.7"), rows, preds)
    assert below["passed"] and below["reasons"] == []
    # the interval's lower bound (~0.6) does not clear 0.7
    _, _, strict = _gate(_cfg(tmp_path, "eval.gate.min_agreement=0.7", "eval.gate.use_lower_bound=true"), rows, preds)
    assert not strict["passed"]
    _, _, field = _gate(_cfg(tmp_path, "+eval.gate.min_field_agreement.priority=1.0",
                               "+eval.gate.min_field_agreement.category=0.9"), rows, preds)
    assert field["reasons"] == ["category agreement 0.750 < eval.gate.min_field_agreement.category 0.9"]
    xml = ET.fromstring(junit_xml(field))
    assert xml.get("tests") == str(len(field["checks"])) and xml.get("failures") == "1"


def test_a_doctored_baseline_regression_is_caught(tmp_path):
    rows, preds = _synthetic(28)
    metrics, per_item, _ = _gate(_cfg(tmp_path), rows, preds)
    baseline = tmp_path / "baseline.json"
    # the baseline agreed on every item; this run lost 12 of them
    runio.write_json(baseline, {"metrics": {"agreement": {"exact": 1.0}},
                                "per_item": [{"id": p["id"], "agree": True} for p in per_item]})
    cfg = _cfg(tmp_path, f"eval.baseline={baseline}")
    gate = evaluate_gate(cfg, metrics, per_item, ["category", "priority"])
    assert not gate["passed"] and gate["reasons"][0].startswith("baseline_significant_drop: agreement 0.700 vs "
                                                                "baseline 1.000 on 40 shared items")
    assert gate["baseline"]["b"] == 12 and gate["baseline"]["c"] == 0
    # a baseline one item better is noise, not a regression
    runio.write_json(baseline, {"metrics": {"agreement": {"exact": 0.725}},
                                "per_item": [{"id": p["id"], "agree": k < 29} for k, p in enumerate(per_item)]})
    assert evaluate_gate(cfg, metrics, per_item, ["category", "priority"])["passed"]
    # ... unless a plain tolerance is set
    strict = _cfg(tmp_path, f"eval.baseline={baseline}", "eval.gate.max_drop=0.01")
    assert not evaluate_gate(strict, metrics, per_item, ["category", "priority"])["passed"]
    runio.write_json(baseline, {"not": "results"})
    with pytest.raises(DistillError, match="not a readable distill results.json"):
        evaluate_gate(cfg, metrics, per_item, ["category", "priority"])


# ---------------------------------------------------------------------------------------------------------------
# the command, end to end on a tiny trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fake_answer):
    """A run dir with generate + train finished: tiny random student, 60 inputs labelled by a fake teacher."""
    from distill import pipeline

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"

    with FakeTeacher(fake_answer) as teacher:
        overrides = tiny_overrides(run_dir, teacher.base_url, "generate.limit=60", "eval.limit=null")
        pipeline.run(load_config(overrides), stages=("generate", "train"))
    return run_dir, overrides


def _evaluate(capsys, overrides, *extra) -> tuple[int, str]:
    from distill.__main__ import main

    code = main(["evaluate", *overrides, *extra])
    return code, capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_command_writes_every_figure_and_gates(trained_run, capsys, tmp_path):
    run_dir, overrides = trained_run
    junit, summary = tmp_path / "ci" / "junit.xml", tmp_path / "ci" / "summary.md"
    code, err = _evaluate(capsys, overrides, f"eval.junit_xml={junit}", f"eval.summary_md={summary}")
    assert code == 0, err[-2000:]
    out = run_dir / "evaluate"
    results = runio.read_json(out / paths.RESULTS)
    for key in ("metrics", "confusion", "coverage_curve", "val_coverage_curve", "calibration", "cost", "speed",
                "decontamination", "gate", "per_item", "predictor"):
        assert results[key] is not None, key
    m = results["metrics"]
    n_test = len(runio.read_jsonl(paths.split_path(run_dir, "test")))
    assert m["n"] + results["decontamination"]["n_excluded"] == n_test >= 8
    exact = m["agreement_ci"]["exact"]
    assert exact["low"] <= exact["value"] <= exact["high"] and m["invalid_rate"] == 0.0  # scored: valid by construction
    assert set(m["fields"]["category"]["vs_teacher"]) >= {"accuracy", "macro_f1", "per_class"}
    assert m["student_vs_gold_ci"]["exact"]["n"] == m["n_gold"] > 0
    conf = results["confusion"]["priority"]
    assert sum(map(sum, conf["matrix"])) == m["n"] and conf["labels"][:4] == ["low", "medium", "high", "urgent"]
    assert results["coverage_curve"][0] == {"threshold": 0.0, "coverage": 1.0, "agreement": exact["value"],
                                            "n": m["n"]}
    assert results["val_coverage_curve"] and results["calibration"]["whole"]["ece"] is not None
    cost = results["cost"]
    assert cost["teacher_usd_per_1k"] > 0 and cost["student_usd_per_1k"] > 0
    assert cost["teacher"]["items_priced"] == 60 and cost["one_off"]["train_s"] > 0
    assert results["speed"]["items_per_s"] > 0 and results["speed"]["latency_p95_s"] > 0
    for name in ("report.md", "coverage.png", "cost.png", "confusion_category.png", "confusion_priority.png",
                 "junit.xml", "summary.md", "predictions.jsonl"):
        assert (out / name).stat().st_size > 0, name
    report = (out / paths.REPORT).read_text()
    assert report.startswith("# Evaluation") and "**Gate: PASS**" in report and "## Cost" in report
    assert ET.parse(junit).getroot().get("failures") == "0" and "PASS" in summary.read_text()

    # a threshold above the measured value fails with exit code 3 and one line; at the value it passes
    above = min(1.0, exact["value"] + 0.05)
    code, err = _evaluate(capsys, overrides, f"eval.gate.min_agreement={above}")
    errors = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert code == 3 and errors == [f"distill: error: evaluate gate failed: agreement {exact['value']:.3f} < "
                                    f"eval.gate.min_agreement {above}"]
    assert "**Gate: FAIL" in (out / paths.REPORT).read_text()
    assert ET.parse(out / paths.JUNIT_XML).getroot().get("failures") == "1"

    # a doctored baseline that agreed with the teacher on every item: this run is a significant regression
    doctored = dict(results)
    doctored["metrics"] = {**m, "agreement": {**m["agreement"], "exact": 1.0}}
    doctored["per_item"] = [{**p, "agree": True} for p in results["per_item"]]
    runio.write_json(tmp_path / "baseline.json", doctored)
    code, err = _evaluate(capsys, overrides, f"eval.baseline={tmp_path / 'baseline.json'}")
    assert code == 3 and "baseline_significant_drop" in err and "McNemar" in err


@pytest.mark.integration
def test_evaluate_endpoint_that_answers_garbage_or_is_down(trained_run, capsys):
    import socket

    run_dir, overrides = trained_run
    with FakeTeacher(lambda messages: "I am not JSON at all") as server:
        code, err = _evaluate(capsys, overrides, f"eval.endpoint.base_url={server.base_url}",
                              "eval.endpoint.model=published")
        assert len(server.calls) > 0
    errors = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert f"no valid answer from {server.base_url}" in errors[0] and "invalid_json" in errors[0]
    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    assert results["predictor"]["kind"] == "endpoint"
    assert results["metrics"]["failures"]["invalid_json"] == results["metrics"]["n"] + results[
        "decontamination"]["n_excluded"]
    assert "invalid_json" in (run_dir / "evaluate" / paths.REPORT).read_text()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = _evaluate(capsys, overrides, f"eval.endpoint.base_url=http://127.0.0.1:{port}/v1",
                          "eval.endpoint.model=published", "eval.endpoint.max_retries=0")
    errors = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert code == 2 and len(errors) == 1 and "connection_error 1" in errors[0]
    report = (run_dir / "evaluate" / paths.REPORT).read_text()
    assert "not_sent_endpoint_down" in report and "connection_error" in report


def _prompt_cache(model, tokenizer, prompts: list[str]):
    """(cache, mask, log-probs after the prompt) as `scored_batch` builds them for its candidates."""
    import torch

    tokenizer.padding_side = "left"
    ids, mask = scored.encode_left(tokenizer, [scored.token_ids(tokenizer, p) for p in prompts])
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
    cache = out.cache if scored._cache_kw() == "cache" else out.past_key_values
    return cache, mask, torch.log_softmax(out.logits[:, -1].float(), -1)


def test_trie_scoring_of_many_values_equals_scoring_each_value_on_its_own(tiny):
    """120 enum values sharing token prefixes (plus numbers, null, booleans, non-ASCII), after heads of different
    lengths, as a middle and as a last field: the shared-head + trie pass gives the per-candidate probabilities."""
    import torch

    from distill.task import answer_head
    from distill.student.template import end_of_turn, render_prompt

    cfg, task, model, tokenizer = tiny
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(r["input"])) for r in ROWS]
    cache, mask, last_logp = _prompt_cache(model, tokenizer, prompts)
    stems = ["card", "card_arrival", "cash", "account", "top_up", "transfer", "exchange_rate", "pin", "refund",
             "beneficiary", "Überweisung", "direct debit"]
    values = [f"{s}_{e}" for s in stems for e in ("fee", "failed", "pending", "limit", "not_working", "x", "")]
    values = values[:115] + [1, 22, None, True, False]
    heads_sets = {"first field": [answer_head({}, "intent")] * len(ROWS),
                  "after other fields": [answer_head({"category": "billing"}, "intent"),
                                         answer_head({"category": "technical", "note": "a b"}, "intent"),
                                         answer_head({"n": 3}, "intent")]}
    for where, heads in heads_sets.items():
        for last in (False, True):
            tails = [json.dumps(v, ensure_ascii=False) + ("}" + eot if last else ",") for v in values]
            with torch.inference_mode():
                reference = scored._tail_probs_per_candidate(model, tokenizer, cache, mask, last_logp, heads,
                                                               tails)
                fast = scored._tail_probs(model, tokenizer, cache, mask, last_logp, heads, tails)
            assert fast.shape == (len(ROWS), len(values))
            # the values really differ in probability, so a wrong token or position would show
            assert (reference.max(-1).values / reference.min(-1).values > 3).all(), where
            assert torch.equal(fast.argmax(-1), reference.argmax(-1)), (where, last)
            assert torch.allclose(fast, reference, atol=1e-4, rtol=0), (where, last)
            assert torch.allclose(fast.log(), reference.log(), atol=1e-3), (where, last)


def test_trie_scoring_does_not_touch_the_prompt_cache(tiny):
    """Every field scores on the same prompt cache: scoring one field leaves it as it was."""
    import torch

    from distill.task import answer_head
    from distill.student.template import render_prompt

    cfg, task, model, tokenizer = tiny
    cache, mask, last_logp = _prompt_cache(model, tokenizer, [render_prompt(tokenizer, task.student_messages("hi"))])
    before = cache.get_seq_length()
    with torch.inference_mode():
        scored._tail_probs(model, tokenizer, cache, mask, last_logp, [answer_head({"a": 1}, "b")],
                             ['"x",', '"xy",', "null,"])
    assert cache.get_seq_length() == before
