"""The served student's scored answer: one tree decode per field, candidate by candidate with the bound, every value.

    python benchmarks/served_scoring.py --gguf publish/model/X-q8_0.gguf --tokenizer publish/model/hf
        [--recipe-dir DIR] --recipe NAME --items-from RUN/generate/data/test.jsonl [--items 16] [--runs 3]
        [--extra-values 0 50] [--threads 2] [--paths tree bounded every]

The GGUF runs in the student runtime's own llama.cpp context (``distill.serve.runtime.Scorer``, what ``distill
serve`` answers with); each request is the recipe's student prompt for one input. "tree" is the shipped path (every
allowed value of a field in one llama.cpp decode, ``LlamaTokens.trie_rows``, then the bound on those rows);
"bounded" scores candidate by candidate, one decode each, skipping those that cannot matter
(``distill.serve.scored.bounded_tail_probs``: the path before the tree decode); "every" scores every allowed value
one by one (the path before the bound). ``--extra-values N`` adds N synthetic values (``extra_value_1``, ...) to the
recipe's first enum field, so one trained student shows how the cost grows with the number of values. Per path and
value count: median ms per request over ``--runs``, candidate-by-candidate scoring calls (each runs the model) and
llama.cpp decode calls per request, how many answers equal the first path's, and the largest difference of their
confidences (llama.cpp's quantized matrix products sum in another order for a batch of many tokens than for a few,
so on a q8_0 GGUF the tree's confidences move by up to ~1e-3; on an f32 GGUF by ~1e-5). Tries over
``runtime.TRIE_MAX_NODES`` nodes take the bound's path on "tree" too.
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

PATHS = ("tree", "bounded", "every")


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
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                    help="the paths to time; the answers of each are compared to the first's")
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
    path_logprobs, logprobs, trie_seqs = model.path_logprobs, model.logprobs, model.trie_seqs

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
        for path in args.paths:
            model.path_logprobs = count(path_logprobs) if path != "every" else None
            model.logprobs = count(logprobs)
            model.trie_seqs = trie_seqs if path == "tree" else 0
            times, outs = [], []
            for _ in range(args.runs):
                counted["n"], outs, decodes = 0, [], model.decode_calls
                t0 = time.perf_counter()
                for text in texts:
                    outs.append(scorer.score(task.student_messages(text), schema, cfg.eval.max_new_tokens))
                times.append((time.perf_counter() - t0) * 1000 / len(texts))
                decodes = model.decode_calls - decodes
            answers[path] = outs
            times.sort()
            same = sum(a["answer"] == b["answer"] for a, b in zip(outs, answers[args.paths[0]]))
            gap = max((abs(a["confidence"] - b["confidence"]) for a, b in zip(outs, answers[args.paths[0]])
                       if a["confidence"] is not None and b["confidence"] is not None), default=0.0)
            rows.append({"values": len(values), "path": path,
                         "ms per request (median)": round(times[len(times) // 2], 1),
                         "range": f"{times[0]:.1f}-{times[-1]:.1f}", "runs": args.runs,
                         "scoring calls per request": round(counted["n"] / len(texts), 1),
                         "decode calls per request": round(decodes / len(texts), 1),
                         f"answers = {args.paths[0]}": f"{same}/{len(texts)}",
                         "largest confidence difference": f"{gap:.2g}"})
    model.path_logprobs, model.logprobs, model.trie_seqs = path_logprobs, logprobs, trie_seqs
    headers = list(rows[0])
    print(table(headers, [[r.get(h, "") for h in headers] for r in rows]))


if __name__ == "__main__":
    main()
