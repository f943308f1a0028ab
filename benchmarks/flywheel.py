"""The flywheel on the embedded models: serve the smoke run, send new tickets, re-distil from the traffic log, reload.

    python benchmarks/flywheel.py [--tickets 60] [--student-timeout-s 60] [--threshold T] [--workdir DIR] [--no-record]

Real models all the way (profile=smoke: the SmolLM2 llama.cpp teacher and the SmolLM2-135M student): the smoke run
is built, its gateway serves it (its student runtime, the teacher through the run's ledger; the rule's route is
turned on at confidence 0.9 so some answers are kept and the rest fall back, and serve.shadow_rate=0.3 shadows a
share of the kept ones), ``--tickets`` Bitext tickets the recipe has never seen are sent, and the run is re-distilled
from the traffic log (a ``python -m distill run`` subprocess while the gateway keeps serving). Then the gateway is
reloaded onto the new run with 16 requests in flight. It prints what each promise rests on, counted: the ledger's
new rows against the logged inputs the teacher never answered, the test ids of both runs, McNemar's verdict, and
the requests that failed during the swap. tests/test_flywheel.py runs the same loop on tiny models in the suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import append, table  # noqa: E402
from distill import paths, runio  # noqa: E402
from distill.routing import RouteSpec, load_rule  # noqa: E402
from distill.serve.command import background, load_serve_config  # noqa: E402
from distill.serve.traffic import read_traffic  # noqa: E402
from distill.stages.generate.traffic import PREFIX  # noqa: E402

GATE_FAILED = 3  # python -m distill's exit code when evaluate's gate fails (nothing published)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def distill(*args: str, ok: tuple[int, ...] = (0,)) -> float:
    """Run ``python -m distill ARGS``; exits with its stderr unless its exit code is in ``ok``. Returns seconds."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "distill", *args], env=ENV, capture_output=True, text=True)
    if out.returncode not in ok:
        sys.exit(f"python -m distill {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - started


def ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def post(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=300,
                      json={"model": "support_tickets", "messages": [{"role": "user", "content": text}]})


def half_coverage_threshold(run_dir: Path) -> float:
    """The threshold of the served GGUF's test curve (publish/parity.json) nearest half coverage, else evaluate's."""
    parity = runio.read_json(paths.stage_dir(run_dir, "publish") / paths.PARITY)
    curves = [v["served_confidence"]["coverage_curve"] for v in parity.values() if v.get("served_confidence")]
    curve = curves[0] if curves else runio.read_json(run_dir / "evaluate" / paths.RESULTS)["coverage_curve"]
    return min((p for p in curve if p["threshold"] > 0), key=lambda p: abs(p["coverage"] - 0.5))["threshold"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tickets", type=int, default=60)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards when given (default: a temp dir)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the confidence the route is forced on at (default: the served GGUF's test-curve point "
                         "nearest half coverage, so some tickets are kept and some fall back)")
    ap.add_argument("--student-timeout-s", type=float, default=60.0,
                    help="serve.student_timeout_s: a loaded 2-core machine can pass the 10 s default, and a timed-out "
                         "student sends every ticket to the teacher (nothing kept, nothing shadowed)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    from test_flywheel import new_tickets  # the same Bitext tickets as the suite's test

    work = args.workdir or Path(tempfile.mkdtemp(prefix="distill-flywheel-"))
    served, new = work / "served", work / "new"
    build_s = distill("run", "recipe=support_tickets", "profile=smoke", f"run_dir={served}")
    rule_path = paths.stage_dir(served, "publish") / paths.ROUTING
    rule = load_rule(rule_path)
    published_route = rule.route.enabled
    threshold = args.threshold if args.threshold is not None else half_coverage_threshold(served)
    rule.route = RouteSpec(enabled=True, confidence_threshold=threshold, target_agreement=0.98, expected_coverage=0.5,
                           expected_agreement=0.98, reason=f"turned on at {threshold} by benchmarks/flywheel.py")
    rule_path.write_text(yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))

    tickets = new_tickets(args.tickets)
    cfg = load_serve_config([f"run_dir={served}", "serve.port=0", "serve.shadow_rate=0.3",
                             f"serve.student_timeout_s={args.student_timeout_s}"])
    ledger = paths.ledger_path(served)
    with background(cfg) as url:
        started = time.perf_counter()
        replies = [post(url, t) for t in tickets]
        serve_s = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while len(read_traffic(cfg, served)) < len(tickets) and time.monotonic() < deadline:
            time.sleep(0.2)
        logged = read_traffic(cfg, served)
        sent = {r["input"] for r in logged if r["teacher"] is not None}
        before = ledger_rows(ledger)
        redistil_s = distill("run", "recipe=support_tickets", "profile=smoke", "generate.source=traffic",
                             f"generate.traffic={served}", f"eval.baseline={served / 'evaluate' / paths.RESULTS}",
                             f"run_dir={new}", ok=(0, GATE_FAILED))  # a failed gate: compared, not published
        paid_rows = ledger_rows(ledger) - before
        generate = runio.read_done(new, "generate")["summary"]
        kept = {r["input"] for s in ("train", "val") for r in runio.read_jsonl(paths.split_path(new, s))
                if r["id"].startswith(PREFIX)}
        results = runio.read_json(new / "evaluate" / paths.RESULTS)
        base = runio.read_json(served / "evaluate" / paths.RESULTS)
        published = runio.read_done(new, "publish") is not None
        failed, swap_s = None, None
        if published:
            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(post, url, f"{t} (again)") for t in tickets[:16]]
                time.sleep(0.5)
                started = time.perf_counter()
                swapped = httpx.post(url.removesuffix("/v1") + "/admin/reload", json={"run_dir": str(new)},
                                     timeout=600)
                swap_s = time.perf_counter() - started
                failed = sum(f.result().status_code != 200 for f in futures) + (swapped.status_code != 200)
    t = generate["traffic"]
    gate = results["gate"]
    baseline = gate["baseline"] or {}
    rows = [
        ["tickets sent / answered 200", f"{len(tickets)} / {sum(r.status_code == 200 for r in replies)}"],
        [f"published route (before forcing it on at {threshold})", "enabled" if published_route else "disabled"],
        ["answered by the teacher at serve time (fallback / shadow)",
         f"{len(sent)} ({t['teacher_source'].get('fallback', 0)} / {t['teacher_source'].get('shadow', 0)})"],
        ["logged inputs kept in train/val (sent / never sent)",
         f"{len(kept)} ({len(kept & sent)} / {len(kept - sent)})"],
        ["re-distil: paid calls for sent inputs", t["paid_calls_for_sent_inputs"]],
        ["re-distil: new ledger rows (expected: never-sent kept inputs)", f"{paid_rows} ({len(kept - sent)})"],
        ["re-distil: answered from the ledger / from the log",
         f"{t['answered_from_ledger']} / {t['answered_from_log']}"],
        ["test ids identical to the served run's", [p["id"] for p in results["per_item"]]
         == [p["id"] for p in base["per_item"]]],
        ["agreement served -> new (paired items, McNemar p)",
         f"{baseline.get('baseline_agreement')} -> {baseline.get('agreement')} ({baseline.get('n_shared')}, "
         f"p={baseline.get('p_value')})"],
        ["gate / published", f"{'passed' if gate['passed'] else 'failed'} / {published}"],
        ["failed requests during the reload (16 in flight)", "n/a (not published)" if failed is None else failed],
        ["wall: build / serve tickets / re-distil / reload (s)",
         f"{build_s:.0f} / {serve_s:.0f} / {redistil_s:.0f} / {swap_s if swap_s is None else round(swap_s, 1)}"],
    ]
    text = table(["what", "measured"], rows)
    print(text)
    append("Flywheel on the embedded models (serve, re-distil from traffic, reload)", text, not args.no_record)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
