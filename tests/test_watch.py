"""The gateway watching its inputs and its run: input drift by embedding distance to the training set, and a
republished run picked up by the file watch with requests in flight.

Units drive ``InputDrift`` and the reference with toy embeddings; the integration tests run the gateway over
loopback on one tiny published run (a fake student with a chosen confidence, the module's fake teacher), the input
drift one with the packaged MiniLM, as the gateway runs it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import RECIPE_DIR, set_route
from test_loop import KEPT, TASK, _cfg, _copy, _metric, _post, _wait

from distill import paths, runio
from distill.serve.command import background
from distill.serve.drift import InputDrift, InputWatch, input_reference, nearest_distances, read_events
from distill.testing.fake_student import FakeStudent

PUBLISH_EXTRA = ("publish.force=true", "publish.gguf_types=[q8_0]")  # conftest's `published` run

OFF_TOPIC = [f"{q} {i}" for i, q in enumerate([
    "What is the boiling point of water at the top of Mount Everest?",
    "Write a haiku about autumn leaves falling into a quiet pond.",
    "How many moons does Jupiter have, and which is the largest?",
    "Explain the difference between a list and a tuple in Python.",
    "Give me a recipe for sourdough bread with a crispy crust.",
    "Who painted the ceiling of the Sistine Chapel in Rome?",
    "What are the rules of chess castling on the queen side?",
    "Translate 'good morning, my friend' into Portuguese and Italian.",
    "Summarise the causes of the French Revolution in three lines.",
    "How do I tune a six-string acoustic guitar to drop D?",
] * 2)]


# ---------------------------------------------------------------------------------------------------------------
# units


def test_input_drift_is_quiet_on_the_reference_distribution_and_alarms_on_farther_inputs():
    rng = np.random.default_rng(0)
    detector = InputDrift(rng.beta(2, 8, size=300), window=100, p_value=1e-4)
    changes = [detector.update(d) for d in rng.beta(2, 8, size=3000)]  # 30 windows like the reference
    assert set(changes) == {None} and not detector.active
    closer = [detector.update(d) for d in rng.beta(1, 12, size=300)]  # nearer the training set: not drift
    assert set(closer) == {None}
    farther = [detector.update(d) for d in rng.beta(6, 6, size=100)]
    assert farther[-1] == "alarm" and detector.active
    assert detector.detail()["median_distance"] > detector.detail()["reference_median"]
    back = [detector.update(d) for d in rng.beta(2, 8, size=100)]
    assert back[-1] == "cleared" and not detector.active


def _toy(texts):
    """Unit vectors that depend only on each text's first word (a topic): same topic, same direction, near."""
    out = []
    for t in texts:
        g = np.random.default_rng(abs(hash(t.split()[0])) % 2**32)
        v = g.normal(size=16) + 0.15 * np.random.default_rng(abs(hash(t)) % 2**32).normal(size=16)
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, dtype=np.float32)


