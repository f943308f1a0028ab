"""Student inference on CPU against the teacher's time per ticket: the speed-up the routing rule buys.

    python benchmarks/inference.py --run-dir runs/X [--items 40] [--runs 3] [--no-record]

Needs a finished run directory (generate, train, evaluate, publish). On the test split, median of ``--runs``:
  - the in-process student in transformers, free generation and scored decoding (eval.decode), batch 8;
  - every published GGUF served by llama.cpp's server, one request at a time (as a gateway sends them);
  - the teacher's own time per ticket from the ledger (its long few-shot prompt, as labelled in generate).
Tickets/s, mean latency per ticket; ratio = teacher seconds per ticket / student seconds per ticket.
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
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from distill import paths
    from distill.config import load_config
    from distill.student import ladder
    from distill.student.endpoint import predict_endpoint
    from distill.student.models import load_student
    from distill.student.predict import predict_in_process
    from distill.task import Task, load_split
    from distill.teacher.server import LlamaCppServer

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

    table_rows = [[name, f"{1 / per:.2f}", f"{per * 1000:.0f}", f"{lo / len(rows):.3f}-{hi / len(rows):.3f}",
                   f"{per_ticket_teacher / per:.1f}x"] for name, per, lo, hi in results]
    table_rows.append([f"teacher {gen['teacher']['model']} ({gen['method']}, from the ledger)",
                       f"{1 / per_ticket_teacher:.2f}", f"{per_ticket_teacher * 1000:.0f}", "-", "1.0x"])
    text = (f"{len(rows)} test tickets of `{run_dir.name}` (recipe {cfg.recipe.name}), median of {args.runs} runs; "
            f"s/ticket min-max over runs.\n\n"
            + table(["predictor", "tickets/s", "ms/ticket", "s/ticket min-max", "speed-up vs teacher"], table_rows))
    append("Student inference on CPU", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
