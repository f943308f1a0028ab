"""Student inference on CPU against the teacher's time per ticket: the speed-up the routing rule buys.

    python benchmarks/inference.py --run-dir runs/X [--items 40] [--runs 3] [--slots 8] [--no-record]
    python benchmarks/inference.py --run-dir runs/X --only native     # the shipped GGUF on llama-server only

Needs a finished run directory (generate, train, evaluate, publish). On the test split, median of ``--runs``:
  - the in-process student in transformers, free generation and scored decoding (eval.decode), batch 8;
  - every published GGUF served by llama-cpp-python's server ("llama.cpp server"), one request at a time;
  - every published GGUF served by llama.cpp's C++ llama-server (when built: scripts/build_llama_server.py) with
    one slot at concurrency 1, and with ``--slots`` slots (continuous batching) at concurrency 1, 4 and 8, each run
    on a fresh server (no ticket's prompt is cached from an earlier run); answers compared to the one-slot run;
  - the teacher's own time per ticket from the ledger (its long few-shot prompt, as labelled in generate).
Tickets/s, mean latency per ticket; ratio = teacher seconds per ticket / student seconds per ticket. FLOP limit of
a GGUF: the measured fp32 torch GEMM peak / (2 x its parameters x (prompt + completion) tokens per ticket).
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
    ap.add_argument("--only", choices=("all", "native"), default="all",
                    help="native: only the GGUFs on llama-server (and the teacher row)")
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
    if llama_server_binary() is None:
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


def tokens_per_ticket(task, rows, base_url: str, cfg) -> float:
    """Mean prompt + completion tokens per ticket, from the server's usage (one request per ticket)."""
    from distill.student.endpoint import StudentEndpoint

    fmt = task.schema.response_format("llama_cpp")
    total = 0
    with StudentEndpoint(base_url, "student", api_key="not-needed", timeout_s=120, max_retries=1) as client:
        for row in rows:
            reply = client.ask(task.student_messages(row["input"]), max_tokens=cfg.eval.max_new_tokens,
                               response_format=fmt)
            total += reply.usage.prompt_tokens + reply.usage.completion_tokens
    return total / len(rows)


def native_rows(cfg, task, rows, run_dir, args, results, notes, predict_endpoint, LlamaServer) -> None:
    """Each published GGUF on llama-server: 1 slot at concurrency 1, then ``--slots`` slots at 1, 4 and 8."""
    from benchmarks.common import gemm_peak_gflops, load_average

    log_path = Path(tempfile.gettempdir()) / "distill-inference-bench-native.log"
    load_before = load_average()
    peak = gemm_peak_gflops()
    for rel in sorted(r for r in (run_dir / "publish" / "model").glob("*.gguf")):
        qtype = rel.name.rsplit("-", 1)[-1][:-5]
        reference, tokens = None, None
        best = 0.0
        for slots, concurrency in [(1, 1)] + [(args.slots, c) for c in (1, 4, 8)]:
            c = cfg.model_copy(deep=True)
            c.eval.endpoint.concurrency = concurrency
            c.eval.endpoint.structured_output = "llama_cpp"
            walls, raws = [], []
            for _ in range(args.runs):  # a fresh server per run: no ticket's prompt is cached from the run before
                with LlamaServer(rel, alias="student", n_ctx=2048, slots=slots, log_path=log_path) as srv:
                    predict_endpoint(c, task, rows[:2], srv.base_url, "student")  # warm-up
                    started = time.perf_counter()
                    preds = predict_endpoint(c, task, rows, srv.base_url, "student")
                    walls.append(time.perf_counter() - started)
                    raws.append(preds.raw)
                    if tokens is None:
                        tokens = tokens_per_ticket(task, rows, srv.base_url, c)
            if reference is None:
                reference = raws[0]
            same = min(sum(a == b for a, b in zip(r, reference)) for r in raws)
            med, lo, hi = summary(walls)
            best = max(best, len(rows) / med)
            results.append([f"student, llama-server, {qtype}, {slots} slot{'s' * (slots > 1)}, concurrency "
                            f"{concurrency} (answers = 1 slot: {same}/{len(rows)})", med / len(rows), lo, hi])
        params = gguf_params(rel)
        limit = peak * 1e9 / (2 * params * tokens)
        notes.append(f"{qtype} on llama-server: best {best:.2f} tickets/s; FLOP limit {limit:.1f} tickets/s "
                     f"(2 x {params / 1e6:.1f}M parameters x {tokens:.0f} prompt + completion tokens per ticket over "
                     f"the fp32 torch GEMM peak {peak:.1f} GFLOP/s), so {best / limit:.1%} of it. Load average "
                     f"before {load_before}, after {load_average()}.")


if __name__ == "__main__":
    main()
