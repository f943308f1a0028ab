"""The same teacher, labelled five ways: accuracy against gold on the Bitext sample (category, 11 classes).

    python benchmarks/teacher_quality.py [--items 110] [--runtime auto] [--no-record]

Teacher: the embedded SmolLM2-135M-Instruct (llama.cpp, CPU). Options, each one `python -m distill generate` run
on the same stratified items (rejected answers count as wrong):
  zero-shot      no examples, JSON answer constrained by the schema's grammar
  fixed          one fixed example per class (11), constrained JSON answer
  nearest        the 8 nearest of 110 labelled seeds per input (MiniLM embeddings), constrained JSON answer
  vote-5         fixed examples, 5 sampled answers per input, majority kept (self-consistency)
  score          fixed examples, log-probability of each class, calibrated (mean score per class subtracted)
  score+nearest  the score method with the 8 nearest seeds
Greedy decoding and scoring are deterministic, so one run per option; vote-5 samples with fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_data as bitext  # noqa: E402
from benchmarks.common import append, table  # noqa: E402

OPTIONS = {
    "zero-shot": (0, ["teacher.method=generate", "recipe.few_shot=null"]),
    "fixed": (1, ["teacher.method=generate"]),
    "nearest": (10, ["teacher.method=generate", "generate.few_shot=nearest", "generate.few_shot_k=8"]),
    "vote-5": (1, ["teacher.method=generate", "generate.self_consistency=5"]),
    "score": (1, ["teacher.method=score"]),
    "score+nearest": (10, ["teacher.method=score", "generate.few_shot=nearest", "generate.few_shot_k=8"]),
}


def run_option(name: str, work: Path, items: int, runtime: str = "auto") -> dict:
    seeds, extra = OPTIONS[name]
    recipes = bitext.prepare(work / f"recipes-{seeds}", items, seeds)
    run_dir = work / f"run-{name}"
    cmd = [sys.executable, "-m", "distill", "generate", "recipe=cs_category", f"recipe_dir={recipes}",
           f"run_dir={run_dir}", "teacher=local", f"teacher.runtime={runtime}", "generate.limit=null",
           "generate.dedup.enabled=false", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: generate failed:\n{proc.stderr[-2000:]}")
    done = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
    rows = [json.loads(line) for s in ("train", "val", "test")
            for line in (run_dir / "generate" / "data" / f"{s}.jsonl").read_text().splitlines()]
    correct = sum(r["teacher"]["category"] == r["gold"]["category"] for r in rows)
    predicted = {r["teacher"]["category"] for r in rows}
    return {"option": name, "accuracy": correct / done["inputs"], "rejected": sum(done["rejected"].values()),
            "distinct_labels": len(predicted), "calls": done["paid_calls_this_run"], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=110)
    ap.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--runtime", default="auto", choices=["auto", "llama_server", "llama_cpp_python"],
                    help="teacher.runtime: the server the embedded teacher runs on")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        for name in args.options:
            results.append(run_option(name, Path(tmp), args.items, args.runtime))
            print(json.dumps(results[-1]), flush=True)
    rows = [[r["option"], f"{100 * r['accuracy']:.1f}%", r["rejected"], r["distinct_labels"], r["calls"],
             f"{r['wall']:.0f}"] for r in results]
    from distill.teacher.server import resolve_runtime

    text = (f"Teacher SmolLM2-135M-Instruct (Q4_1, llama.cpp, runtime {resolve_runtime(args.runtime)}), {args.items} "
            f"Bitext messages stratified over 11 categories (chance 9.1%); accuracy vs gold over all items, "
            f"rejected answers counted wrong.\n\n"
            + table(["option", "accuracy", "rejected", "distinct labels used", "teacher calls", "wall s"], rows))
    append("Teacher label quality by option (Bitext)", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
