"""Wall time per stage for a whole run, and the cost of running it again.

    python benchmarks/end_to_end.py [--profile smoke] [--runs 3] [--no-record]

Each run is `python -m distill run recipe=support_tickets profile=<profile>` in a fresh run directory (the embedded
llama.cpp teacher and SmolLM2 student, CPU), then the same command again on that directory: a re-run must skip every
stage and pay for nothing. Per-stage times come from each stage's DONE.json; medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, summary, table  # noqa: E402

STAGES = ("generate", "train", "evaluate", "publish")


def one_run(profile: str, run_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "distill", "run", "recipe=support_tickets", f"profile={profile}", f"run_dir={run_dir}",
           *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stages = {}
    for s in STAGES:
        done = run_dir / s / "DONE.json"
        stages[s] = json.loads(done.read_text())["summary"].get("wall_s") if done.exists() else None
    paid_before = _ledger_calls(run_dir)
    started = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True)
    rerun = time.perf_counter() - started
    if again.returncode not in (0, 3):
        raise SystemExit(f"re-run failed ({again.returncode}):\n{again.stderr[-3000:]}")
    gen = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
    skipped = again.stderr.count("skipped: finished earlier")
    return {"total": total, "stages": stages, "rerun": rerun, "rerun_skipped": skipped,
            "rerun_paid": _ledger_calls(run_dir) - paid_before, "teacher_calls": gen["paid_calls_this_run"],
            "exit": proc.returncode}


def _ledger_calls(run_dir: Path) -> int:
    """Rows in the ledger's calls table: every teacher answer ever paid for in this run directory."""
    with sqlite3.connect(run_dir / "generate" / "ledger.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("extra", nargs="*", help="more overrides (key=value) for every run")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="distill-e2e-") as tmp:
            runs.append(one_run(args.profile, Path(tmp) / "run", args.extra))
        print(json.dumps(runs[-1]), flush=True)
    rows = []
    for s in STAGES:
        vals = [r["stages"][s] for r in runs if r["stages"][s] is not None]
        if vals:
            med, lo, hi = summary(vals)
            rows.append([s, f"{med:.1f}", f"{lo:.1f}-{hi:.1f}"])
    med, lo, hi = summary([r["total"] for r in runs])
    rows.append(["whole command", f"{med:.1f}", f"{lo:.1f}-{hi:.1f}"])
    med, lo, hi = summary([r["rerun"] for r in runs])
    rows.append([f"re-run in the same directory (stages skipped: {runs[0]['rerun_skipped']} of 4, teacher calls paid: "
                 f"{max(r['rerun_paid'] for r in runs)})", f"{med:.1f}", f"{lo:.1f}-{hi:.1f}"])
    text = (f"`profile={args.profile}`, recipe support_tickets, embedded teacher and student; median of {args.runs} "
            f"runs, each in a fresh run directory ({runs[0]['teacher_calls']} teacher calls per run)"
            + (f", overrides {' '.join(args.extra)}" if args.extra else "") + ".\n\n"
            + table(["stage", "wall s (median)", "min-max"], rows))
    append(f"End to end: profile {args.profile}", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
