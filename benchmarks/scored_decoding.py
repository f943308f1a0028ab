"""Scored decoding's cost per item against the number of allowed values of one enum field: the pruned trie (shipped)
against the full trie and the old per-candidate path.

    python benchmarks/scored_decoding.py [--students tiny_random smollm2_135m] [--values 4 8 32 77 150]
                                         [--items 8] [--runs 3] [--old-runs 3] [--threads N] [--no-record]
    python benchmarks/scored_decoding.py --adapter RUN/train/checkpoints/checkpoint-N --recipe-dir DIR
                                         --recipe intents --items-from RUN/generate/data/test.jsonl
                                         [--values 4 8 27 77 150] [--gold-intents 4]

One batch of ``--items`` support tickets (the support_tickets recipe's student prompt, rendered with the student's
chat template) is decoded by ``distill.student.scored.scored_batch`` for an answer schema with a single enum field of k
synthetic intent names that share prefixes (``card_arrival``, ``card_fee``, ...; the k-value set is the first k of
one fixed shuffle, so the sets are nested). The prompt stays the same for every k: only the number of candidates
changes. Per-item time = the batch's wall time / items, median of ``--runs``:
  - pruned: the shipped path (the shared head run once per item, then each item's token trie of the candidates,
    branches that cannot matter skipped: distill.student.trie.pruned_trie_logprob);
  - full: every trie node forwarded in one pass (distill.student.trie.trie_logprob), patched in for the measurement;
  - old: the per-candidate reference kept in distill.student.scored (``_tail_probs_per_candidate``: every candidate's
    head+tail on its own copy of the prompt cache), patched in for the measurement only.
"nodes" = trie rows forwarded per item (the old path: tokens per item). Without ``--adapter`` the students are base
models: the full trie's cost does not depend on the weights, but pruning does (flat scores prune nothing).
smollm2_135m is the embedded GGUF, dequantized once and cached by distill.student.models.

With ``--adapter`` (a trained LoRA checkpoint of smollm2_135m) the field is the recipe's own enum field and the
items come from ``--items-from`` (JSONL rows with ``input`` and ``gold``): ``--items`` rows, drawn (seed 0) evenly from
``--gold-intents`` gold values, so that every value set contains every item's gold value. The k-value sets are nested:
the gold values, then the recipe's other values (one fixed shuffle), then synthetic names past the recipe's own
(``--values`` above the recipe's size are real values plus synthetic distractors the student never saw).

Prints the table last and appends it to BENCHMARKS.md (``--no-record`` to skip). ``--threads 1`` keeps torch off a
core that something else is busy on (with both cores shared, every op waits for the scheduler and the timings are
noise).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, summary, table  # noqa: E402
from distill.task import OutputSchema  # noqa: E402

TICKETS = ["I was charged twice this month", "the app crashes when I open settings, please help asap",
           "where is my parcel", "how do I change the email on my account?", "my card was declined at the shop",
           "can I get a refund for last week's order", "the invoice shows the wrong address",
           "password reset link never arrives"]
STEMS = ["card", "card_arrival", "card_payment", "cash_withdrawal", "account", "top_up", "transfer", "exchange_rate",
         "pin", "refund", "beneficiary", "direct_debit", "virtual_card", "contactless", "atm", "balance", "fiat",
         "identity", "passcode", "wrong_amount", "apple_pay", "country", "disposable_card", "statement", "order"]
ENDINGS = ["fee", "failed", "pending", "limit", "not_working", "request", "charged", "declined"]


def intent_values(k: int) -> list[str]:
    """The first k of one fixed shuffle of stem_ending names (nested sets, shared prefixes)."""
    names = [f"{s}_{e}" for s in STEMS for e in ENDINGS]
    random.Random(0).shuffle(names)
    if k > len(names):
        raise SystemExit(f"--values {k}: at most {len(names)} synthetic values")
    return names[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", default=["tiny_random", "smollm2_135m"])
    ap.add_argument("--values", nargs="+", type=int, default=[4, 8, 32, 77, 150])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old-runs", type=int, default=3, help="runs of the old path (slow on a real student)")
    ap.add_argument("--full-runs", type=int, default=None, help="runs of the full trie (default --runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--adapter", type=Path, default=None, help="a trained LoRA checkpoint of smollm2_135m")
    ap.add_argument("--recipe-dir", type=Path, default=None, help="with --adapter: the recipe folder")
    ap.add_argument("--recipe", default=None, help="with --adapter: the recipe name (its first enum field)")
    ap.add_argument("--items-from", type=Path, default=None, help="with --adapter: JSONL rows with input and gold")
    ap.add_argument("--gold-intents", type=int, default=4, help="with --adapter: distinct gold values of the items")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.adapter and not (args.recipe_dir and args.recipe and args.items_from):
        raise SystemExit("--adapter needs --recipe-dir, --recipe and --items-from (the recipe it was trained on)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from distill.student import scored, trie

    cases = [_trained_case(args)] if args.adapter else [_base_case(s, args) for s in args.students]
    paths = (("pruned", trie.pruned_trie_logprob, scored._tail_probs, args.runs),
             ("full", trie.trie_logprob, scored._tail_probs,
              args.runs if args.full_runs is None else args.full_runs),
             ("old", None, scored._tail_probs_per_candidate, args.old_runs))
    rows, ratios = [], []
    for label, model, tokenizer, prompts, eot, field, field_values, golds in cases:
        per_item: dict[tuple[str, int], float] = {}
        for k in args.values:
            values = field_values(k)
            schema = OutputSchema({"type": "object", "properties": {field: {"enum": values}}, "required": [field]})
            answers = {}
            for name, trie_fn, tail_fn, runs in paths:
                if runs <= 0:
                    continue
                with patched(scored, trie_fn, tail_fn):
                    scored.scored_batch(model, tokenizer, prompts[:1], schema, eot, 8)  # warm-up
                    trie.counts.clear()
                    walls = []
                    for _ in range(runs):
                        t0 = time.perf_counter()
                        out = scored.scored_batch(model, tokenizer, prompts, schema, eot, 8)
                        walls.append(time.perf_counter() - t0)
                answers[name] = [(a, c) for a, _, _, c, _ in out]
                nodes = trie.counts["nodes"] / runs / len(prompts) if trie_fn else _old_tokens(
                    tokenizer, [scored.answer_head({}, field)], values, eot)
                med, lo, hi = summary(walls)
                per_item[(name, k)] = med / len(prompts)
                right = "" if golds is None else sum(a is not None and a[field] == g
                                                     for (a, _), g in zip(answers[name], golds))
                check = "" if name == "pruned" else ("same answers" if _same(answers[name], answers["pruned"])
                                                     else "ANSWERS DIFFER")
                rows.append([label, k, name, f"{med / len(prompts) * 1000:.1f}",
                             f"{lo / len(prompts) * 1000:.1f}-{hi / len(prompts) * 1000:.1f}", runs,
                             f"{nodes:.0f}", right, check])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
        for name, *_ in paths:
            for small, big in ((8, 77), (8, 27)):
                if (name, small) in per_item and (name, big) in per_item:
                    r = per_item[(name, big)] / per_item[(name, small)]
                    ratios.append([label, name, f"{big} / {small}", f"{r:.2f}x", "<= 2x" if r <= 2 else "> 2x"])
        del model
    text = table(["student", "values", "path", "ms per item (median)", "range", "runs", "nodes per item",
                  "right (of items)", "check vs pruned"], rows)
    text += "\n\n" + table(["student", "path", "values", "per-item time ratio", "target"], ratios)
    print(text)
    append("Scored decoding against the number of values", text, record=not args.no_record)


@contextlib.contextmanager
def patched(scored, trie_fn, tail_fn):
    """``scored`` with its trie scorer and tail scorer swapped for one measurement."""
    saved = scored._trie_scores, scored._tail_probs
    scored._trie_scores, scored._tail_probs = trie_fn or saved[0], tail_fn
    try:
        yield
    finally:
        scored._trie_scores, scored._tail_probs = saved


def _same(a: list, b: list) -> bool:
    """The same answers, and confidences within 1e-4 relative."""
    return all(x == y and (cx is None) == (cy is None) and (cx is None or abs(cx - cy) <= 1e-4 * max(cx, cy))
               for (x, cx), (y, cy) in zip(a, b))


def _old_tokens(tokenizer, heads: list[str], values: list, eot: str) -> float:
    """Tokens the old path runs per item: every candidate's head + tail."""
    import json

    texts = [h + json.dumps(v) + "}" + eot for h in heads for v in values]
    return sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]) / len(heads)


