"""What the gateway adds: latency, throughput and CPU of ``distill serve`` over calling the student directly.

    python benchmarks/gateway.py [--requests 2000] [--concurrency 32] [--student-ms 20] [--teacher-ms 100] [--runs 3]
        [--sweep 1,8] [--student-jitter-ms 0] [--code DIR]
    python benchmarks/gateway.py --real-run-dir DIR [--real-requests 160] [--real-concurrency 4] [--runs 3]

A fake student (20 ms, distill's scored protocol, an aiohttp server) and a fake teacher (100 ms, distill's
FakeTeacher) run on loopback, each in its own process, and ``python -m distill serve`` runs in a third over a
synthetic run directory (the support_tickets recipe, a routing rule enabled at confidence 0.9, an empty ledger: no
model is loaded, the fake student answers). This process sends the load with aiohttp at ``--concurrency``, every
input distinct, median of ``--runs``:
  - direct: the student's own score request (the body the gateway sends), straight to the fake student;
  - gateway, kept: the same inputs as chat completions through the gateway, the student confident (route=student);
  - gateway, fallback: the student unsure (0.5), so every request also pays the teacher through the ledger.
Added latency = the gateway's percentile minus the direct one. Gateway CPU per request = the gateway process's CPU
time over the requests (psutil). ``--sweep 1,8`` adds the direct and kept paths at those concurrencies too (fewer
requests: ``--sweep-requests``), which shows how much of the added latency is requests queueing behind each other
on the gateway's one event loop; ``--student-jitter-ms J`` spreads the fake student's latency uniformly over
``student-ms +- J/2`` (same mean), so its answers stop coming back to the gateway all at once.

``--real-run-dir DIR``: the real student instead. DIR is a run whose publish stage finished (e.g. ``python -m distill
run recipe=support_tickets profile=smoke run_dir=DIR``); its published GGUF is started once in distill's student
runtime, a copy of the run (hard links, the route forced on at confidence 0, so every valid answer stays with the
student) is served by ``python -m distill serve`` with ``serve.student_endpoint`` at that same runtime, and a fake
teacher answers the rare invalid answer. The run's inputs (every split, cycled to ``--real-requests``) are sent at
``--real-concurrency`` to the runtime directly (the gateway's own score request) and through the gateway, the two
alternating, ``--runs`` times each: tickets/s and the ratio (target >= 0.9x).
``--code DIR`` runs the gateway from another distill source tree (e.g. ``git archive`` of an older commit), so old
and new gateway code are measured by the same script against the same fakes.
Prints the table last and appends it to BENCHMARKS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, summary, table  # noqa: E402

SERVER = """
import asyncio, json, sys
import random
kind, latency, jitter = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if kind == "student":  # an asyncio server: a thread-per-connection one would be the bottleneck, not the gateway
    from aiohttp import web
    from distill.serve.runtime import SCORE_PATH
    answer = {"category": "billing", "priority": "low"}

    async def score(request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        await asyncio.sleep(latency + jitter * (random.random() - 0.5))
        return web.json_response({"answer": answer, "text": json.dumps(answer), "invalid_reason": None,
                                  "confidence": 0.5 if text.startswith("unsure") else 0.97,
                                  "field_confidence": {}, "prompt_tokens": 0})

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "bench-student", "object": "model"}]})

    async def main():
        app = web.Application()
        app.add_routes([web.post("/v1" + SCORE_PATH, score), web.get("/v1/models", models)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
else:
    from distill.testing.fake_teacher import FakeTeacher
    with FakeTeacher(lambda m: json.dumps({"category": "billing", "priority": "high"}), latency_s=latency) as t:
        print(t.base_url, flush=True)
        sys.stdin.read()
"""


def start_server(kind: str, latency_s: float, jitter_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, str(latency_s), str(jitter_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def start_gateway(overrides: list[str], port: int, code: str | None = None) -> subprocess.Popen:
    """``python -m distill serve`` with ``overrides`` (from the source tree ``code``, default this checkout's);
    returns once /healthz answers."""
    import httpx

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    log = tempfile.TemporaryFile(mode="w+")  # the gateway's own log, shown if it does not start
    gateway = subprocess.Popen([sys.executable, "-m", "distill", "serve", *overrides, f"serve.port={port}"],
                               stdout=subprocess.DEVNULL, stderr=log, env=env,
                               cwd=Path(code).resolve() if code else None)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        if gateway.poll() is not None or time.monotonic() > deadline:
            gateway.kill()
            gateway.wait()
            log.seek(0)
            said = "".join(log.readlines()[-15:])
            raise SystemExit(f"the gateway did not start (python -m distill serve {' '.join(overrides)}); "
                             f"the end of its log:\n{said}")
        time.sleep(0.2)


def stop(gateway: subprocess.Popen | None) -> None:
    if gateway is not None and gateway.poll() is None:
        gateway.terminate()
        gateway.wait(timeout=60)


def synthetic_run(run_dir: Path, student_url: str, teacher_url: str) -> None:
    """A run directory with what serve reads: config.yaml, publish/routing.yaml, and the two DONE.json files."""
    import yaml

    from distill import paths, pipeline, routing, runio
    from distill.config import load_config
    from distill.task import Task

    cfg = load_config(["teacher=openai", f"teacher.base_url={teacher_url}", "teacher.model=fake-teacher",
                       "teacher.api_key_env=null", "teacher.concurrency=256", f"run_dir={run_dir}"])
    pipeline.save_config(cfg)
    task = Task(cfg)
    rule = routing.RoutingRule(
        task=routing.TaskSpec(id=cfg.recipe.name, match=routing.Match(model_aliases=[cfg.recipe.name]),
                              output_schema=task.schema.schema),
        student=routing.StudentSpec(model="bench-student", endpoint=student_url, artifacts={}, stop=["<|im_end|>"],
                                    max_tokens=cfg.eval.max_new_tokens),
        fallback=routing.FallbackSpec(model="fake-teacher", endpoint=teacher_url),
        route=routing.RouteSpec(enabled=True, confidence_threshold=0.9, target_agreement=0.98, expected_coverage=1.0,
                                reason="benchmark"),
        cost=routing.CostSpec(), evidence=routing.Evidence(results_sha256="0" * 64, curve="val_coverage_curve"))
    publish = paths.stage_dir(run_dir, "publish")
    runio.atomic_write_text(publish / paths.ROUTING, yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))
    for stage in ("generate", "publish"):
        runio.write_done(run_dir, stage, "benchmark", {"method": "generate"}, outputs={})


async def load(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[float], float, int]:
    """Send every (JSON-encoded) body with ``concurrency`` in flight: (per-request seconds, wall seconds, non-200
    count)."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    pending = iter(bodies)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal failed
            for body in pending:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    failed += resp.status != 200
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, failed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(name: str, url: str, bodies: list, concurrency: int, gateway_pid: int | None) -> dict:
    import json

    import psutil

    # encoded before the clock starts: the load generator shares the cores with what it measures
    bodies = [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bodies]
    proc = psutil.Process(gateway_pid) if gateway_pid else None
    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
    lat, wall, failed = asyncio.run(load(url, bodies, concurrency))
    cpu = sum(proc.cpu_times()[:2]) - cpu0 if proc else None
    if failed:
        raise SystemExit(f"{name}: {failed} of {len(bodies)} requests failed")
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "rps": len(bodies) / wall,
            "cpu_ms": 1000 * cpu / len(bodies) if cpu is not None else None}


def fake_student(args) -> str:
    """The fake-student benchmark: direct, kept and fallback at ``--concurrency`` (and the sweep); the table."""
    import yaml

    from distill.config import validate
    from distill.serve.runtime import SCORE_PATH
    from distill.task import Task
    from distill.teacher.server import free_port

    sweep = [int(c) for c in args.sweep.split(",") if c.strip()] if args.sweep else []
    student, student_url = start_server("student", args.student_ms / 1000, args.student_jitter_ms / 1000)
    teacher, teacher_url = start_server("teacher", args.teacher_ms / 1000)
    gateway = None
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            synthetic_run(run_dir, student_url, teacher_url)
            task = Task(validate(yaml.safe_load((run_dir / "config.yaml").read_text())))
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            gateway = start_gateway([f"run_dir={run_dir}", f"serve.student_endpoint={student_url}",
                                     f"serve.max_concurrency={4 * max([args.concurrency, *sweep])}"], port,
                                    args.code)
            texts = [f"Ticket {i}: invoice {i} shows a wrong amount, please check" for i in range(args.requests)]

            def direct(ts):
                return [{"messages": task.student_messages(t), "schema": task.schema.schema, "max_new_tokens": 48}
                        for t in ts]

            def chat(ts, prefix=""):
                return [{"model": task.recipe.name, "messages": [{"role": "user", "content": prefix + t}]}
                        for t in ts]

            warm = chat(texts[: max(1, min(100, args.requests // 10))], "warm ")
            measure("warm-up", f"{base}/v1/chat/completions", warm, args.concurrency, None)
            for run in range(args.runs):
                for c in sweep:
                    few = texts[: args.sweep_requests]
                    results.setdefault(("direct", c), []).append(
                        measure("direct", student_url + SCORE_PATH, direct(few), c, None))
                    results.setdefault(("kept", c), []).append(
                        measure("kept", f"{base}/v1/chat/completions", chat(few, f"c{c} r{run} "), c, gateway.pid))
                c = args.concurrency
                results.setdefault(("direct", c), []).append(
                    measure("direct", student_url + SCORE_PATH, direct(texts), c, None))
                results.setdefault(("kept", c), []).append(
                    measure("kept", f"{base}/v1/chat/completions", chat(texts), c, gateway.pid))
                results.setdefault(("fallback", c), []).append(
                    measure("fallback", f"{base}/v1/chat/completions", chat(texts, f"unsure {run} "), c,
                            gateway.pid))
    finally:
        stop(gateway)
        for proc in (student, teacher):
            proc.stdin.close()
            proc.wait(timeout=30)

    med = {key: {k: summary([r[k] for r in runs])[0] if runs[0][k] is not None else None for k in runs[0]}
           for key, runs in results.items()}
    labels = {"direct": "student called directly", "kept": "gateway, student kept (route=student)",
              "fallback": f"gateway, fallback (student + {args.teacher_ms:.0f} ms teacher, ledger write)"}
    rows = []
    for (name, c), m in sorted(med.items(), key=lambda kv: (kv[0][1], list(labels).index(kv[0][0]))):
        added, base_m = name == "kept", med[("direct", c)]
        rows.append([labels[name], str(c), f"{m['rps']:.0f}", f"{m['p50'] * 1000:.1f}", f"{m['p99'] * 1000:.1f}",
                     f"{(m['p50'] - base_m['p50']) * 1000:.2f}" if added else "-",
                     f"{(m['p99'] - base_m['p99']) * 1000:.2f}" if added else "-",
                     f"{m['cpu_ms']:.2f}" if m["cpu_ms"] is not None else "-"])
    jitter = f" (+- {args.student_jitter_ms / 2:g} ms, uniform)" if args.student_jitter_ms else ""
    swept = (f" (concurrency {', '.join(map(str, sweep))}: {args.sweep_requests} requests each, direct and kept "
             f"only)") if sweep else ""
    intro = (f"{args.requests} task requests per path at concurrency {args.concurrency}{swept}, fake student "
             f"{args.student_ms:.0f} ms{jitter}, fake teacher {args.teacher_ms:.0f} ms, each in its own process on "
             f"loopback; median of {args.runs} runs; load average {_load():.1f} when it ended.")
    return (textwrap.fill(intro, 116) + "\n\n"
            + table(["path", "in flight", "requests/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                     "gateway CPU ms/request"], rows))


def real_student(args) -> str:
    """The real student: tickets/s through the gateway vs its runtime called directly, side by side."""
    import yaml

    from distill import paths, runio
    from distill.routing import RouteSpec, load_rule
    from distill.serve.command import load_serve_config, pick_artifact
    from distill.serve.runtime import SCORE_PATH, StudentRuntime
    from distill.serve.student import ScoredStudent
    from distill.task import Task
    from distill.teacher.server import free_port

    source = Path(args.real_run_dir).expanduser().resolve()
    runio.require_done(source, "publish", "benchmarks/gateway.py --real-run-dir")
    publish = paths.stage_dir(source, "publish")
    rule = load_rule(publish / paths.ROUTING)
    if rule.student.kind != "causal_lm":
        raise SystemExit(f"--real-run-dir {source}: its student is an {rule.student.kind}, served in the gateway's "
                         f"own process (no runtime to call directly); pass a run whose student is a GGUF")
    teacher, teacher_url = start_server("teacher", args.teacher_ms / 1000)
    gateway = None
    results: dict[str, list[dict]] = {"direct": [], "gateway": []}
    routes: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            # hard links where the filesystem allows (the GGUF is large); every file written below is replaced by a
            # rename, never written through a link into the source run
            shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns(paths.CHECKPOINTS_DIR, paths.SERVE_DIR),
                            copy_function=_link_or_copy)
            routing = paths.stage_dir(run_dir, "publish") / paths.ROUTING
            rule.route = RouteSpec(enabled=True, confidence_threshold=0.0, target_agreement=0.98,
                                   expected_coverage=1.0, expected_agreement=0.98, reason="benchmark: forced on")
            runio.atomic_write_text(routing, yaml.safe_dump(rule.model_dump(mode="json"), sort_keys=False))
            teacher_over = ["teacher.kind=openai", f"teacher.base_url={teacher_url}", "teacher.model=fake-teacher",
                            "teacher.api_key_env=null"]
            cfg = load_serve_config([f"run_dir={run_dir}", *teacher_over])
            task = Task(cfg)
            texts = [r["input"] for split in paths.SPLITS for r in runio.read_jsonl(paths.split_path(run_dir, split))]
            if not texts:
                raise SystemExit(f"--real-run-dir {source}: generate/data holds no inputs")
            texts = [texts[i % len(texts)] for i in range(args.real_requests)]
            logs = Path(tmp) / "logs"
            logs.mkdir()
            runtime = StudentRuntime(pick_artifact(cfg, rule, paths.stage_dir(run_dir, "publish")),
                                     paths.stage_dir(run_dir, "publish") / paths.MODEL_DIR / paths.HF_DIR,
                                     alias=rule.student.model, n_ctx=cfg.serve.student_n_ctx,
                                     n_threads=cfg.serve.student_threads, log_path=logs / "student_runtime.log")
            with runtime:
                student_url = runtime.base_url.rstrip("/")
                # the gateway's own score request for each input, byte for byte
                scorer = ScoredStudent(student_url, task, max_new_tokens=cfg.eval.max_new_tokens, timeout_s=60,
                                       session=None)
                direct = [scorer.body(t) for t in texts]
                chat = [{"model": task.recipe.name, "messages": [{"role": "user", "content": t}]} for t in texts]
                port = free_port()
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                gateway = start_gateway([f"run_dir={run_dir}", f"serve.student_endpoint={student_url}",
                                         "serve.student_timeout_s=120", *teacher_over], port, args.code)
                warm = max(1, min(len(texts), 2 * args.real_concurrency))
                measure("warm-up", student_url + SCORE_PATH, direct[:warm], args.real_concurrency, None)
                measure("warm-up", url, chat[:warm], args.real_concurrency, None)
                for _ in range(args.runs):
                    results["direct"].append(measure("direct", student_url + SCORE_PATH, direct,
                                                     args.real_concurrency, None))
                    results["gateway"].append(measure("gateway", url, chat, args.real_concurrency, gateway.pid))
                routes = _routes(f"http://127.0.0.1:{port}/metrics")
                stop(gateway)
                gateway = None
    finally:
        stop(gateway)
        teacher.stdin.close()
        teacher.wait(timeout=30)

    med = {name: {k: summary([r[k] for r in runs])[0] if runs[0][k] is not None else None for k in runs[0]}
           for name, runs in results.items()}
    ratios = [g["rps"] / d["rps"] for d, g in zip(results["direct"], results["gateway"])]
    rows = [["student runtime called directly (its score request)", f"{med['direct']['rps']:.2f}",
             f"{med['direct']['p50'] * 1000:.0f}", f"{med['direct']['p99'] * 1000:.0f}", "-", "-"],
            ["through the gateway (route forced on)", f"{med['gateway']['rps']:.2f}",
             f"{med['gateway']['p50'] * 1000:.0f}", f"{med['gateway']['p99'] * 1000:.0f}",
             f"{summary(ratios)[0]:.3f}x (runs: {', '.join(f'{r:.3f}' for r in ratios)})",
             f"{med['gateway']['cpu_ms']:.2f}"]]
    kept = ", ".join(f"{k}: {v}" for k, v in sorted(routes.items())) or "not read"
    intro = (f"The real student: {source.name}'s published {rule.student.model} "
             f"({pick_artifact(cfg, rule, publish).name}) in distill's student runtime, {args.real_requests} tickets "
             f"(the run's inputs, cycled) at concurrency {args.real_concurrency}, direct and through the gateway "
             f"alternating, median of {args.runs} runs; gateway answers by route ({kept}); load average "
             f"{_load():.1f} when it ended.")
    return (textwrap.fill(intro, 116) + "\n\n"
            + table(["path", "tickets/s", "p50 ms", "p99 ms", "gateway / direct", "gateway CPU ms/request"], rows))


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _routes(metrics_url: str) -> dict[str, int]:
    """Answers by route from the gateway's /metrics (distill_requests_total)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "distill_requests_total":
                route = sample.labels["route"]
                out[route] = out.get(route, 0) + int(sample.value)
    return out


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sweep", default="", help="comma-separated concurrencies for the direct and kept paths too")
    ap.add_argument("--sweep-requests", type=int, default=500, help="requests per path at each --sweep concurrency")
    ap.add_argument("--student-ms", type=float, default=20)
    ap.add_argument("--student-jitter-ms", type=float, default=0,
                    help="spread the fake student's latency uniformly over student-ms +- J/2")
    ap.add_argument("--teacher-ms", type=float, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--real-run-dir", default=None,
                    help="a published run: its real student, directly vs through the gateway (instead of the fakes)")
    ap.add_argument("--real-requests", type=int, default=160)
    ap.add_argument("--real-concurrency", type=int, default=4)
    ap.add_argument("--code", default=None, help="the distill source tree the gateway runs from (default: this one)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    text = real_student(args) if args.real_run_dir else fake_student(args)
    append("Gateway overhead (distill serve)", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
