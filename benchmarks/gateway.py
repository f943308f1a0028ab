"""What the gateway adds: latency, throughput and CPU of ``distill serve`` over calling the student directly.

    python benchmarks/gateway.py [--requests 2000] [--concurrency 32] [--student-ms 20] [--teacher-ms 100] [--runs 3]

A fake student (20 ms, distill's scored protocol, an aiohttp server) and a fake teacher (100 ms, distill's
FakeTeacher) run on loopback, each in its own process, and ``python -m distill serve`` runs in a third over a
synthetic run directory (the support_tickets recipe, a routing rule enabled at confidence 0.9, an empty ledger: no
model is loaded, the fake student answers). This process sends the load with aiohttp at ``--concurrency``, every
input distinct, median of ``--runs``:
  - direct: the student's own score request (the body the gateway sends), straight to the fake student;
  - gateway, kept: the same inputs as chat completions through the gateway, the student confident (route=student);
  - gateway, fallback: the student unsure (0.5), so every request also pays the teacher through the ledger.
Added latency = the gateway's percentile minus the direct one. Gateway CPU per request = the gateway process's CPU
time over the requests (psutil). Prints the table last and appends it to BENCHMARKS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
kind, latency = sys.argv[1], float(sys.argv[2])
if kind == "student":  # an asyncio server: a thread-per-connection one would be the bottleneck, not the gateway
    from aiohttp import web
    from distill.serve.runtime import SCORE_PATH
    answer = {"category": "billing", "priority": "low"}

    async def score(request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        await asyncio.sleep(latency)
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


def start_server(kind: str, latency_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, str(latency_s)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


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


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], float, int]:
    """Send every body with ``concurrency`` in flight: (per-request seconds, wall seconds, non-200 count)."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    pending = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal failed
            for body in pending:
                t0 = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    failed += resp.status != 200
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, failed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(name: str, url: str, bodies: list[dict], concurrency: int, gateway_pid: int | None) -> dict:
    import psutil

    proc = psutil.Process(gateway_pid) if gateway_pid else None
    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
    lat, wall, failed = asyncio.run(load(url, bodies, concurrency))
    cpu = sum(proc.cpu_times()[:2]) - cpu0 if proc else None
    if failed:
        raise SystemExit(f"{name}: {failed} of {len(bodies)} requests failed")
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "rps": len(bodies) / wall,
            "cpu_ms": 1000 * cpu / len(bodies) if cpu is not None else None}


def main() -> None:
    import httpx

    from distill.config import validate
    from distill.serve.runtime import SCORE_PATH
    from distill.task import Task
    from distill.teacher.server import free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--student-ms", type=float, default=20)
    ap.add_argument("--teacher-ms", type=float, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()

    student, student_url = start_server("student", args.student_ms / 1000)
    teacher, teacher_url = start_server("teacher", args.teacher_ms / 1000)
    gateway = None
    results: dict[str, list[dict]] = {"direct": [], "kept": [], "fallback": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            synthetic_run(run_dir, student_url, teacher_url)
            import yaml

            task = Task(validate(yaml.safe_load((run_dir / "config.yaml").read_text())))
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            gateway = subprocess.Popen([sys.executable, "-m", "distill", "serve", f"run_dir={run_dir}",
                                        f"serve.port={port}", f"serve.student_endpoint={student_url}",
                                        f"serve.max_concurrency={4 * args.concurrency}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the gateway did not start")
                time.sleep(0.2)
            texts = [f"Ticket {i}: invoice {i} shows a wrong amount, please check" for i in range(args.requests)]
            direct = [{"messages": task.student_messages(t), "schema": task.schema.schema,
                       "max_new_tokens": 48} for t in texts]
            chat = [{"model": task.recipe.name, "messages": [{"role": "user", "content": t}]} for t in texts]
            warm = chat[: max(1, min(100, args.requests // 10))]
            measure("warm-up", f"{base}/v1/chat/completions", warm, args.concurrency, None)
            for run in range(args.runs):
                results["direct"].append(measure("direct", student_url + SCORE_PATH, direct, args.concurrency, None))
                results["kept"].append(measure("kept", f"{base}/v1/chat/completions", chat, args.concurrency,
                                               gateway.pid))
                unsure = [{"model": task.recipe.name, "messages": [{"role": "user", "content": f"unsure {run} {t}"}]}
                          for t in texts]
                results["fallback"].append(measure("fallback", f"{base}/v1/chat/completions", unsure,
                                                   args.concurrency, gateway.pid))
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            gateway.wait(timeout=60)
        for proc in (student, teacher):
            proc.stdin.close()
            proc.wait(timeout=30)

    med = {name: {k: summary([r[k] for r in runs])[0] if runs[0][k] is not None else None for k in runs[0]}
           for name, runs in results.items()}
    base_p50, base_p99 = med["direct"]["p50"], med["direct"]["p99"]
    labels = {"direct": "student called directly", "kept": "gateway, student kept (route=student)",
              "fallback": f"gateway, fallback (student + {args.teacher_ms:.0f} ms teacher, ledger write)"}
    rows = []
    for name, m in med.items():
        added = name == "kept"
        rows.append([labels[name], f"{m['rps']:.0f}", f"{m['p50'] * 1000:.1f}", f"{m['p99'] * 1000:.1f}",
                     f"{(m['p50'] - base_p50) * 1000:.2f}" if added else "-",
                     f"{(m['p99'] - base_p99) * 1000:.2f}" if added else "-",
                     f"{m['cpu_ms']:.2f}" if m["cpu_ms"] is not None else "-"])
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    intro = (f"{args.requests} task requests per path at concurrency {args.concurrency}, fake student "
             f"{args.student_ms:.0f} ms, fake teacher {args.teacher_ms:.0f} ms, each in its own process on loopback; "
             f"median of {args.runs} runs; load average {load_avg:.1f} when it ended.")
    text = (textwrap.fill(intro, 116) + "\n\n"
            + table(["path", "requests/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                     "gateway CPU ms/request"], rows))
    append("Gateway overhead (distill serve)", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
