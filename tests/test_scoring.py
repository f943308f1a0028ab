"""Log-probability scoring of fixed-value fields and contextual calibration (teacher.method=score)."""

from __future__ import annotations

import numpy as np
import pytest

from distill.teacher.scoring import calibrate, value_scores

VALUES = ["billing", "refund_return", "feedback"]


def test_value_scores_match_token_prefixes_and_floor_the_rest():
    top = [(" bill", -0.5), ("\"refund", -1.0), ("ref", -2.0), ("xyz", -3.0)]
    scores = value_scores(top, VALUES)
    assert scores[0] == -0.5
    assert scores[1] == -1.0  # best of the tokens that can begin "refund_return"
    assert scores[2] == -4.0  # absent: just below the lowest log-prob seen


def test_calibration_removes_a_value_the_model_always_prefers():
    # The model always puts most mass on value 0; the signal is in which other value is relatively higher.
    raw = np.log(np.array([[0.80, 0.15, 0.05],
                           [0.80, 0.05, 0.15],
                           [0.90, 0.05, 0.05]]))
    idx_raw, _ = calibrate(raw, enabled=False)
    idx_cal, conf = calibrate(raw, enabled=True)
    assert list(idx_raw) == [0, 0, 0]
    assert list(idx_cal) == [1, 2, 0]
    assert np.all((conf > 1 / 3) & (conf <= 1))


def test_prior_shifts_calibrated_choices_towards_expected_frequencies():
    from distill.teacher.scoring import few_shot_log_prior

    prior = few_shot_log_prior(["a", "a", "a", "b"], ["a", "b"])
    assert np.allclose(np.exp(prior), [4 / 6, 2 / 6])
    flat = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    idx, _ = calibrate(flat, True, prior)
    assert list(idx) == [0, 0]


def test_value_distribution_is_compact_and_ordered():
    from distill.teacher.scoring import value_distribution

    dist = value_distribution(np.array([0.2, 0.79996, 0.00001]), VALUES)
    assert list(dist) == ["refund_return", "billing"]  # most probable first; the one rounding to 0 left out
    assert dist == {"refund_return": 0.8, "billing": 0.2}


def _hand_calibrated(tops: list[list[tuple[str, float]]], values: list[str], seed_labels: list[str]) -> list[dict]:
    """The calibrated softmax of the score method, written out: best matching first-token log-prob per value (floor:
    the lowest returned minus 1), renormalised, minus each value's mean over the inputs, plus the add-one smoothed
    log-frequency of the value among the few-shot labels, softmax."""
    rows = []
    for top in tops:
        floor = min(lp for _, lp in top) - 1.0
        s = [max([lp for t, lp in top if v.startswith(t.strip().lower())], default=floor) for v in values]
        total = np.log(sum(np.exp(x) for x in s))
        rows.append([x - total for x in s])
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(len(values))]
    counts = [seed_labels.count(v) + 1 for v in values]
    prior = [np.log(c / sum(counts)) for c in counts]
    out = []
    for r in rows:
        z = [r[j] - mean[j] + prior[j] for j in range(len(values))]
        e = [np.exp(x - max(z)) for x in z]
        out.append({v: x / sum(e) for v, x in zip(values, e)})
    return out


@pytest.mark.integration
def test_score_method_writes_the_calibrated_distribution_and_soft_training_uses_it(tmp_path, gold_by_text):
    import json

    from conftest import tiny_overrides

    from distill import paths, pipeline
    from distill.config import load_config
    from distill.task import Task
    from distill.testing.fake_teacher import FakeTeacher

    def field_of(messages):
        return "category" if "the category only" in messages[0]["content"] else "priority"

    def top(messages):  # the gold value first, two rivals behind it, spread by the text so inputs differ
        gold = gold_by_text[messages[-1]["content"]][field_of(messages)]
        spread = 0.2 * (len(messages[-1]["content"]) % 4)
        rivals = [(" bill", -1.8 + spread), ("ship", -2.5)] if field_of(messages) == "category" else [("low", -1.4)]
        return [(gold, -0.1 - spread), *rivals]

    ledger = tmp_path / "ledger.sqlite"
    with FakeTeacher(lambda m: "x", top_logprobs_fn=top) as teacher:
        def run(name: str, *extra: str):
            cfg = load_config(tiny_overrides(tmp_path / name, teacher.base_url, "teacher.method=score",
                                             "generate.limit=8", "teacher.concurrency=1",
                                             f"generate.shared_ledger={ledger}", *extra))
            pipeline.run(cfg, stages=("generate",))
            return cfg, [json.loads(line) for s in paths.SPLITS
                         for line in paths.split_path(tmp_path / name, s).read_text().splitlines()]

        cfg, rows = run("first")
        calls = len(teacher.calls)
        assert calls == 2 * len(rows) == 16
        task = Task(cfg)
        for field, values in task.schema.enums.items():
            tops = [top([{"content": f"the {field} only"}, {"content": r["input"]}]) for r in rows]
            seeds = [label[field] for _, label in task.few_shot]
            for r, want in zip(rows, _hand_calibrated(tops, values, seeds)):
                got = r["provenance"]["distribution"][field]
                assert set(got) <= set(values)
                assert all(abs(got.get(v, 0.0) - p) < 1e-4 for v, p in want.items()), (got, want)
                top_p = max(want.values())  # the label and the distribution's first value are a most probable one
                assert want[r["teacher"][field]] == pytest.approx(top_p) and got[next(iter(got))] == max(got.values())
                assert r["provenance"]["confidence"][field] == pytest.approx(top_p, abs=1e-4)
                assert 0 < top_p < 0.999 and len(got) > 1  # a real distribution, not one-hot

        # Answers already paid for gain the same distribution from the ledger, without a new call.
        _, again = run("second")
        assert len(teacher.calls) == calls
        assert [r["provenance"]["distribution"] for r in again] == [r["provenance"]["distribution"] for r in rows]

    # Soft training reads the stored distribution, not the confidence fallback.
    train_cfg = load_config(tiny_overrides(tmp_path / "first", "http://127.0.0.1:9", "teacher.method=score",
                                           "generate.limit=8", "train.targets=soft", "train.max_steps=1",
                                           "train.threads=1"))
    summary = pipeline.run_stage(train_cfg, "train")
    n = summary["train_examples"]
    assert n > 0 and summary["soft_targets"]["fields_by_source"] == {"distribution": 2 * n}
