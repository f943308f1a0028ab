"""The same teacher, labelled six ways: accuracy against gold on the Bitext sample (category, 11 classes).

    python benchmarks/teacher_quality.py [--items 110] [--options ...] [--runtime auto] [--work DIR] [--no-record]

Teacher: the embedded SmolLM2-135M-Instruct (llama.cpp, CPU). Options, each one `python -m distill generate` run
on the same stratified items (rejected answers count as wrong):
  zero-shot      no examples, JSON answer constrained by the schema's grammar
  fixed          one fixed example per class (11), constrained JSON answer
  nearest        the 8 nearest of 110 labelled seeds per input (MiniLM embeddings), constrained JSON answer
  vote-5         fixed examples, 5 sampled answers per input, majority kept (self-consistency)
  score          fixed examples, log-probability of each class, calibrated (mean score per class subtracted)
  score+nearest  the score method with the 8 nearest seeds
  score-raw      (diagnostic, not run by default) the score method's answers without calibration: the same requests
                 as score, so after score it costs no call (every option shares one ledger)
Greedy decoding and scoring are deterministic, so one run per option; vote-5 samples with fixed seeds. Accuracy is
given with its 95% bootstrap interval over the items. For the score options the table below the main one reads the
teacher's stored top log-probs back from the ledger: how often the gold value had a candidate token among them, how
often the top token began no allowed value, and the accuracy of the uncalibrated ranking.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "score-raw": (1, ["teacher.method=score", "teacher.calibrate=false"]),
}
DEFAULT_OPTIONS = [name for name in OPTIONS if name != "score-raw"]
FIELD = "category"


def run_option(name: str, work: Path, items: int, runtime: str = "auto") -> dict:
    from distill.metrics.stats import rate

    seeds, extra = OPTIONS[name]
    recipes = bitext.prepare(work / f"recipes-{seeds}", items, seeds)
    run_dir = work / f"run-{name}"
    cmd = [sys.executable, "-m", "distill", "generate", "recipe=cs_category", f"recipe_dir={recipes}",
           f"run_dir={run_dir}", "teacher=local", f"teacher.runtime={runtime}", "generate.limit=null",
           "generate.dedup.enabled=false", f"generate.shared_ledger={work / 'ledger.sqlite'}", *extra]
    started, since = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: generate failed:\n{proc.stderr[-2000:]}")
    done = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
    rows = _rows(run_dir)
    by_id = {r["id"]: r for r in rows}
    gold = {json.loads(line)["id"]: json.loads(line)["gold"][FIELD]
            for line in (recipes / "cs_category" / "inputs.jsonl").read_text().splitlines()}
    flags = [by_id[i]["teacher"][FIELD] == g if i in by_id else False for i, g in gold.items()]  # rejected: wrong
    accuracy = rate(flags)
    calls = done["paid_calls_this_run"]
    return {"option": name, "accuracy": accuracy["value"], "low": accuracy["low"], "high": accuracy["high"],
            "n": len(flags), "rejected": sum(done["rejected"].values()),
            "distinct_labels": len({r["teacher"][FIELD] for r in rows}), "calls": calls, "wall": wall,
            "s_per_call": _latency(work / "ledger.sqlite", since) / calls if calls else None, "run_dir": str(run_dir)}


def _latency(ledger_file: Path, since: float) -> float:
    """Seconds the teacher took over the calls recorded since ``since`` (the ledger's per-call latency)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(ledger_file)) as db:
        return db.execute("SELECT COALESCE(SUM(latency_s), 0) FROM calls WHERE created_at >= ?", (since,)).fetchone()[0]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for s in ("train", "val", "test")
            for line in (run_dir / "generate" / "data" / f"{s}.jsonl").read_text().splitlines()]


