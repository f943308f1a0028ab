"""Student quality as the teacher-labelled training set grows (Bitext, category, 11 classes).

    python benchmarks/quality_at_budget.py [--budgets 100 300 1000] [--test 150] [--no-record]

One fixed, stratified test set of ``--test`` messages; for each budget n the teacher (embedded SmolLM2-135M, the
calibrated score method, one shared ledger so a larger budget pays only for its new examples) labels n training
messages, SmolLM2-135M is LoRA-tuned for one epoch (n / 8 steps at batch 8), and evaluate scores it on the test
set: its accuracy vs gold, its agreement with the teacher, and the teacher's own accuracy vs gold as the reference.
Writes benchmarks/results/quality_at_budget.png and appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_data as bitext  # noqa: E402
from benchmarks.common import REPO, append, table  # noqa: E402

PLOT = REPO / "benchmarks" / "results" / "quality_at_budget.png"


def stage(command: str, args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distill", command, *args], capture_output=True, text=True)
    if proc.returncode not in (0, 3):  # 3: a gate failed, irrelevant here
        raise SystemExit(f"{command} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="keep the run directories here")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="distill-budget-"))
    recipes = bitext.prepare(work / "recipes", args.test + max(args.budgets), 1, n_test=args.test)
    results = []
    for n in sorted(args.budgets):
        run_dir = work / f"run-{n}"
        common = ["recipe=cs_category", f"recipe_dir={recipes}", f"run_dir={run_dir}", "teacher=local",
                  "teacher.method=score", f"generate.limit={args.test + n}", "generate.dedup.enabled=false",
                  f"generate.shared_ledger={work / 'ledger.sqlite'}", "profile=demo",
                  "student=smollm2_135m",  # the LoRA student at each budget (the demo profile climbs a ladder)
                  f"train.max_steps={max(1, math.ceil(n / args.batch))}", f"train.batch_size={args.batch}",
                  "eval.limit=null"]
        walls = {c: stage(c, common) for c in ("generate", "train", "evaluate")}
        res = json.loads((run_dir / "evaluate" / "results.json").read_text())
        m = res["metrics"]
        gen = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
        results.append({"budget": n, "train_rows": gen["splits"]["train"],
                        "student_vs_gold": m["student_vs_gold"]["exact"],
                        "agreement": m["agreement"]["exact"], "teacher_vs_gold": m["teacher_vs_gold"]["exact"],
                        "invalid": m["invalid_rate"], "new_teacher_calls": gen["paid_calls_this_run"],
                        "wall": {k: round(v) for k, v in walls.items()}})
        print(json.dumps(results[-1]), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["train_rows"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [100 * r["student_vs_gold"] for r in results], "o-", label="student accuracy vs gold")
    ax.plot(xs, [100 * r["agreement"] for r in results], "s-", label="student agreement with teacher")
    ax.plot(xs, [100 * r["teacher_vs_gold"] for r in results], "k--", label="teacher accuracy vs gold")
    ax.axhline(100 / 11, color="grey", lw=0.8, ls=":", label="chance (11 classes)")
    ax.set_xscale("log")
    ax.set_xlabel("teacher-labelled training examples")
    ax.set_ylabel("% of test messages")
    ax.set_title(f"Bitext category, SmolLM2-135M student and teacher (n_test={args.test})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = PLOT if not args.no_record else work / PLOT.name  # a trial run leaves the recorded plot alone
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)

    rows = [[r["budget"], r["train_rows"], f"{100 * r['student_vs_gold']:.1f}%", f"{100 * r['agreement']:.1f}%",
             f"{100 * r['teacher_vs_gold']:.1f}%", f"{100 * r['invalid']:.1f}%", r["new_teacher_calls"],
             "/".join(str(r["wall"][k]) for k in ("generate", "train", "evaluate"))] for r in results]
    text = (f"Fixed test set of {args.test} Bitext messages; teacher SmolLM2-135M (score method, calibrated), student "
            f"SmolLM2-135M LoRA, one epoch at batch {args.batch}. One run per budget (greedy decoding; training is "
            f"seeded).\n\n"
            + table(["budget", "train rows", "student vs gold", "agreement with teacher", "teacher vs gold",
                     "student invalid", "new teacher calls", "wall s gen/train/eval"], rows)
            + f"\n\n![quality at budget]({PLOT.relative_to(REPO).as_posix()})")
    append("Quality at a labelling budget (Bitext)", text, record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
