"""The CI gate: configured thresholds and an optional baseline results.json -> pass/fail with one-line reasons.

    python -m distill evaluate run_dir=DIR eval.gate.min_agreement=0.9 eval.baseline=main/results.json

A baseline fails the gate on a *significant* drop: McNemar's exact test on the per-item agreement flags of the
items both runs scored (``per_item`` in results.json), so a one-item wobble on a small test set does not block a
merge while a real regression does. ``eval.gate.max_drop`` adds a plain tolerance on top.

evaluate decides the gate (``evaluate_gate``) and records it in results.json and its DONE.json summary; everyone
downstream (the pipeline before publish, the ``evaluate`` command's exit code, publish) reads that verdict through
``failure_reasons``, the one place that says what counts as a failed gate.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from distill import DistillError, contracts
from distill.config import Config
from distill.metrics.stats import format_interval, mcnemar_drop


def failure_reasons(evaluation: dict) -> list[str] | None:
    """The recorded gate's verdict: None when it passed, else its one-line reasons.

    ``evaluation`` is evaluate's DONE.json summary or its results.json (both carry ``gate``); a run evaluated
    without a gate record counts as passed.
    """
    gate = evaluation.get("gate") or {}
    if gate.get("passed", True):
        return None
    return list(gate.get("reasons") or ["the gate failed without a recorded reason"])


def _check(name: str, value: float | None, op: str, threshold: float, detail: str = "") -> dict:
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": bool(ok), "detail": detail}


def evaluate_gate(cfg: Config, metrics: dict, per_item: list[dict], fields: list[str]) -> dict:
    """Apply ``eval.gate.*`` and ``eval.baseline`` to headline metrics; returns the ``gate`` dict of results.json.

    Raises DistillError for a gate that cannot be evaluated as configured (unknown field, unreadable baseline).
    """
    g = cfg.eval.gate
    bound = "low" if g.use_lower_bound else "value"
    worst = "high" if g.use_lower_bound else "value"
    which = " (interval lower bound)" if g.use_lower_bound else ""
    valid = round((1 - metrics["invalid_rate"]) * metrics["n"]) if metrics["n"] else 0
    checks = [_check("any_valid_answer", valid, ">=", 1, f" of {metrics['n']} items"),
              _check("min_agreement", metrics["agreement_ci"]["exact"][bound], ">=", g.min_agreement, which),
              _check("max_invalid_rate", metrics["invalid"][worst], "<=", g.max_invalid_rate,
                     " (interval upper bound)" if g.use_lower_bound else "")]
    if g.min_accuracy is not None:
        acc = (metrics.get("student_vs_gold_ci") or {}).get("exact", {}).get(bound)
        checks.append(_check("min_accuracy", acc, ">=", g.min_accuracy,
                             which if acc is not None else " (no gold labels in the split)"))
    unknown = sorted(set(g.min_field_agreement) - set(fields))
    if unknown:
        raise DistillError(f"eval.gate.min_field_agreement names unknown fields {unknown}; fields: {fields}")
    for field, floor in g.min_field_agreement.items():
        checks.append(_check(f"min_field_agreement.{field}", metrics["agreement_ci"][field][bound], ">=", floor,
                             which))
    baseline = None
    if cfg.eval.baseline:
        baseline, base_checks = compare_baseline(cfg, metrics, per_item)
        checks += base_checks
    reasons = [_reason(c) for c in checks if not c["passed"]]
    return {"passed": not reasons, "reasons": reasons, "checks": checks, "baseline": baseline,
            "thresholds": {"min_agreement": g.min_agreement, "max_invalid_rate": g.max_invalid_rate,
                           "min_accuracy": g.min_accuracy, "min_field_agreement": g.min_field_agreement,
                           "use_lower_bound": g.use_lower_bound, "baseline": cfg.eval.baseline,
                           "baseline_alpha": g.baseline_alpha, "max_drop": g.max_drop}}


_LABELS = {"min_agreement": "agreement", "max_invalid_rate": "invalid rate", "min_accuracy": "accuracy vs gold"}


def _reason(c: dict) -> str:
    """One line: what was measured, against which setting."""
    if c["name"].startswith("baseline"):
        return f"{c['name']}: {c['detail']}"
    if c["name"] == "any_valid_answer":
        return f"no valid answer: {c['value']}{c['detail']} were valid"
    label = _LABELS.get(c["name"]) or c["name"].split(".", 1)[-1] + " agreement"
    shown = "n/a" if c["value"] is None else f"{c['value']:.3f}"
    bad = "<" if c["op"] == ">=" else ">"
    return f"{label} {shown}{c['detail']} {bad} eval.gate.{c['name']} {c['threshold']}"


def compare_baseline(cfg: Config, metrics: dict, per_item: list[dict]) -> tuple[dict, list[dict]]:
    """Paired comparison with a previous results.json (McNemar on shared item ids), or unpaired when none are
    shared (fails when the baseline's agreement lies above the current interval)."""
    path = Path(cfg.eval.baseline)
    try:
        base = contracts.load_baseline(path)
    except DistillError as exc:
        raise DistillError(f"eval.baseline={path} is not a readable distill results.json ({exc}); point it at "
                           f"evaluate/results.json of an earlier run") from None
    base_value = base["metrics"]["agreement"]["exact"]
    g = cfg.eval.gate
    current = {p["id"]: p["agree"] for p in per_item if not p.get("contaminated")}
    previous = {p["id"]: p["agree"] for p in base.get("per_item") or [] if not p.get("contaminated")}
    shared = sorted(set(current) & set(previous))
    checks = []
    if shared:
        test = mcnemar_drop([previous[i] for i in shared], [current[i] for i in shared])
        base_rate = sum(previous[i] for i in shared) / len(shared)
        cur_rate = sum(current[i] for i in shared) / len(shared)
        drop = base_rate - cur_rate
        info = {"path": str(path), "mode": "paired", "n_shared": len(shared), "baseline_agreement": round(base_rate, 4),
                "agreement": round(cur_rate, 4), "drop": round(drop, 4), **test}
        significant = drop > 0 and test["p_value"] < g.baseline_alpha
        checks.append({"name": "baseline_significant_drop", "value": test["p_value"], "op": ">=",
                       "threshold": g.baseline_alpha, "passed": not significant,
                       "detail": f"agreement {cur_rate:.3f} vs baseline {base_rate:.3f} on {len(shared)} shared items"
                                 f" (McNemar p={test['p_value']:.4f} < {g.baseline_alpha}; {test['b']} items lost,"
                                 f" {test['c']} gained; {path})"})
    else:
        cur = metrics["agreement_ci"]["exact"]
        drop = base_value - (cur["value"] or 0.0)
        info = {"path": str(path), "mode": "unpaired", "n_shared": 0, "baseline_agreement": base_value,
                "agreement": cur["value"], "drop": round(drop, 4)}
        above = cur["high"] is not None and base_value > cur["high"]
        checks.append({"name": "baseline_significant_drop", "value": base_value, "op": "<=", "threshold": cur["high"],
                       "passed": not above,
                       "detail": f"baseline agreement {base_value:.3f} lies above this run's interval "
                                 f"[{cur['low']}, {cur['high']}] (no shared item ids; {path})"})
    if g.max_drop is not None:
        checks.append({"name": "baseline_max_drop", "value": round(drop, 4), "op": "<=", "threshold": g.max_drop,
                       "passed": drop <= g.max_drop,
                       "detail": f"agreement dropped {drop:.3f} > eval.gate.max_drop {g.max_drop} ({path})"})
    return info, checks


def junit_xml(gate: dict, suite: str = "distill.evaluate") -> str:
    """One JUnit test case per gate check, so a CI job page lists each threshold as passed or failed."""
    checks = gate["checks"]
    root = ET.Element("testsuite", name=suite, tests=str(len(checks)),
                      failures=str(sum(not c["passed"] for c in checks)), errors="0")
    for c in checks:
        case = ET.SubElement(root, "testcase", classname=f"{suite}.gate", name=c["name"])
        if not c["passed"]:
            failure = ET.SubElement(case, "failure", message=_reason(c))
            failure.text = _reason(c)
        else:
            ET.SubElement(case, "system-out").text = f"value {c['value']} {c['op']} {c['threshold']}"
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def summary_markdown(results: dict) -> str:
    """A short Markdown block for a CI job page ($GITHUB_STEP_SUMMARY): verdict, headline numbers, each check."""
    g, m = results["gate"], results["metrics"]
    a = m["agreement_ci"]["exact"]
    lines = [f"### distill evaluate `{results['recipe']}`: {'PASS' if g['passed'] else 'FAIL'}", "",
             f"Agreement with the teacher {format_interval(a)} on {m['n']} items; invalid answers "
             f"{format_interval(m['invalid'])}.", "",
             "| check | measured | threshold | result |", "|---|---|---|---|"]
    for c in g["checks"]:
        value = "n/a" if c["value"] is None else c["value"]
        lines.append(f"| {c['name']} | {value} | {c['op']} {c['threshold']} | {'pass' if c['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"
