"""The run directory's typed contracts: results.json and parity.json are checked on write and on read, and the
README's key table says what the model holds."""

import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from distill import DistillError, contracts

README = Path(__file__).resolve().parents[1] / "README.md"


def _interval(v):
    return {"value": v, "low": max(0.0, v - 0.1), "high": min(1.0, v + 0.1), "n": 10}


def minimal_results() -> dict:
    return {
        "schema_version": 2, "recipe": "toy", "split": "test", "student": "tiny", "teacher": "fake",
        "predictor": {"kind": "in_process", "student": "tiny", "decode": "scored"},
        "metrics": {"n": 10, "invalid_rate": 0.0, "invalid": _interval(0.0), "agreement": {"label": 0.8, "exact": 0.8},
                    "agreement_ci": {"label": _interval(0.8), "exact": _interval(0.8)}},
        "val": {"n": 4, "agreement": 0.75},
        "calibration": {"whole": {"bins": [], "ece": 0.1, "n": 10}},
        "cost": {"teacher": {}, "student": {}, "teacher_usd_per_1k": 0.2, "student_usd_per_1k": 0.01,
                 "one_off": {"total_usd": 0.01}, "break_even_requests": {"on_demand": 50}},
        "speed": {"items": 10, "wall_s": 1.0, "items_per_s": 10.0},
        "decontamination": {"n_checked": 10},
        "gate": {"passed": True, "reasons": []},
        "per_item": [{"id": f"t{i}", "agree": i < 8, "valid": True, "confidence": 0.9} for i in range(10)],
    }


def test_results_round_trip_keeps_keys_a_newer_writer_added(tmp_path):
    results = minimal_results()
    results["metrics"]["added_later"] = {"x": 1}
    contracts.write_results(tmp_path / "results.json", results)
    back = contracts.load_results(tmp_path / "results.json")
    assert back["metrics"]["added_later"] == {"x": 1}
    assert back["per_item"][9] == {"id": "t9", "agree": False, "valid": True, "confidence": 0.9,
                                   "contaminated": False}


def test_a_writer_bug_is_refused_before_anything_is_written(tmp_path):
    results = minimal_results()
    del results["metrics"]["n"]
    results["gate"]["passed"] = "maybe"
    with pytest.raises(DistillError) as err:
        contracts.write_results(tmp_path / "results.json", results)
    assert "metrics.n: Field required" in str(err.value) and "gate.passed" in str(err.value)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("content, says", [(None, "is missing"), ("{not json", "not readable JSON"),
                                           ("[1, 2]", "holds list"), ('{"recipe": "x"}', "metrics: Field required")])
def test_a_bad_results_file_is_named_with_what_is_wrong(tmp_path, content, says):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DistillError, match=re.escape(says)):
        contracts.load_results(path)


def test_schemas_are_published_and_require_the_documented_keys(tmp_path):
    written = contracts.write_schemas(tmp_path)
    assert sorted(p.name for p in written) == ["parity.schema.json", "results.schema.json"]
    schema = json.loads((tmp_path / "results.schema.json").read_text())
    assert {"metrics", "gate", "per_item", "predictor", "cost"} <= set(schema["required"])
    parity = json.loads((tmp_path / "parity.schema.json").read_text())
    assert parity["type"] == "object" and "additionalProperties" in parity


def _step(annotation):
    """(the model a field holds, whether the next key segment is a free dict key), looking through Optional / list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is dict:
        return _step(typing.get_args(annotation)[1])[0], True
    for arg in typing.get_args(annotation):
        found = _step(arg)
        if found[0] is not None or found[1]:
            return found
    return None, False


def _readme_keys() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### `evaluate/results.json` keys", 1)[1].split("\n#", 1)[0]
    keys = []
    for line in section.splitlines():
        if line.startswith("| `"):
            keys += re.findall(r"`([a-z_][a-z0-9_.{},<>\[\]]*)`", line.split("|")[1])
    return keys


def test_the_readme_key_table_matches_the_results_model():
    keys = _readme_keys()
    assert len(keys) > 20
    documented_top = set()
    for key in keys:
        model, free_key, segments = contracts.Results, False, key.split(".")
        documented_top.add(segments[0].split("[")[0])
        for seg in segments:
            names = [n for n in re.split(r"[{},]", seg.replace("[_ci]", "")) if n and not n.startswith("<")]
            if free_key:            # a dict's own keys (field names, artifact paths): not model fields
                free_key = False
                continue
            if model is None or not names:
                break
            for name in names:
                assert name in model.model_fields, f"README documents `{key}` but {model.__name__} has no {name!r}"
            model, free_key = _step(model.model_fields[names[0]].annotation)
    assert documented_top == set(contracts.Results.model_fields), \
        "README's results.json table and contracts.Results name different top-level keys"


def test_a_baseline_needs_only_what_the_comparison_reads(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"metrics": {"agreement": {"exact": 0.9}}, "per_item": [{"id": "a", "agree": True}]}))
    assert contracts.load_baseline(path)["per_item"][0]["id"] == "a"
    path.write_text(json.dumps({"metrics": {"agreement": {"exact": 0.9}}, "per_item": [{"id": "a"}]}))
    with pytest.raises(DistillError, match=r"per_item\.0\.agree: Field required"):
        contracts.load_baseline(path)
    path.write_text(json.dumps({"metrics": {"agreement": {"category": 0.9}}}))
    with pytest.raises(DistillError, match="no metrics.agreement.exact"):
        contracts.load_baseline(path)


def test_an_unusable_baseline_fails_before_evaluate_starts(tmp_path, capsys):
    from distill.__main__ import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    baseline = tmp_path / "main_results.json"
    baseline.write_text(json.dumps({"metrics": {"agreement": {"exact": 0.9}}, "per_item": [{"agree": True}]}))
    assert main(["evaluate", f"run_dir={run_dir}", f"eval.baseline={baseline}"]) == 2
    err = capsys.readouterr().err
    assert "eval.baseline is not usable" in err and "per_item.0.id: Field required" in err
    assert list(run_dir.iterdir()) == []
