"""The cost case: the student priced at a named throughput, and re-priced from the artifact that ships."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import tiny_overrides

from distill.config import load_config
from distill.metrics.cost import cost_case, reprice_student

USAGE = [{"calls": 1, "prompt_tokens": 400.0, "cached_tokens": 0.0, "completion_tokens": 20.0, "latency_s": 0.8}] * 5


@pytest.fixture
def cfg(tmp_path):
    # a paid reference price (the fake teacher is free) and a one-off cost from 360 s of training
    return load_config(tiny_overrides(tmp_path, "http://127.0.0.1:9/v1", "eval.cost.student_usd_per_hour=0.36"))


def test_evaluate_names_the_predictor_it_timed(cfg):
    cost = cost_case(cfg, USAGE, 2.0, {"p50": 0.5, "p95": 0.9}, 360.0, 0.5)
    t = cost["student"]["throughput"]
    assert t["items_per_s"] == 2.0 and t["measured_by"] == "evaluate" and t["concurrency"] == 1
    assert f"eval.decode={cfg.eval.decode}, batch {cfg.eval.batch_size}" in t["runtime"]
    assert "not a published file" in t["artifact"]
    # $0.36/h at 2 items/s = $0.00005 a request
    assert cost["student_usd_per_1k"] == pytest.approx(0.05)


def test_reprice_prices_the_student_at_the_served_throughput_and_keeps_the_teacher(cfg):
    cost = cost_case(cfg, USAGE, 2.0, {"p50": 0.5, "p95": 0.9}, 360.0, 0.5)
    before = copy.deepcopy(cost)
    served = {"items_per_s": 4.0, "latency_p50_s": 0.25, "latency_p95_s": 0.3, "measured_by": "publish",
              "artifact": "model/x-q8_0.gguf", "runtime": "distill's student runtime", "concurrency": 1}
    out = reprice_student(cost, served)
    assert cost == before  # the evaluated case is not touched
    assert out["student_usd_per_1k"] == pytest.approx(0.025)  # twice the items/s, half the price
    assert out["student"]["throughput"] == served and out["student"]["items_per_s"] == 4.0
    assert out["student"]["latency_p50_s"] == 0.25 and out["table"][3]["usd_per_1k"] == out["student_usd_per_1k"]
    for key in ("teacher", "teacher_usd_per_1k", "teacher_cached_usd_per_1k", "teacher_batch_usd_per_1k", "one_off"):
        assert out[key] == cost[key], key
    one_off = cost["one_off"]["total_usd"]
    for option, col in (("on_demand", "teacher_usd_per_1k"), ("cached", "teacher_cached_usd_per_1k"),
                        ("batch", "teacher_batch_usd_per_1k")):
        expected = math.ceil(one_off / (cost[col] / 1000 - 0.000025))
        assert out["break_even_requests"][option] == expected
        # a cheaper student pays back sooner than the evaluated one did (batch: never at 2 items/s, $0.05 > $0.036)
        was = cost["break_even_requests"][option]
        assert (was is None) == (option == "batch") and (was is None or expected < was)
    assert [r["break_even_requests"] for r in out["table"][:3]] == list(out["break_even_requests"].values())


def test_reprice_refuses_a_pass_that_measured_nothing(cfg):
    cost = cost_case(cfg, USAGE, 2.0, {}, None, None)
    with pytest.raises(ValueError, match="cannot price the student at 0"):
        reprice_student(cost, {"items_per_s": 0})
