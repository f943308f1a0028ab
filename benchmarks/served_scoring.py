"""The served student's scored answer with and without the candidate bound: ms per request and candidates scored.

    python benchmarks/served_scoring.py --gguf publish/model/X-q8_0.gguf --tokenizer publish/model/hf
        [--recipe-dir DIR] --recipe NAME --items-from RUN/generate/data/test.jsonl [--items 16] [--runs 3]
        [--extra-values 0 50] [--threads 2]

The GGUF runs in the student runtime's own llama.cpp context (``distill.serve.runtime.Scorer``, what ``distill
serve`` answers with); each request is the recipe's student prompt for one input. "bounded" is the shipped path
(``distill.serve.scored.bounded_tail_probs``: candidates that cannot matter are never scored); "every" scores every
allowed value (the runtime with its ``path_logprobs`` hidden, the path before the bound). ``--extra-values N`` adds
N synthetic values (``extra_value_1``, ...) to the recipe's first enum field, so one trained student shows how the
cost grows with the number of values. Per path and value count: median ms per request over ``--runs``, candidates
scored per request, and whether both paths gave the same answers and confidences (within 1e-4 relative).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--recipe-dir", type=Path, default=None, help="a folder of your own recipes (default: built in)")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--items-from", type=Path, required=True, help="a JSONL file with an 'input' per line")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--extra-values", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from distill.config import load_config
    from distill.serve import runtime
    from distill.task import Task

    own = [f"recipe_dir={args.recipe_dir}"] if args.recipe_dir else []
    cfg = load_config(own + [f"recipe={args.recipe}", f"run_dir={tempfile.mkdtemp()}"])
    task = Task(cfg)
    texts = [json.loads(line)["input"] for line in args.items_from.read_text().splitlines() if line.strip()]
    texts = texts[: args.items]
    scorer = runtime.Scorer(args.gguf, args.tokenizer, n_threads=args.threads)
    model = scorer.model
    counted = {"n": 0}
    path_logprobs, logprobs = model.path_logprobs, model.logprobs

    def count(fn):
        def wrapped(*a, **k):
            counted["n"] += 1
            return fn(*a, **k)
        return wrapped

    rows = []
    field = next(iter(task.schema.enums))
    for extra in args.extra_values:
        schema = copy.deepcopy(task.schema.schema)
        values = list(schema["properties"][field]["enum"]) + [f"extra_value_{j + 1}" for j in range(extra)]
        schema["properties"][field]["enum"] = values
        answers = {}
        for path in ("bounded", "every"):
            model.path_logprobs = count(path_logprobs) if path == "bounded" else None
            model.logprobs = count(logprobs)
            times, outs = [], []
            for _ in range(args.runs):
                counted["n"], outs = 0, []
                t0 = time.perf_counter()
                for text in texts:
                    outs.append(scorer.score(task.student_messages(text), schema, cfg.eval.max_new_tokens))
                times.append((time.perf_counter() - t0) * 1000 / len(texts))
            answers[path] = outs
            times.sort()
            rows.append({"values": len(values), "path": path,
                         "ms per request (median)": round(times[len(times) // 2], 1),
                         "range": f"{times[0]:.1f}-{times[-1]:.1f}", "runs": args.runs,
                         "scoring calls per request": round(counted["n"] / len(texts), 1), "same answers": ""})
        same = all(a["answer"] == b["answer"] and (a["confidence"] is None) == (b["confidence"] is None)
                   and (a["confidence"] is None or abs(a["confidence"] - b["confidence"]) <= 1e-4 * b["confidence"])
                   for a, b in zip(answers["bounded"], answers["every"]))
        rows[-2]["same answers"] = rows[-1]["same answers"] = "yes" if same else "NO"
    model.path_logprobs, model.logprobs = path_logprobs, logprobs
    headers = list(rows[0])
    print(table(headers, [[r.get(h, "") for h in headers] for r in rows]))


if __name__ == "__main__":
    main()
