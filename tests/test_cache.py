"""The gateway's store (SQLite and a real redis-server on loopback), its exact and semantic answer caches, and
calibrate-cache: unit tests on each piece, then the gateway over loopback with a fake student and a fake teacher
that count their calls, and two gateways sharing one Redis.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from conftest import set_route, wait_healthy

from distill import DistillError, paths, runio
from distill.serve import calibrate
from distill.serve.cache import CACHE_CALIBRATION, ExactCache, SemanticCache, VectorIndex, load_threshold
from distill.serve.command import background, load_serve_config
from distill.serve.store import RedisStore, SqliteStore, StoreError
from distill.testing.fake_student import FakeStudent

TASK = "support_tickets"
TICKET = "The invoice for March shows two charges of $49 for one seat; please explain or refund one."
CONFIDENT = {"category": "billing", "priority": "high"}


# ---------------------------------------------------------------------------------------------------------------
# a real redis-server on a free loopback port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """redis://127.0.0.1:PORT/0 of a redis-server started for this module (no persistence), stopped after."""
    pytest.importorskip("redis", reason="the redis Python client is not installed (pip install -e '.[dev]')")
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH: `make setup` installs it (apt-get install redis-server)")
    import redis

    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"redis-server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def two_stores(request, tmp_path):
    """Two store objects on the same backing state, as two gateway replicas hold them."""
    if request.param == "sqlite":
        pair = [SqliteStore(tmp_path / "store.sqlite", "t") for _ in range(2)]
    else:
        url = request.getfixturevalue("redis_url")
        ns = f"t{time.monotonic_ns()}"
        pair = [RedisStore(url, ns) for _ in range(2)]
    yield pair
    for s in pair:
        s.close()


# ---------------------------------------------------------------------------------------------------------------
# the store contract, on both implementations


def test_entries_expire_and_are_shared(two_stores):
    a, b = two_stores
    a.put("k", "value")
    a.put("short", "gone soon", ttl_s=1.0)  # long enough for the read below on a busy machine
    assert b.get("k") == "value" and b.get("short") == "gone soon"
    time.sleep(1.1)
    assert b.get("short") is None and b.get("missing") is None
    b.put("k", "new")
    assert a.get("k") == "new"
    a.delete("k")
    assert b.get("k") is None


def test_counters_from_two_replicas_add_up(two_stores):
    a, b = two_stores
    assert a.incr("shadow.agree.x") == 1.0
    assert b.incr("shadow.agree.x", 2) == 3.0
    b.incr("shadow.total.x", 0.5)
    a.incr("other", 7)
    assert a.counters("shadow.") == {"shadow.agree.x": 3.0, "shadow.total.x": 0.5}
    assert b.counters() == {"shadow.agree.x": 3.0, "shadow.total.x": 0.5, "other": 7.0}


