"""Re-distillation reads the traffic log through the store: generate's fingerprint follows the log's content, and
``serve.store=redis`` reads the Redis stream the gateway wrote (a real redis-server on loopback, test_cache's).

A served run here is a generate-only run (its test split and ledger are all re-distillation reads); its traffic log
is written by the gateway's own writer (``open_traffic_log``), so no gateway needs to run.
"""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import tiny_overrides
from test_cache import redis_url  # noqa: F401  (the module-scoped redis-server fixture)

from distill import DistillError, paths, pipeline, runio
from distill.config import check_startup, load_config
from distill.serve.traffic import open_traffic_log, read_source, source_digest
from distill.stages.generate.traffic import PREFIX

NEW_TICKETS = [f"Customer {i}: the parcel for order {4000 + 13 * i} never arrived and nobody answers, day {i}"
               for i in range(6)]


@pytest.fixture(scope="module")
def served_generate(teacher, tmp_path_factory):
    """A run whose generate stage finished: the served run a re-distillation keeps the test split of."""
    run_dir = tmp_path_factory.mktemp("served") / "run"
    pipeline.run(load_config(tiny_overrides(run_dir, teacher.base_url)), stages=("generate",))
    return run_dir


def _log(cfg, run_dir, texts: list[str]) -> None:
    """Write traffic records as the gateway does (its writer, its store settings)."""
    writer = open_traffic_log(cfg, run_dir)
    for text in texts:
        writer.record({"id": text[:12], "ts": time.time(), "task": "support_tickets", "input": text, "route": "student",
                       "reason": "confident", "student": None, "teacher": None, "teacher_source": None})
    writer.close()


def _redistil_cfg(teacher, served, new, *extra: str):
    return load_config(tiny_overrides(new, teacher.base_url, "generate.source=traffic",
                                      f"generate.traffic={served}", *extra))


def _logged_inputs(run_dir) -> set[str]:
    return {r["input"] for s in ("train", "val") for r in runio.read_jsonl(paths.split_path(run_dir, s))
            if r["id"].startswith(PREFIX)}


def test_a_changed_traffic_log_reruns_generate_and_the_same_one_skips(served_generate, teacher, tmp_path):
    served = runio_copy(served_generate, tmp_path / "served")
    serve_cfg = load_config(tiny_overrides(served, teacher.base_url))
    _log(serve_cfg, served, NEW_TICKETS[:4])
    cfg = _redistil_cfg(teacher, served, tmp_path / "new")
    pipeline.run(cfg, stages=("generate",))
    first = runio.read_done(cfg.run_dir, "generate")
    kept_first = _logged_inputs(cfg.run_dir)
    assert kept_first and kept_first <= set(NEW_TICKETS[:4])

    calls = len(teacher.calls)
    pipeline.run(cfg, stages=("generate",))  # the same log: skipped, nothing asked
    assert runio.read_done(cfg.run_dir, "generate")["fingerprint"] == first["fingerprint"]
    assert len(teacher.calls) == calls

    _log(serve_cfg, served, NEW_TICKETS[4:])  # the same path, more traffic: generate runs again
    assert source_digest(cfg)["records"] == len(NEW_TICKETS)
    pipeline.run(cfg, stages=("generate",))
    again = runio.read_done(cfg.run_dir, "generate")
    assert again["fingerprint"] != first["fingerprint"]
    assert again["summary"]["traffic"]["distinct_inputs"] == len(NEW_TICKETS)
    added = _logged_inputs(cfg.run_dir) - kept_first
    # only the new inputs were asked (the first four are answered from the shared ledger)
    assert len(teacher.calls) - calls == again["summary"]["paid_calls_this_run"] == len(added) > 0


def test_redistil_reads_the_redis_stream_the_gateway_wrote(served_generate, teacher, redis_url, tmp_path):  # noqa: F811
    served = runio_copy(served_generate, tmp_path / "served")
    store = ["serve.store=redis", f"serve.redis_url={redis_url}", "serve.store_namespace=redistil-test"]
    _log(load_config(tiny_overrides(served, teacher.base_url, *store)), served, NEW_TICKETS)
    assert not (served / "serve" / "traffic.sqlite").exists()  # the gateway's log is in Redis only

    # without the gateway's store settings there is no log to read, and the error says what to pass
    plain = _redistil_cfg(teacher, served, tmp_path / "plain")
    with pytest.raises(DistillError, match="holds no traffic log .*serve.store=redis"):
        check_startup(plain, ("generate",))
    other_ns = _redistil_cfg(teacher, served, tmp_path / "other", *store[:2], "serve.store_namespace=someone-else")
    with pytest.raises(DistillError, match="holds no traffic records for 'someone-else'"):
        check_startup(other_ns, ("generate",))

    cfg = _redistil_cfg(teacher, served, tmp_path / "new", *store)
    assert [r["input"] for r in read_source(cfg)] == NEW_TICKETS
    summary = pipeline.run(cfg, stages=("generate",))["generate"]
    assert summary["traffic"]["distinct_inputs"] == len(NEW_TICKETS)
    assert summary["traffic"]["log"].startswith(redis_url)
    kept = _logged_inputs(cfg.run_dir)
    assert kept and kept <= set(NEW_TICKETS)
    assert runio.read_jsonl(paths.split_path(cfg.run_dir, "test")) == runio.read_jsonl(
        paths.split_path(served, "test"))


def runio_copy(src, dest):
    shutil.copytree(src, dest)
    return dest