def diagnose(run_dir: Path, ledger_file: Path, values: list[str]) -> dict:
    """What the score method's stored top log-probs say, read back from the ledger (no new call)."""
    import numpy as np

    from distill.ledger import Ledger
    from distill.teacher.scoring import calibrate, value_scores

    rows = _rows(run_dir)
    with Ledger.read_only(ledger_file) as ledger:
        tops = [json.loads(ledger.get(r["provenance"]["request_key"])["response"]) for r in rows]
    gold = [r["gold"][FIELD] for r in rows]
    matrix = np.array([value_scores(top, values) for top in tops])
    floor = np.array([min(lp for _, lp in top) - 1.0 for top in tops])
    in_top = [matrix[k, values.index(g)] > floor[k] for k, g in enumerate(gold)]
    top_is_value = [any(s == max(lp for _, lp in top) for s in matrix[k]) for k, top in enumerate(tops)]
    raw = matrix.argmax(axis=1)
    cal, _ = calibrate(matrix, True)
    share = lambda flags: sum(map(bool, flags)) / len(flags)  # noqa: E731
    return {"n": len(rows), "gold_in_top": share(in_top), "top_token_not_a_value": 1 - share(top_is_value),
            "raw_accuracy": share([values[i] == g for i, g in zip(raw, gold)]),
            "calibrated_accuracy": share([values[i] == g for i, g in zip(cal, gold)]),
            "values_in_top": float(np.mean((matrix > floor[:, None]).sum(axis=1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=110)
    ap.add_argument("--options", nargs="*", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    ap.add_argument("--runtime", default="auto", choices=["auto", "llama_server", "llama_cpp_python"],
                    help="teacher.runtime: the server the embedded teacher runs on")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the runs and their shared ledger here (default: a temporary folder, removed)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from distill.metrics.stats import format_interval
    from distill.teacher.server import resolve_runtime

    results, diagnostics = [], []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        values = _enum_values()
        for name in args.options:
            results.append(run_option(name, work, args.items, args.runtime))
            print(json.dumps(results[-1]), flush=True)
            if name.startswith("score"):
                diagnostics.append({"option": name, **diagnose(Path(results[-1]["run_dir"]), work / "ledger.sqlite",
                                                               values)})
                print(json.dumps(diagnostics[-1]), flush=True)
    rows = [[r["option"], format_interval({"value": r["accuracy"], "low": r["low"], "high": r["high"]}),
             r["rejected"], r["distinct_labels"], r["calls"], f"{r['wall']:.0f}",
             "n/a" if r["s_per_call"] is None else f"{r['s_per_call']:.2f}"] for r in results]
    text = (f"Teacher SmolLM2-135M-Instruct (Q4_1, llama.cpp, runtime {resolve_runtime(args.runtime)}), {args.items} "
            f"Bitext messages stratified over 11 categories (chance 9.1%); accuracy vs gold over all items with its "
            f"95% bootstrap interval, rejected answers counted wrong; wall s is the whole generate command (server "
            f"start and model loads included), s/call the teacher's own latency per call (the ledger's).\n\n"
            + table(["option", "accuracy", "rejected", "distinct labels used", "teacher calls", "wall s", "s/call"],
                    rows))
    if diagnostics:
        text += ("\n\nThe score options' stored top-20 log-probs (read back from the ledger): the share of items whose "
                 "gold value has a token among them, the mean number of the 11 values that do, the share whose top "
                 "token begins no allowed value, and the accuracy of the ranking without and with calibration.\n\n"
                 + table(["option", "gold value in top-20", "values in top-20", "top token not a value",
                          "uncalibrated", "calibrated"],
                         [[d["option"], f"{100 * d['gold_in_top']:.1f}%", f"{d['values_in_top']:.1f}",
                           f"{100 * d['top_token_not_a_value']:.1f}%", f"{100 * d['raw_accuracy']:.1f}%",
                           f"{100 * d['calibrated_accuracy']:.1f}%"] for d in diagnostics]))
    append("Teacher label quality by option (Bitext)", text, record=not args.no_record)
    print(text)


def _enum_values() -> list[str]:
    import yaml

    recipe = yaml.safe_load((bitext.RECIPES / "cs_category.yaml").read_text())
    return list(recipe["output_schema"]["properties"][FIELD]["enum"])


if __name__ == "__main__":
    main()
