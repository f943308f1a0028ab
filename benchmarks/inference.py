"""Student inference on CPU against the teacher's time per ticket: the speed-up the routing rule buys.

    python benchmarks/inference.py --run-dir runs/X [--items 40] [--runs 3] [--slots 8] [--no-record]
    python benchmarks/inference.py --run-dir runs/X --only native     # the shipped GGUF: runtime + llama-server
    python benchmarks/inference.py --run-dir runs/X --only runtime    # the shipped GGUF in distill's runtime only

Needs a finished run directory (generate, train, evaluate, publish). On the test split, median of ``--runs``:
  - the in-process student in transformers, free generation and scored decoding (eval.decode), batch 8;
  - every published GGUF served by llama-cpp-python's server ("llama.cpp server"), one request at a time;
  - every published GGUF in distill's student runtime (what ``distill serve`` starts: distill.serve.runtime, scored
    decode, the shared prompt prefix's KV cache kept, one request at a time), asked over HTTP as the gateway asks it
    at concurrency 1, 4 and 8; answers and confidences compared to concurrency 1;
  - every published GGUF served by llama.cpp's C++ llama-server (when built: scripts/build_llama_server.py) with
    one slot at concurrency 1, and with ``--slots`` slots (continuous batching) at concurrency 1, 4 and 8, each run
    on a fresh server (no ticket's prompt is cached from an earlier run); answers compared to the one-slot run;
  - the teacher's own time per ticket from the ledger (its long few-shot prompt, as labelled in generate).
Tickets/s, mean latency per ticket; ratio = teacher seconds per ticket / student seconds per ticket. FLOP limit of
a GGUF: the measured fp32 torch GEMM peak / (2 x its parameters x tokens per ticket), counted twice: on all the
tokens of a ticket (prompt + completion; the runtime: every token its scored decode would run with an empty cache)
and on the tokens actually evaluated (those after the KV-cached shared prefix: llama-server's timings.prompt_n +
predicted_n, the runtime's count of tokens it ran); the second is the limit of a server that keeps the prefix.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, summary, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8, help="llama-server slots for the concurrency 1/4/8 rows")
    ap.add_argument("--only", choices=("all", "native", "runtime"), default="all",
                    help="native: only the GGUFs in distill's runtime and on llama-server (and the teacher row); "
                         "runtime: only the GGUFs in distill's runtime")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every llama.cpp runtime (default: serve.student_threads for distill's runtime, "
                         "all cores for llama-server)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from distill import paths
    from distill.config import load_config
    from distill.student import ladder
    from distill.student.endpoint import predict_endpoint
    from distill.student.models import load_student
    from distill.student.predict import predict_in_process
    from distill.task import Task, load_split
    from distill.teacher.server import LlamaCppServer, LlamaServer, llama_server_binary

    run_dir = args.run_dir.resolve()
    saved = (run_dir / paths.CONFIG_YAML).read_text()
    import yaml

    saved_cfg = yaml.safe_load(saved)
    # the student the run trained (for student=auto, the rung it chose), not today's default profile's
    cfg = ladder.resolve(load_config([f"recipe={saved_cfg['recipe']['name']}", f"run_dir={run_dir}",
                                      f"student={saved_cfg['student']['name']}"]), run_dir)
    task = Task(cfg)
    rows = load_split(run_dir, "test")[: args.items]
    results: list[list] = []

    # the teacher: seconds per ticket from the ledger (all calls for one ticket: one per field for score)
    with sqlite3.connect(paths.ledger_path(run_dir)) as db:
        calls, mean_latency = db.execute("SELECT COUNT(*), AVG(latency_s) FROM calls").fetchone()
    gen = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
    per_ticket_teacher = mean_latency * calls / max(1, gen["inputs"])

    notes: list[str] = []
    if args.only == "all":
        in_process_and_python_server(cfg, task, rows, run_dir, args, results, load_student, predict_in_process,
                                     predict_endpoint, LlamaCppServer)
    runtime_rows(cfg, task, rows, run_dir, args, results, notes)
    if args.only == "runtime":
        pass
    elif llama_server_binary() is None:
        notes.append("llama-server not built (scripts/build_llama_server.py): no native rows")
    else:
        native_rows(cfg, task, rows, run_dir, args, results, notes, predict_endpoint, LlamaServer)

    table_rows = [[name, f"{1 / per:.2f}", f"{per * 1000:.0f}", f"{lo / len(rows):.3f}-{hi / len(rows):.3f}",
                   f"{per_ticket_teacher / per:.1f}x"] for name, per, lo, hi in results]
    table_rows.append([f"teacher {gen['teacher']['model']} ({gen['method']}, from the ledger)",
                       f"{1 / per_ticket_teacher:.2f}", f"{per_ticket_teacher * 1000:.0f}", "-", "1.0x"])
    text = (f"{len(rows)} test tickets of `{run_dir.name}` (recipe {cfg.recipe.name}), median of {args.runs} runs; "
            f"s/ticket min-max over runs.\n\n"
            + table(["predictor", "tickets/s", "ms/ticket", "s/ticket min-max", "speed-up vs teacher"], table_rows)
            + "".join(f"\n\n{n}" for n in notes))
    append("Student inference on CPU", text, record=not args.no_record)
    print(text)


def in_process_and_python_server(cfg, task, rows, run_dir, args, results, load_student, predict_in_process,
                                 predict_endpoint, LlamaCppServer) -> None:
    from distill import paths

    model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
    for decode in ("free", "scored"):
        c = cfg.model_copy(deep=True)
        c.eval.decode = decode
        walls = []
        for _ in range(args.runs):
            started = time.perf_counter()
            predict_in_process(c, task, rows, model, tokenizer)
            walls.append(time.perf_counter() - started)
        med, lo, hi = summary(walls)
        results.append([f"student, transformers, {decode} (batch {c.eval.batch_size})", med / len(rows), lo, hi])
    del model

    for rel in sorted(r for r in (run_dir / "publish" / "model").glob("*.gguf")):
        c = cfg.model_copy(deep=True)
        c.eval.endpoint.concurrency = 1
        c.eval.endpoint.structured_output = "llama_cpp"
        walls = []
        log_path = Path(tempfile.gettempdir()) / "distill-inference-bench.log"
        with LlamaCppServer(rel, alias="student", n_ctx=2048, log_path=log_path) as srv:
            predict_endpoint(c, task, rows[:2], srv.base_url, "student")  # warm-up
            for _ in range(args.runs):
                started = time.perf_counter()
                predict_endpoint(c, task, rows, srv.base_url, "student")
                walls.append(time.perf_counter() - started)
        med, lo, hi = summary(walls)
        results.append([f"student, llama.cpp server, {rel.name.rsplit('-', 1)[-1][:-5]} (1 at a time)",
                        med / len(rows), lo, hi])


def gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def tokens_per_ticket(task, rows, base_url: str, cfg) -> tuple[float, float | None]:
    """Mean (prompt + completion, evaluated) tokens per ticket from llama-server, one request at a time: usage, and
    its timings (prompt_n: prompt tokens not reused from the slot's KV cache, + predicted_n); None without
    timings."""
    import httpx

    fmt = task.schema.response_format("llama_cpp")
    total, evaluated = 0, 0
    with httpx.Client(timeout=120) as client:
        for row in rows:
            got = client.post(f"{base_url}/chat/completions",
                              json={"model": "student", "messages": task.student_messages(row["input"]),
                                    "temperature": 0.0, "max_tokens": cfg.eval.max_new_tokens,
                                    "response_format": fmt}).raise_for_status().json()
            total += got["usage"]["prompt_tokens"] + got["usage"]["completion_tokens"]
            timings = got.get("timings") or {}
            evaluated = None if evaluated is None or "prompt_n" not in timings else \
                evaluated + timings["prompt_n"] + timings["predicted_n"]
    return total / len(rows), None if evaluated is None else evaluated / len(rows)


def flop_limit_note(what: str, best: float, peak: float, params: int, tokens: float, evaluated: float | None,
                    all_what: str) -> str:
    """One note: the best tickets/s against the FLOP limit on all tokens and on the evaluated tokens."""
    def limit(n: float) -> float:
        return peak * 1e9 / (2 * params * n)

    text = (f"{what}: best {best:.2f} tickets/s. FLOP limit on all tokens: {limit(tokens):.1f} tickets/s (2 x "
            f"{params / 1e6:.1f}M parameters x {tokens:.0f} {all_what} per ticket over the fp32 torch GEMM peak "
            f"{peak:.1f} GFLOP/s; best = {best / limit(tokens):.1%} of it)")
    if evaluated:
        text += (f"; on the tokens evaluated after the cached prefix ({evaluated:.1f} per ticket): "
                 f"{limit(evaluated):.1f} tickets/s (best = {best / limit(evaluated):.1%} of it)")
    return text + "."


def runtime_tokens(gguf: Path, hf: Path, task, rows, cfg, threads: int | None) -> tuple[float, float, float, str]:
    """Per ticket in distill's runtime code (in process, as the runtime runs it): (tokens evaluated with the KV
    cache kept from the ticket before, tokens evaluated from an empty cache, prompt tokens, and how the answers
    compare with a logit row computed at every position, as the runtime did before)."""
    from distill.serve.runtime import Scorer

    scorer = Scorer(gguf, hf, n_ctx=cfg.serve.student_n_ctx, n_threads=threads or cfg.serve.student_threads)
    model = scorer.model

    def ask(row) -> dict:
        return scorer.score(task.student_messages(row["input"]), task.schema.schema, cfg.eval.max_new_tokens)

    try:
        ask(rows[0])  # as served: the shared system prefix is in the cache before the first ticket
        before = model.evaluated_tokens
        got = [ask(r) for r in rows]
        warm = model.evaluated_tokens - before
        cold = 0
        for r in rows:
            model.llm.reset()  # an empty KV cache: every token the scored decode needs is run
            before = model.evaluated_tokens
            ask(r)
            cold += model.evaluated_tokens - before
        model.all_rows = True
        model.llm.reset()
        old = [ask(r) for r in rows]
    finally:
        model.llm.close()
    n = len(rows)
    same = sum(a["answer"] == b["answer"] for a, b in zip(got, old))
    diff = max(abs((a["confidence"] or 0) - (b["confidence"] or 0)) for a, b in zip(got, old))
    return (warm / n, cold / n, sum(g["prompt_tokens"] for g in got) / n,
            f"answers with logits only where read = with a row at every position: {same}/{n}, largest confidence "
            f"difference {diff:.2g}")


def timed_row(results: list, rows: list, walls: list[float], outs: list[list], reference: list | None,
              label) -> tuple[list, float]:
    """Append one timed row (seconds per ticket: median, min, max of ``walls``), labelled by ``label(same)``, where
    ``same`` is the fewest answers of any run equal to ``reference`` (the first run's when None). Returns the
    reference and the median tickets/s."""
    reference = outs[0] if reference is None else reference
    same = min(sum(a == b for a, b in zip(out, reference)) for out in outs)
    med, lo, hi = summary(walls)
    results.append([label(same), med / len(rows), lo, hi])
    print(f"{results[-1][0]}: {len(rows) / med:.3f} tickets/s, runs {walls}", flush=True)
    return reference, len(rows) / med


def runtime_rows(cfg, task, rows, run_dir, args, results, notes) -> None:
    """Each published GGUF in distill's student runtime (a child process, as ``distill serve`` starts it), asked over
    HTTP as the gateway asks it, at concurrency 1, 4 and 8; one runtime for every run (it keeps only the last
    request's prefix, so no ticket is cached from a run before)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from benchmarks.common import gemm_peak_gflops, load_average
    from distill import paths
    from distill.serve.runtime import SCORE_PATH, StudentRuntime

    hf = run_dir / "publish" / paths.MODEL_DIR / paths.HF_DIR
    log_path = Path(tempfile.gettempdir()) / "distill-inference-bench-runtime.log"
    load_before, peak = load_average(), gemm_peak_gflops()
    for rel in sorted(r for r in (run_dir / "publish" / paths.MODEL_DIR).glob("*.gguf")):
        qtype = rel.name.rsplit("-", 1)[-1][:-5]
        warm, cold, prompt, rows_check = runtime_tokens(rel, hf, task, rows, cfg, args.threads)
        print(f"{qtype}: evaluated {warm:.1f}, from empty {cold:.1f}, prompt {prompt:.1f} tokens per ticket; "
              f"{rows_check}; GEMM peak {peak:.1f} GFLOP/s", flush=True)
        reference, best = None, 0.0
        with StudentRuntime(rel, hf, n_ctx=cfg.serve.student_n_ctx, n_threads=args.threads or
                            cfg.serve.student_threads, log_path=log_path) as runtime, \
                httpx.Client(timeout=600) as client:
            def ask(row) -> tuple:
                got = client.post(runtime.base_url + SCORE_PATH,
                                  json={"messages": task.student_messages(row["input"]),
                                        "schema": task.schema.schema, "max_new_tokens": cfg.eval.max_new_tokens})
                got = got.raise_for_status().json()
                return json.dumps(got["answer"], sort_keys=True), got["confidence"]

            for row in rows[:2]:
                ask(row)  # warm-up
            for concurrency in (1, 4, 8):
                walls, outs = [], []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        outs.append(list(pool.map(ask, rows)))
                    walls.append(time.perf_counter() - started)
                reference, rate = timed_row(
                    results, rows, walls, outs, reference,
                    lambda same: f"student, distill runtime (scored, 1 request at a time), {qtype}, concurrency "
                                 f"{concurrency} (answer + confidence = concurrency 1: {same}/{len(rows)})")
                best = max(best, rate)
        notes.append(flop_limit_note(f"{qtype} in distill's runtime", best, peak, gguf_params(rel), cold, warm,
                                     f"tokens a scored answer runs from an empty cache ({prompt:.0f} prompt + the "
                                     f"candidates' and generated tokens)")
                     + f" {rows_check}. Load average before {load_before}, after {load_average()}.")


def native_rows(cfg, task, rows, run_dir, args, results, notes, predict_endpoint, LlamaServer) -> None:
    """Each published GGUF on llama-server: 1 slot at concurrency 1, then ``--slots`` slots at 1, 4 and 8."""
    from benchmarks.common import gemm_peak_gflops, load_average

    log_path = Path(tempfile.gettempdir()) / "distill-inference-bench-native.log"
    load_before = load_average()
    peak = gemm_peak_gflops()
    for rel in sorted(r for r in (run_dir / "publish" / "model").glob("*.gguf")):
        qtype = rel.name.rsplit("-", 1)[-1][:-5]
        reference, tokens, evaluated = None, None, None
        best = 0.0
        for slots, concurrency in [(1, 1)] + [(args.slots, c) for c in (1, 4, 8)]:
            c = cfg.model_copy(deep=True)
            c.eval.endpoint.concurrency = concurrency
            c.eval.endpoint.structured_output = "llama_cpp"
            c.eval.endpoint.timeout_s = 600  # a loaded machine: a timed-out ticket would count as a failure
            walls, raws = [], []
            for _ in range(args.runs):  # a fresh server per run: no ticket's prompt is cached from the run before
                with LlamaServer(rel, alias="student", n_ctx=2048, slots=slots, log_path=log_path,
                                 n_threads=args.threads) as srv:
                    predict_endpoint(c, task, rows[:2], srv.base_url, "student")  # warm-up
                    started = time.perf_counter()
                    preds = predict_endpoint(c, task, rows, srv.base_url, "student")
                    walls.append(time.perf_counter() - started)
                    raws.append(preds.raw)
                    if tokens is None:
                        tokens, evaluated = tokens_per_ticket(task, rows, srv.base_url, c)
            reference, rate = timed_row(
                results, rows, walls, raws, reference,
                lambda same: f"student, llama-server, {qtype}, {slots} slot{'s' * (slots > 1)}, concurrency "
                             f"{concurrency} (answers = 1 slot: {same}/{len(rows)})")
            best = max(best, rate)
        notes.append(flop_limit_note(f"{qtype} on llama-server", best, peak, gguf_params(rel), tokens, evaluated,
                                     "prompt + completion tokens")
                     + f" Load average before {load_before}, after {load_average()}.")


if __name__ == "__main__":
    main()