def _write_splits(run_dir, train, val):
    for split, texts in (("train", train), ("val", val)):
        path = paths.split_path(run_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        runio.write_jsonl(path, [{"id": f"{split}{i}", "input": t} for i, t in enumerate(texts)])


def test_input_reference_is_val_to_train_cached_by_content_and_falls_back_to_train(tmp_path):
    topics = ["refund", "parcel", "password"]
    train = [f"{topics[i % 3]} ticket {i}" for i in range(60)]
    val = [f"{topics[i % 3]} question {i}" for i in range(30)]
    _write_splits(tmp_path, train, val)
    calls = []

    def embedder(texts):
        calls.append(len(texts))
        return _toy(texts)

    ref = input_reference(tmp_path, embedder, encoder_id="toy", min_val_items=20, cache_dir=tmp_path / "serve")
    assert ref.source == "val" and len(ref.distances) == 30 and ref.train.shape == (60, 16)
    assert np.allclose(ref.distances, nearest_distances(_toy(val), _toy(train)), atol=1e-5)
    again = input_reference(tmp_path, embedder, encoder_id="toy", min_val_items=20, cache_dir=tmp_path / "serve")
    assert calls == [60, 30] and np.array_equal(again.distances, ref.distances)  # read from the cache
    _write_splits(tmp_path, train, val[:5])  # new data: rebuilt; too few val items: train leave-one-out
    few = input_reference(tmp_path, embedder, encoder_id="toy", min_val_items=20, cache_dir=tmp_path / "serve")
    assert few.source == "train" and len(few.distances) == 60 and calls[-1] == 60
    assert np.all(few.distances > 1e-4)  # its own row is never its nearest neighbour
    assert input_reference(tmp_path, embedder, encoder_id="other", min_val_items=20,
                           cache_dir=tmp_path / "serve").source == "train" and len(calls) == 4  # other encoder


def test_input_watch_never_waits_and_tests_inputs_in_the_background(tmp_path):
    topics = ["refund", "parcel", "password", "invoice"]
    _write_splits(tmp_path, [f"{topics[i % 4]} ticket {i}" for i in range(80)],
                  [f"{topics[i % 4]} question {i}" for i in range(40)])
    changes = []

    async def scenario():
        watch = InputWatch(tmp_path, tmp_path / "serve", TASK, window=20, p_value=1e-4, min_val_items=20,
                           on_change=lambda kind, change, detail: change and changes.append((kind, change, detail())),
                           embedder=_toy, encoder_id="toy")
        watch.start()
        for i in range(40):  # offered before the reference is ready: they wait, then are tested
            watch.offer(f"{topics[i % 4]} live {i}")
        while watch.drift is None or watch.drift.seen < 40:
            await asyncio.sleep(0.01)
        quiet = list(changes)
        for i in range(20):
            watch.offer(f"astronomy{i % 7} question about the moons of Jupiter {i}")
        while watch.drift.seen < 60:
            await asyncio.sleep(0.01)
        await watch.close()
        return quiet, watch

    quiet, watch = asyncio.run(scenario())
    assert quiet == [] and watch.active
    (kind, change, detail), = changes
    assert (kind, change, detail["inputs"], detail["reference"]) == ("inputs", "alarm", 60, "val")


# ---------------------------------------------------------------------------------------------------------------
# the gateway


def _tickets(start: int, n: int) -> list[str]:
    rows = [json.loads(line) for line in (RECIPE_DIR / "inputs.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[start:start + n]]


@pytest.mark.integration
def test_input_drift_alarms_on_another_category_and_falls_back(published, tmp_path):
    run_dir = _copy(published, tmp_path / "run")
    trained = {r["input"] for r in runio.read_jsonl(paths.split_path(run_dir, "train"))}
    stationary = [t for t in _tickets(100, 60) if t not in trained][:40]
    with FakeStudent(lambda text: (KEPT, 0.99)) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.drift.inputs=true",
                   "serve.drift.input_window=20", "serve.drift.input_p_value=0.001", "serve.on_drift=fallback")
        with background(cfg) as url:
            routes = [_post(url, t).headers["x-distill-route"] for t in stationary]
            routes += [_post(url, t).headers["x-distill-route"] for t in OFF_TOPIC]
            # the reference (MiniLM loaded, train and val embedded) is built in the background first: minutes on
            # 2 loaded cores
            _wait(lambda: _metric(url, "distill_drift_alarm", task=TASK, kind="inputs") == 1, timeout_s=360)
            after = _post(url, "What is the capital of Australia, and why is it not Sydney?")
    assert routes == ["student"] * 60  # the test never held a request
    alarms = [e for e in read_events(run_dir / "serve") if e["event"] == "drift_alarm"]
    # the two stationary windows passed; the first window of the other category alarmed
    assert [(e["kind"], e["inputs"], e["on_drift"]) for e in alarms] == [("inputs", 60, "fallback")]
    assert alarms[0]["median_distance"] > alarms[0]["reference_median"] and alarms[0]["p_value"] < 1e-3
    assert (after.headers["x-distill-route"], after.headers["x-distill-reason"]) == ("teacher", "drift")
    assert (run_dir / "serve" / "input_reference.npz").is_file()  # the next start reads it


@pytest.mark.integration
def test_a_republished_run_is_picked_up_by_the_file_watch_with_requests_in_flight(published, tmp_path):
    run_dir = _copy(published, tmp_path / "run")  # its route enabled at 0.9: confident answers are kept
    publish = paths.stage_dir(run_dir, "publish")
    with FakeStudent(lambda text: (KEPT, 0.99), latency_s=0.2) as student:
        cfg = _cfg(run_dir, f"serve.student_endpoint={student.base_url}", "serve.watch_interval_s=0.05")
        with background(cfg) as url:
            before = _post(url, "A ticket before the republish")
            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(_post, url, f"Ticket {i}: refund please") for i in range(48)]
                _wait(lambda: len(student.calls) >= 8)  # requests in flight on the old rule
                # publish again as the publish stage does: a finished folder swapped in whole, here with its
                # route disabled (everything to the teacher)
                staging = publish.with_name("publish.staging")
                shutil.copytree(published / "publish", staging)
                runio.swap_into_place(staging, publish)
                _wait(lambda: any(e["event"] == "reload" for e in read_events(run_dir / "serve")), timeout_s=60)
                during = [f.result() for f in futures]
            later = _post(url, "A ticket after the republish")
            reloads = _metric(url, "distill_reloads_total", result="ok")
            set_route(run_dir, 0.9)  # a hand edit of routing.yaml alone is a change too
            _wait(lambda: len([e for e in read_events(run_dir / "serve") if e["event"] == "reload"]) == 2,
                  timeout_s=60)
            last = _post(url, "A ticket after the route was turned back on")
    assert before.headers["x-distill-route"] == "student"
    assert [r.status_code for r in during] == [200] * 48  # nothing failed across the swap
    assert (later.headers["x-distill-route"], later.headers["x-distill-reason"]) == ("teacher", "route_disabled")
    assert reloads == 1
    events = [e for e in read_events(run_dir / "serve") if e["event"] == "reload"]
    assert [(e["via"], e["route_enabled"]) for e in events] == [("watch", False), ("watch", True)]
    assert last.headers["x-distill-route"] == "student"


@pytest.mark.integration
def test_publish_stamp_changes_with_done_and_routing_and_a_half_published_folder_waits(published, tmp_path):
    from distill.serve.reload import publish_stamp

    run_dir = _copy(published, tmp_path / "run")
    first = publish_stamp(run_dir)
    assert None not in first and publish_stamp(run_dir) == first
    set_route(run_dir, 0.5)
    assert publish_stamp(run_dir)[1] != first[1]
    (paths.stage_dir(run_dir, "publish") / paths.DONE).unlink()
    assert publish_stamp(run_dir)[0] is None  # the watch reloads only once DONE.json is back