def test_streams_append_read_after_and_trim(two_stores):
    a, b = two_stores
    seqs = [(a if i % 2 else b).append("log", {"i": i}) for i in range(6)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [r["i"] for _, r in a.read("log")] == list(range(6))
    assert [r["i"] for _, r in b.read("log", after=seqs[3])] == [4, 5]
    assert [r["i"] for _, r in b.read("log", limit=2)] == [0, 1]
    assert a.read("other") == [] and a.length("log") == 6
    assert b.trim("log", keep=2) == 4
    assert [r["i"] for _, r in a.read("log")] == [4, 5]


def test_append_many_keeps_order_and_sequence_between_single_appends(two_stores):
    a, b = two_stores
    first = a.append("log", {"i": 0})
    assert b.append_many("log", [{"i": i} for i in range(1, 5)]) == 4
    last = a.append("log", {"i": 5})
    assert b.append_many("log", []) == 0
    got = a.read("log")
    assert [r["i"] for _, r in got] == list(range(6))
    assert [seq for seq, _ in got] == sorted(seq for seq, _ in got) and got[0][0] == first and got[-1][0] == last
    assert [r["i"] for _, r in b.read("log", after=got[2][0])] == [3, 4, 5]
    with pytest.raises(TypeError):  # a record JSON cannot hold stores nothing of its group
        a.append_many("log", [{"i": 6}, {"i": object()}])
    assert a.length("log") == 6


def test_namespaces_keep_runs_apart(tmp_path):
    one, two = SqliteStore(tmp_path / "s.sqlite", "one"), SqliteStore(tmp_path / "s.sqlite", "two")
    one.put("k", "1")
    one.incr("c")
    one.append("log", {"x": 1})
    assert two.get("k") is None and two.counters() == {} and two.read("log") == []


def test_redis_store_refuses_remote_hosts_and_credentials_in_the_url():
    pytest.importorskip("redis")
    with pytest.raises(StoreError, match="not loopback.*redis_allow_remote"):
        RedisStore("redis://10.1.2.3:6379/0")
    with pytest.raises(StoreError, match="redis_password_env"):
        RedisStore("redis://user:pw@127.0.0.1:6379/0")
    with pytest.raises(StoreError, match="cannot reach Redis.*serve.store=sqlite"):
        RedisStore(f"redis://127.0.0.1:{_free_port()}/0")


# ---------------------------------------------------------------------------------------------------------------
# cache pieces


class _Prompts:
    def __init__(self, shots: str):
        self.shots = shots

    def student_messages(self, text):
        return [{"role": "system", "content": "classify"}, {"role": "user", "content": text}]

    def teacher_messages(self, text):
        return [{"role": "user", "content": self.shots}, {"role": "user", "content": text}]


def test_exact_key_covers_every_generation_parameter_and_the_prompts_not_the_framing(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite")
    cache = ExactCache(store, "base", ttl_s=60, task=_Prompts("few-shot A"))
    msgs = [{"role": "user", "content": TICKET}]
    key = cache.key({"model": TASK, "messages": msgs}, TICKET)
    assert cache.key({"model": TASK, "messages": msgs, "stream": True}, TICKET + "  \r\n") == key
    for change in ({"temperature": 0.5}, {"max_tokens": 3}, {"seed": 1}, {"metadata": {"x": 1}}):
        assert cache.key({"model": TASK, "messages": msgs, **change}, TICKET) != key
    system = [{"role": "system", "content": "be brief"}, *msgs]
    assert cache.key({"model": TASK, "messages": system}, TICKET) != key
    assert cache.key({"model": TASK, "messages": msgs}, TICKET + "!") != key
    other_shots = ExactCache(store, "base", ttl_s=60, task=_Prompts("few-shot B"))
    assert other_shots.key({"model": TASK, "messages": msgs}, TICKET) != key
    other = ExactCache(store, "another rule or artifact", ttl_s=60, task=_Prompts("few-shot A"))
    assert other.key({"model": TASK, "messages": msgs}, TICKET) != key


def test_vector_index_hnsw_above_the_crossover_finds_what_numpy_finds():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    exact = VectorIndex(32, crossover=10**9)
    for part in np.array_split(data, 7):
        exact.add(part)
    # several builds: a graph built on several threads came out different each time and often lost a neighbour
    for _ in range(8):
        hnsw = VectorIndex(32, crossover=1000)
        for part in np.array_split(data, 7):
            hnsw.add(part)
        assert hnsw._hnsw is not None and exact._hnsw is None and len(hnsw) == 3000
        for q in queries:
            e_ids, e_sims = exact.search(q / np.linalg.norm(q), k=1)
            h_ids, h_sims = hnsw.search(q / np.linalg.norm(q), k=1)
            assert h_ids[0] == e_ids[0] and h_sims[0] == pytest.approx(e_sims[0], abs=1e-4)


def _toy_embedder(texts):
    """Texts sharing their first word point the same way (similarity 1); others are orthogonal."""
    out = np.zeros((len(texts), 8), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i, zlib.crc32(t.split()[0].encode()) % 8] = 1.0  # not hash(): the same under every PYTHONHASHSEED
    return out


def test_semantic_cache_hits_above_the_threshold_for_every_replica_and_expires(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite")
    a = SemanticCache(store, "base", threshold=0.9, ttl_s=2.0, max_entries=100, embedder=_toy_embedder, dim=8)
    b = SemanticCache(store, "base", threshold=0.9, ttl_s=2.0, max_entries=100, embedder=_toy_embedder, dim=8)
    vec = _toy_embedder(["refund please"])[0]
    assert a.lookup(vec) == (None, None)
    a.add(vec, {"category": "billing"})
    answer, sim = b.lookup(_toy_embedder(["refund now"])[0])  # the other replica sees it
    assert answer == {"category": "billing"} and sim == pytest.approx(1.0)
    other = next(w for w in ("login", "password", "shipping", "crash") if _toy_embedder([w])[0].argmax() !=
                 vec.argmax())
    assert b.lookup(_toy_embedder([other])[0])[0] is None
    time.sleep(2.1)
    assert b.lookup(vec)[0] is None  # older than ttl_s


def test_semantic_cache_keeps_at_most_max_entries(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite")
    cache = SemanticCache(store, "base", threshold=0.9, ttl_s=60, max_entries=5, embedder=_toy_embedder, dim=8)
    for i in range(12):
        cache.add(np.eye(8, dtype=np.float32)[i % 8], {"i": i})
    assert store.length(cache.stream) == 5
    assert [r["answer"]["i"] for _, r in store.read(cache.stream)] == [7, 8, 9, 10, 11]


# ---------------------------------------------------------------------------------------------------------------
# calibration


def test_clopper_pearson_needs_about_370_clean_hits_for_a_one_percent_bound():
    assert calibrate.clopper_pearson(0, 369)[1] <= 0.01 < calibrate.clopper_pearson(0, 300)[1]
    low, high = calibrate.clopper_pearson(5, 100)
    assert low < 0.05 < high and low == pytest.approx(0.0164, abs=1e-3) and high == pytest.approx(0.1128, abs=1e-3)


def test_choose_takes_the_lowest_threshold_within_the_bound_or_none():
    rng = np.random.default_rng(1)
    sim = np.concatenate([rng.uniform(0.95, 1.0, 1000), rng.uniform(0.80, 0.95, 1000)])
    correct = np.concatenate([np.ones(1000, bool), rng.uniform(size=1000) < 0.7])  # wrong answers only below 0.95
    rows = calibrate.table(sim, correct)
    chosen = calibrate.choose(rows, 0.01)
    assert chosen["threshold"] == 0.95 and chosen["false_hits"] == 0 and chosen["hits"] == 1000
    assert chosen["hit_rate"] == pytest.approx(0.5)
    assert all(r["false_hit_rate"]["high"] > 0.01 for r in rows if r["threshold"] < 0.95)
    assert calibrate.choose(calibrate.table(sim[:200], correct[:200]), 0.01) is None  # 200 clean hits: too few


def test_load_threshold_refuses_an_uncalibrated_cache_and_reads_the_choice(tmp_path):
    sc = SimpleNamespace(threshold=None, max_false_hit=0.01)
    cfg = SimpleNamespace(serve=SimpleNamespace(semantic_cache=sc))
    with pytest.raises(DistillError, match="calibrate-cache run_dir="):
        load_threshold(cfg, tmp_path)
    (tmp_path / CACHE_CALIBRATION).write_text(json.dumps({"threshold": 0.93, "max_false_hit": 0.01}))
    assert load_threshold(cfg, tmp_path) == 0.93
    sc.max_false_hit = 0.05
    with pytest.raises(DistillError, match="max_false_hit=0.01"):
        load_threshold(cfg, tmp_path)
    sc.threshold = 0.97
    assert load_threshold(cfg, tmp_path) == 0.97


# ---------------------------------------------------------------------------------------------------------------
# the gateway over loopback


PUBLISH_EXTRA = ("publish.gguf_types=[q8_0]",)  # conftest's `published` run


def _copy(published, tmp_path, threshold: float = 0.9) -> Path:
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(published, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    set_route(run_dir, threshold)
    return run_dir


def _ask(url: str, text: str, **kwargs):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(model=TASK, messages=[{"role": "user", "content": text}],
                                                           **kwargs)
    return raw.headers, json.loads(raw.parse().choices[0].message.content)


@pytest.mark.integration
def test_repeated_request_is_an_exact_hit_that_calls_neither_model(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path)
    with FakeStudent(lambda text: (CONFIDENT, 0.97 if text == TICKET else 0.4)) as student:
        cfg = load_serve_config([f"run_dir={run_dir}", "serve.port=0", f"serve.student_endpoint={student.base_url}",
               "serve.exact_cache.enabled=true"])
        with background(cfg) as url:
            first, answer = _ask(url, TICKET)
            again, cached = _ask(url, TICKET + "\n")  # a trailing newline is the same input
            calls_student, calls_teacher = len(student.calls), len(teacher.calls)
            low = "low priority: my password reset mail never arrives, twice now"
            fallback, taught = _ask(url, low)
            fallback_again, taught_again = _ask(url, low)
            after = len(student.calls), len(teacher.calls)
            warmer, _ = _ask(url, TICKET, temperature=0.5)  # another generation parameter: another key
    assert (first["x-distill-route"], "x-distill-cache" in first) == ("student", False)
    assert again["x-distill-cache"] == "exact" and cached == answer == CONFIDENT
    assert (again["x-distill-route"], again["x-distill-reason"]) == ("student", "confident")
    assert float(again["x-distill-confidence"]) == pytest.approx(0.97)
    assert calls_student == 1
    assert fallback["x-distill-route"] == fallback_again["x-distill-route"] == "teacher"
    assert fallback_again["x-distill-cache"] == "exact" and taught_again == taught
    assert after == (calls_student + 1, calls_teacher + 1)  # the repeat reached neither the student nor the teacher
    assert "x-distill-cache" not in warmer and len(student.calls) == after[0] + 1
    store = SqliteStore(paths.stage_dir(run_dir, paths.SERVE_DIR) / "store.sqlite", "support_tickets")
    assert store.counters("cache.") == {f"cache.exact.hit.{TASK}": 2.0, f"cache.exact.miss.{TASK}": 3.0}


@pytest.mark.integration
def test_a_changed_rule_misses_the_entries_of_the_old_one(published, tmp_path):
    run_dir = _copy(published, tmp_path, threshold=0.9)
    with FakeStudent(lambda text: (CONFIDENT, 0.97)) as student:
        over = [f"run_dir={run_dir}", "serve.port=0", f"serve.student_endpoint={student.base_url}",
               "serve.exact_cache.enabled=true"]
        with background(load_serve_config(over)) as url:
            _ask(url, TICKET)
            same, _ = _ask(url, TICKET)
        set_route(run_dir, 0.95)  # a republished rule
        with background(load_serve_config(over)) as url:
            changed, _ = _ask(url, TICKET)
            again, _ = _ask(url, TICKET)
    assert same["x-distill-cache"] == "exact"
    assert "x-distill-cache" not in changed and again["x-distill-cache"] == "exact"
    assert len(student.calls) == 2


@pytest.mark.integration
def test_semantic_cache_reuses_a_teacher_answer_for_a_near_identical_input(published, teacher, tmp_path):
    run_dir = _copy(published, tmp_path)
    with FakeStudent(lambda text: (CONFIDENT, 0.4)) as student:  # every answer falls back to the teacher
        over = [f"run_dir={run_dir}", "serve.port=0", f"serve.student_endpoint={student.base_url}",
               "serve.exact_cache.enabled=true",
                "serve.semantic_cache.enabled=true"]
        with pytest.raises(DistillError, match="calibrate-cache"):
            with background(load_serve_config(over)):
                pass
        with background(load_serve_config([*over, "serve.semantic_cache.threshold=0.97"])) as url:
            before = len(teacher.calls)
            first, answer = _ask(url, "My laptop order #5521 arrived with a cracked screen, I want a replacement.")
            near, reused = _ask(url, "My laptop order #5521 arrived with a cracked screen. I want a replacement!")
            paid = len(teacher.calls) - before
            far, _ = _ask(url, "How do I change the email address on my account?")
    assert first["x-distill-route"] == near["x-distill-route"] == "teacher"
    assert near["x-distill-cache"] == "semantic" and reused == answer
    assert near["x-distill-reason"] == "below_threshold"
    assert paid == 1  # the near-identical input cost no teacher call
    assert "x-distill-cache" not in far and len(teacher.calls) - before == 2


@pytest.mark.integration
def test_calibrate_cache_writes_the_table_and_disables_a_cache_it_cannot_bound(published, tmp_path, capsys):
    run_dir = _copy(published, tmp_path)
    from distill.__main__ import main

    assert main(["calibrate-cache", f"run_dir={run_dir}"]) == 0
    out = json.loads((paths.stage_dir(run_dir, paths.SERVE_DIR) / CACHE_CALIBRATION).read_text())
    held = len(runio.read_jsonl(paths.split_path(run_dir, "val")) + runio.read_jsonl(paths.split_path(run_dir,
                                                                                                      "test")))
    assert out["held_out_items"] == held and out["train_items"] == len(runio.read_jsonl(
        paths.split_path(run_dir, "train")))
    assert out["threshold"] is None  # a tiny run cannot bound the false-hit rate at 1%
    assert [r["threshold"] for r in out["table"]] == list(calibrate.THRESHOLDS)
    assert all(r["items"] == held for r in out["table"])
    assert "the semantic cache stays off" in capsys.readouterr().out
    assert (paths.stage_dir(run_dir, paths.SERVE_DIR) / calibrate.CACHE_TABLE).is_file()
    cfg = load_serve_config([f"run_dir={run_dir}", "serve.semantic_cache.enabled=true"])
    assert load_threshold(cfg, paths.stage_dir(run_dir, paths.SERVE_DIR)) is None


@pytest.mark.integration
def test_two_gateways_on_one_redis_share_answers_and_counters(published, teacher, redis_url, tmp_path):
    run_dir = _copy(published, tmp_path)
    ns = f"replicas{time.monotonic_ns()}"
    with FakeStudent(lambda text: (CONFIDENT, 0.4)) as student:
        over = [f"run_dir={run_dir}", "serve.port=0", f"serve.student_endpoint={student.base_url}",
               "serve.exact_cache.enabled=true",
                "serve.store=redis", f"serve.redis_url={redis_url}", f"serve.store_namespace={ns}"]
        with background(load_serve_config(over)) as one, background(load_serve_config(over)) as two:
            before = len(student.calls)
            first, answer = _ask(one, TICKET)
            second, shared = _ask(two, TICKET)
            _ask(two, "Where is my parcel? It has been two weeks.")
            after = len(student.calls)
    assert first["x-distill-route"] == second["x-distill-route"] == "teacher"
    assert "x-distill-cache" not in first and second["x-distill-cache"] == "exact" and shared == answer
    assert after - before == 2  # the second gateway asked no one for the ticket the first one answered
    counts = RedisStore(redis_url, ns).counters("cache.")
    assert counts == {f"cache.exact.miss.{TASK}": 2.0, f"cache.exact.hit.{TASK}": 1.0}


def _serve_process(run_dir: Path, *overrides: str) -> tuple[subprocess.Popen, str]:
    """``python -m distill serve`` in its own process on a free loopback port, once /healthz answers 200."""
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distill", "serve", f"run_dir={run_dir}", f"serve.port={port}",
                             *overrides], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_healthy(proc, f"http://127.0.0.1:{port}", timeout_s=180)
    return proc, f"http://127.0.0.1:{port}/v1"


@pytest.mark.integration
def test_two_gateway_processes_on_one_redis_share_answers_and_shadow_counts(published, teacher, redis_url,
                                                                             tmp_path):
    run_dir = _copy(published, tmp_path)
    ns = f"processes{time.monotonic_ns()}"
    unsure = "My refund for order 7731 has not arrived after three weeks; who can help?"
    kept = {"one": "The invoice shows my old address, please update it for the next one.",
            "two": "I was billed for a seat I removed last month, please credit it."}
    with FakeStudent(lambda text: (CONFIDENT, 0.4 if text == unsure else 0.97)) as student:
        over = [f"serve.student_endpoint={student.base_url}", "serve.exact_cache.enabled=true", "serve.store=redis",
                f"serve.redis_url={redis_url}", f"serve.store_namespace={ns}", "serve.shadow_rate=1.0"]
        procs = []
        try:
            one_proc, one = _serve_process(run_dir, *over)
            procs.append(one_proc)
            two_proc, two = _serve_process(run_dir, *over)
            procs.append(two_proc)
            before_teacher = len(teacher.calls)
            first, answer = _ask(one, unsure)
            after_first = len(teacher.calls)
            second, shared = _ask(two, unsure)
            kept_one, _ = _ask(one, kept["one"])
            kept_two, _ = _ask(two, kept["two"])
            shadow = {}
            deadline = time.monotonic() + 60  # the shadow calls run in the background of each process
            while time.monotonic() < deadline:
                shadow = {k: v for k, v in RedisStore(redis_url, ns).counters("shadow.").items() if k.endswith(".n")}
                if sum(shadow.values()) >= 2:
                    break
                time.sleep(0.2)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    assert first["x-distill-route"] == second["x-distill-route"] == "teacher"
    assert "x-distill-cache" not in first and second["x-distill-cache"] == "exact" and shared == answer
    assert after_first - before_teacher == 1  # the fallback was paid once, by the first process
    assert kept_one["x-distill-route"] == kept_two["x-distill-route"] == "student"
    # each process shadowed its own kept answer; the counters of the one rule version add up across both
    assert len(shadow) == 1 and list(shadow.values()) == [2.0]
    assert len(teacher.calls) - before_teacher == 3  # one fallback + two shadow calls, nothing else
    counts = RedisStore(redis_url, ns).counters("cache.")
    assert counts[f"cache.exact.hit.{TASK}"] == 1.0
    assert all(proc.returncode == 0 for proc in procs)


@pytest.mark.integration
def test_publish_with_the_semantic_cache_enabled_puts_its_calibration_in_the_report_and_card(published, tmp_path):
    from distill import pipeline

    run_dir = _copy(published, tmp_path / "run")
    cfg = load_serve_config([f"run_dir={run_dir}", "serve.semantic_cache.enabled=true"])
    pipeline.run_stage(cfg, "publish", force=True)
    publish, serve_dir = paths.stage_dir(run_dir, "publish"), paths.stage_dir(run_dir, paths.SERVE_DIR)
    out = json.loads((serve_dir / CACHE_CALIBRATION).read_text())  # publish ran calibrate-cache
    assert out["held_out_items"] > 0 and out["threshold"] is None
    assert (publish / calibrate.CACHE_PLOT).stat().st_size > 1000  # the plot beside the card
    for name in (paths.REPORT, paths.MODEL_CARD):
        text = (publish / name).read_text()
        assert "## Semantic cache calibration" in text and f"]({calibrate.CACHE_PLOT})" in text
        assert "| 0.800 | " in text and "the semantic cache stays off" in text
    # without the cache the card and the report say nothing about it, calibrated or not
    from distill.stages.publish.card import cache_lines

    assert cache_lines(load_serve_config([f"run_dir={run_dir}"])) == [] and cache_lines(cfg)
