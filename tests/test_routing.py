"""The routing rule: threshold choice on a known curve, the per-request decision, validation of routing files."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy
import pytest
import yaml

from distill import DistillError
from distill.routing import (RoutingRule, RoutingRuleError, blended_cost, choose_threshold, decide, json_schema,
                             load_rule, point_at, validate_rule)
from distill.task import OutputSchema

# A validation curve with a known answer: agreement rises with the threshold while coverage falls.
CURVE = [
    {"threshold": 0.0, "coverage": 1.0, "agreement": 0.80, "n": 100},
    {"threshold": 0.5, "coverage": 0.90, "agreement": 0.90, "n": 90},
    {"threshold": 0.7, "coverage": 0.70, "agreement": 0.97, "n": 70},
    {"threshold": 0.8, "coverage": 0.60, "agreement": 0.98, "n": 60},
    {"threshold": 0.85, "coverage": 0.60, "agreement": 0.98, "n": 60},
    {"threshold": 0.9, "coverage": 0.40, "agreement": 1.0, "n": 40},
    {"threshold": 0.99, "coverage": 0.05, "agreement": 1.0, "n": 5},
]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["category"],
          "properties": {"category": {"type": "string", "enum": ["billing", "refund"]}}}


def rule_dict(**route) -> dict:
    choice = choose_threshold(CURVE, 0.98)
    base_route = {"enabled": True, "confidence_threshold": choice.threshold, "target_agreement": 0.98,
                  "expected_coverage": choice.coverage, "expected_agreement": choice.agreement,
                  "reason": "chosen on the val curve"}
    return {"schema_version": 1,
            "task": {"id": "tickets", "match": {"metadata": {"distill_task": "tickets"}, "model_aliases": ["tickets"]},
                     "output_schema": SCHEMA},
            "student": {"model": "tickets-small", "endpoint": "http://127.0.0.1:8080/v1",
                        "artifacts": {"gguf-q8_0": "model/t-q8_0.gguf"}, "stop": ["<|im_end|>"], "max_tokens": 32},
            "fallback": {"model": "gpt-4o-mini", "endpoint": "https://api.openai.com/v1",
                         "api_key_env": "OPENAI_API_KEY"},
            "route": {**base_route, **route},
            "cost": {"teacher_usd_per_1k": 0.2, "student_usd_per_1k": 0.02, "blended_usd_per_1k": 0.1,
                     "saving_vs_teacher": 0.5},
            "evidence": {"results_sha256": "a" * 64, "curve": "val_coverage_curve", "n_val": 100}}


@pytest.mark.parametrize("target, expected", [
    (0.98, (0.85, 0.60)),   # most coverage at >= 0.98; of the two equal-coverage points the stricter threshold
    (0.97, (0.7, 0.70)),
    (0.80, (0.0, 1.0)),     # everything qualifies: keep every answer
    (1.0, (0.9, 0.40)),     # 0.99 also reaches 1.0 but covers less
])
def test_threshold_is_the_most_coverage_that_meets_the_target(target, expected):
    choice = choose_threshold(CURVE, target)
    assert (choice.threshold, choice.coverage) == expected
    assert choice.agreement >= target


def test_no_threshold_when_the_target_is_out_of_reach_or_the_evidence_thin():
    assert choose_threshold(CURVE, 1.0, min_items=50) is None  # only the 40- and 5-item points reach 1.0
    assert choose_threshold([{"threshold": 0.0, "coverage": 1.0, "agreement": None, "n": 0}], 0.5) is None
    assert choose_threshold([], 0.5) is None
    with pytest.raises(DistillError, match="point 0 is malformed.*coverage"):
        choose_threshold([{"threshold": 0.1, "coverage": 2.0, "agreement": 0.9, "n": 3}], 0.5)


def test_point_at_applies_a_threshold_to_another_curve():
    assert point_at(CURVE, 0.86)["threshold"] == 0.9  # nothing was confident between 0.85 and 0.9
    assert point_at(CURVE, 0.7)["threshold"] == 0.7
    assert point_at(CURVE[3:], 0.1)["threshold"] == 0.8
    assert point_at(CURVE, 0.995) == {"threshold": 0.995, "coverage": 0.0, "agreement": None, "n": 0}
    assert point_at([], 0.5) is None


def test_point_at_keeps_what_a_gateway_keeps_at_a_threshold_between_the_listed_ones():
    """A val threshold applied to the test curve keeps the items at or above it, as decide() does; the item just
    below it goes to the teacher and is not counted (it was, by the highest listed point under the threshold)."""
    from distill.metrics.stats import coverage_curve

    confidence = [0.2, 0.41, 0.62, 0.83, None]
    agree = [False, True, True, False, False]
    curve = coverage_curve(confidence, agree)
    for threshold in (0.1, 0.3, 0.5, 0.62, 0.7, 0.9):
        kept = [i for i, c in enumerate(confidence) if c is not None and c >= threshold]
        point = point_at(curve, threshold)
        assert point["coverage"] == pytest.approx(len(kept) / len(confidence), abs=1e-4)
        assert point["agreement"] == (pytest.approx(sum(agree[i] for i in kept) / len(kept), abs=1e-4) if kept
                                      else None)


def test_blended_cost_pays_the_student_always_and_the_teacher_on_fallbacks():
    assert blended_cost(0.6, 0.2, 0.02) == (pytest.approx(0.02 + 0.4 * 0.2), pytest.approx(1 - 0.1 / 0.2))
    assert blended_cost(None, 0.2, 0.02) == (0.2, 0.0)  # route disabled: teacher only
    assert blended_cost(0.6, None, 0.02) == (None, None)


@pytest.mark.parametrize("request_, answer, confidence, keep, reason", [
    ({"metadata": {"distill_task": "tickets"}}, {"category": "billing"}, 0.90, True, "confident"),
    ({"model": "tickets"}, '{"category": "refund"}', 0.85, True, "confident"),  # at the threshold: kept
    ({"metadata": {"distill_task": "tickets"}}, {"category": "billing"}, 0.84, False, "below_threshold"),
    ({"metadata": {"distill_task": "tickets"}}, {"category": "billing"}, None, False, "no_confidence"),
    ({"metadata": {"distill_task": "tickets"}}, {"category": "weather"}, 0.99, False, "invalid_answer"),
    ({"metadata": {"distill_task": "tickets"}}, "not json {", 0.99, False, "invalid_answer"),
    ({"metadata": {"distill_task": "tickets"}}, None, 0.99, False, "invalid_answer"),
    ({"metadata": {"distill_task": "emails"}}, {"category": "billing"}, 0.99, False, "not_this_task"),
    ({"model": "gpt-4o"}, {"category": "billing"}, 0.99, False, "not_this_task"),
])
def test_decide_on_the_threshold_chosen_from_the_curve(request_, answer, confidence, keep, reason):
    rule = validate_rule(rule_dict())
    assert rule.route.confidence_threshold == 0.85
    decision = decide(rule, request_, answer, confidence)
    assert (decision.use_student, decision.reason) == (keep, reason)
    assert decision.target == ("student" if keep else "teacher")


TICKET = {"metadata": {"distill_task": "tickets"}}


@pytest.mark.parametrize("confidence", [math.nan, math.inf, -math.inf, 85, -0.1, 1.0001, True, False, "0.9", [0.9],
                                        numpy.float64("nan"), numpy.True_])
def test_decide_falls_back_on_a_confidence_that_is_not_a_finite_probability(confidence):
    decision = decide(validate_rule(rule_dict()), TICKET, {"category": "billing"}, confidence)
    assert (decision.use_student, decision.reason) == (False, "bad_confidence")


@pytest.mark.parametrize("threshold, confidence, keep, reason", [
    (0.0, 0.0, True, "confident"),            # the bottom of the range is a confidence, not a bad one
    (0.85, 0.0, False, "below_threshold"),
    (0.85, 1.0, True, "confident"),           # the top of the range too
    (1.0, 1.0, True, "confident"),
    (0.85, numpy.float64(0.99), True, "confident"),
    (0.85, numpy.float32(0.5), False, "below_threshold"),
    (0.85, 1, True, "confident"),             # an int in range (bool is not)
])
def test_decide_takes_any_finite_probability_including_the_ends_and_numpy_floats(threshold, confidence, keep,
                                                                                   reason):
    decision = decide(validate_rule(rule_dict(confidence_threshold=threshold)), TICKET, {"category": "billing"},
                      confidence)
    assert (decision.use_student, decision.reason) == (keep, reason)


@pytest.mark.parametrize("request_, reason", [
    ({"metadata": ["distill_task", "tickets"]}, "not_this_task"),
    ({"metadata": "tickets"}, "not_this_task"),
    ({"metadata": 7, "model": "tickets"}, "confident"),      # bad metadata counts as none; the alias still matches
    ({"metadata": ["tickets"], "model": "tickets"}, "confident"),
    (None, "not_this_task"),
    ("tickets", "not_this_task"),
    (["tickets"], "not_this_task"),
])
def test_decide_never_raises_on_a_request_or_metadata_that_is_not_a_dict(request_, reason):
    decision = decide(validate_rule(rule_dict()), request_, {"category": "billing"}, 0.99)
    assert (decision.use_student, decision.reason) == (reason == "confident", reason)


def test_decide_checked_skips_only_the_second_schema_check(monkeypatch):
    rule = validate_rule(rule_dict())
    calls = []
    real = type(rule.task.answer_schema).errors
    monkeypatch.setattr(type(rule.task.answer_schema), "errors", lambda self, a: calls.append(a) or real(self, a))
    assert decide(rule, TICKET, {"category": "billing"}, 0.9).reason == "confident" and len(calls) == 1
    assert decide(rule, TICKET, {"category": "billing"}, 0.9, checked=True).reason == "confident" and len(calls) == 1
    # what the caller could not check still falls back: no answer, text, a confidence under the threshold
    assert decide(rule, TICKET, None, 0.99, checked=True).reason == "invalid_answer"
    assert decide(rule, TICKET, '{"category": "weather"}', 0.99, checked=True).reason == "invalid_answer"
    assert decide(rule, TICKET, {"category": "billing"}, 0.5, checked=True).reason == "below_threshold"


@pytest.mark.parametrize("text", [
    'Sure, here it is: {"category": "billing"} Hope that helps.',
    '```json\n{"category": "refund"}\n```',
    '{"category": "billing"}\n<|im_end|>',
])
def test_decide_keeps_a_text_answer_that_evaluate_would_have_accepted(text):
    assert OutputSchema(SCHEMA).parse(text)[1] is None  # evaluate scores this answer, so it counted in coverage
    decision = decide(validate_rule(rule_dict()), TICKET, text, 0.99)
    assert (decision.use_student, decision.reason) == (True, "confident")


@pytest.mark.parametrize("output_schema, message", [
    ({"type": "object", "properties": {"a": {"type": "nonsense"}}},
     r"task\.output_schema: .*not a valid JSON schema at properties/a/type"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"},
     r"task\.output_schema: .*not a valid JSON schema at required"),
    ({"type": "array", "items": {"type": "string"}}, r"task\.output_schema: .*type: object and properties"),
    ({"type": "object"}, r"task\.output_schema: .*type: object and properties"),
])
def test_load_rule_rejects_an_output_schema_that_is_not_a_valid_object_schema(tmp_path, output_schema, message):
    data = rule_dict()
    data["task"]["output_schema"] = output_schema
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RoutingRuleError, match=message) as err:
        load_rule(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_disabled_route_always_falls_back():
    rule = validate_rule(rule_dict(enabled=False, confidence_threshold=None, expected_coverage=None,
                                   expected_agreement=None))
    assert decide(rule, {"model": "tickets"}, {"category": "billing"}, 1.0).reason == "route_disabled"


def test_load_rule_round_trip_and_json_schema(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(rule_dict()))
    rule = load_rule(path)
    assert isinstance(rule, RoutingRule) and rule.fallback.api_key_env == "OPENAI_API_KEY"
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**rule_dict(), "route": {**rule_dict()["route"], "confidence_threshold": 1.5}}, schema)
    json.dumps(schema)  # serialisable as routing.schema.json
    # a version 1 rule (no prompt), loaded, changed and dumped again as pydantic dumps it, loads again
    rule.route.confidence_threshold = 0.5
    path.write_text(yaml.safe_dump(rule.model_dump(mode="json")))
    assert load_rule(path).route.confidence_threshold == 0.5 and load_rule(path).schema_version == 1
    with pytest.raises(RoutingRuleError, match="'prompt' is a schema_version 2 key"):
        validate_rule({**rule_dict(), "prompt": {"system": "x"}})


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["route"].update(confidence_threshold=1.5), r"route\.confidence_threshold: .*less than or equal to 1"),
    (lambda d: d["route"].update(confidence_threshold=None), r"route: .*enabled route needs confidence_threshold"),
    (lambda d: d["student"].pop("endpoint"), r"student\.endpoint: Field required"),
    (lambda d: d["student"].update(stop=[]), r"student\.stop: "),
    (lambda d: d["task"]["match"].update(metadata={}, model_aliases=[]), r"task\.match: .*at least one"),
    (lambda d: d["evidence"].update(results_sha256="abc"), r"evidence\.results_sha256: "),
    (lambda d: d.update(extra_key=1), r"extra_key: Extra inputs are not permitted"),
    (lambda d: d.update(schema_version=7), r"schema_version 7 is not supported"),
])
def test_invalid_rules_are_rejected_naming_the_field(tmp_path, mutate, message):
    data = rule_dict()
    mutate(data)
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RoutingRuleError, match=message) as err:
        load_rule(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_or_unparseable_file_says_so(tmp_path):
    with pytest.raises(RoutingRuleError, match="does not exist"):
        load_rule(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("route: [unclosed\n")
    with pytest.raises(RoutingRuleError, match="not valid YAML"):
        load_rule(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RoutingRuleError, match="expected a mapping"):
        load_rule(bad)
