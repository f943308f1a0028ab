"""Log-probability scoring of fixed-value fields and contextual calibration (teacher.method=score)."""

from __future__ import annotations

import numpy as np

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