def _base_case(student: str, args):
    """(label, model, tokenizer, prompts, eot, field, k -> values, golds) of a base student on the synthetic names."""
    from distill.config import load_config
    from distill.student.models import load_base

    cfg = load_config(["recipe=support_tickets", f"student={student}", f"run_dir={tempfile.mkdtemp()}"])
    started = time.perf_counter()
    model, tokenizer = load_base(cfg)
    model.eval()
    print(f"{student}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
    tickets = (TICKETS * (args.items // len(TICKETS) + 1))[:args.items]
    return (student, model, tokenizer, *_prompts(cfg, tokenizer, tickets), "intent", intent_values, None)


def _trained_case(args):
    """The same for a trained adapter on its recipe's own field, items from ``--items-from`` (module docstring)."""
    import json

    from distill.config import load_config
    from distill.student.models import load_student

    cfg = load_config([f"recipe_dir={args.recipe_dir}", f"recipe={args.recipe}", "student=smollm2_135m",
                       f"run_dir={tempfile.mkdtemp()}"])
    from distill.task import Task

    schema = Task(cfg).schema
    if not schema.enums:
        raise SystemExit(f"--recipe {args.recipe}: its output schema has no enum field to score")
    field, real = next(iter(schema.enums.items()))
    rows = [json.loads(line) for line in args.items_from.read_text().splitlines() if line.strip()]
    by_gold: dict = {}
    for row in rows:
        by_gold.setdefault(row["gold"][field], []).append(row["input"])
    rng = random.Random(0)
    golds = rng.sample(sorted(by_gold), args.gold_intents)
    picked = [(text, g) for g in golds for text in rng.sample(by_gold[g], args.items // args.gold_intents)]
    others = [v for v in real if v not in golds]
    rng.shuffle(others)
    synthetic = [v for v in intent_values(len(STEMS) * len(ENDINGS)) if v not in real]

    def values(k: int) -> list:
        pool = golds + others + synthetic
        if k > len(pool):
            raise SystemExit(f"--values {k}: at most {len(pool)} values")
        return pool[:k]

    started = time.perf_counter()
    model, tokenizer = load_student(cfg, args.adapter)
    print(f"{args.adapter.name}: loaded in {time.perf_counter() - started:.1f} s; field {field!r}, "
          f"{len(real)} real values, gold values {golds}", flush=True)
    return (f"smollm2_135m + adapter ({len(real)} real values)", model, tokenizer,
            *_prompts(cfg, tokenizer, [t for t, _ in picked]), field, values, [g for _, g in picked])


def _prompts(cfg, tokenizer, texts: list[str]) -> tuple[list[str], str]:
    from distill.student.template import end_of_turn, render_prompt
    from distill.task import Task

    tokenizer.padding_side = "left"
    task = Task(cfg)
    return [render_prompt(tokenizer, task.student_messages(t)) for t in texts], end_of_turn(tokenizer)


if __name__ == "__main__":
    main()
