"""Scored decoding's cost per item against the number of allowed values of one enum field, old path against new.

    python benchmarks/scored_decoding.py [--students tiny_random smollm2_135m] [--values 4 8 32 77 150]
                                         [--items 8] [--runs 3] [--old-runs 3] [--threads N] [--no-record]

One batch of ``--items`` support tickets (the support_tickets recipe's student prompt, rendered with the student's
chat template) is decoded by ``distill.student.scored.scored_batch`` for an answer schema with a single enum field of k
synthetic intent names that share prefixes (``card_arrival``, ``card_fee``, ...; the k-value set is the first k of
one fixed shuffle, so the sets are nested). The prompt stays the same for every k: only the number of candidates
changes. Per-item time = the batch's wall time / items, median of ``--runs``:
  - new: the shipped path (the shared head run once per item, then one token trie of the candidates per item);
  - old: the per-candidate reference kept in the same module (``_tail_probs_per_candidate``: every candidate's head+tail
    on its own copy of the prompt cache), patched in for the measurement only.
The students are base models (no adapter): cost does not depend on the weights. smollm2_135m is the embedded GGUF,
dequantized once and cached by distill.student.models. Prints the table last and appends it to BENCHMARKS.md
(``--no-record`` to skip). ``--threads 1`` keeps torch off a core that something else is busy on (with both
cores shared, every op waits for the scheduler and the timings are noise).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, summary, table  # noqa: E402

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
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from distill.config import load_config
    from distill.student import scored
    from distill.student.models import load_base
    from distill.student.template import end_of_turn, render_prompt
    from distill.task import OutputSchema, Task

    new_path = scored._tail_probs
    rows, ratios = [], []
    for student in args.students:
        cfg = load_config(["recipe=support_tickets", f"student={student}", f"run_dir={tempfile.mkdtemp()}"])
        started = time.perf_counter()
        model, tokenizer = load_base(cfg)
        model.eval()
        print(f"{student}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
        tokenizer.padding_side = "left"
        task = Task(cfg)
        eot = end_of_turn(tokenizer)
        tickets = (TICKETS * (args.items // len(TICKETS) + 1))[:args.items]
        prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in tickets]
        per_item: dict[tuple[str, int], float] = {}
        for k in args.values:
            schema = OutputSchema({"type": "object", "properties": {"intent": {"enum": intent_values(k)}},
                                   "required": ["intent"]})
            answers = {}
            for name, path, runs in (("new", new_path, args.runs), ("old", scored._tail_probs_per_candidate,
                                                                    args.old_runs)):
                if runs <= 0:
                    continue
                scored._tail_probs = path
                try:
                    scored.scored_batch(model, tokenizer, prompts[:1], schema, eot, 8)  # warm-up
                    walls = []
                    for _ in range(runs):
                        t0 = time.perf_counter()
                        out = scored.scored_batch(model, tokenizer, prompts, schema, eot, 8)
                        walls.append(time.perf_counter() - t0)
                finally:
                    scored._tail_probs = new_path
                answers[name] = [(a, c) for a, _, _, c, _ in out]
                med, lo, hi = summary(walls)
                per_item[(name, k)] = med / len(prompts)
                rows.append([student, k, name, f"{med / len(prompts) * 1000:.1f}",
                             f"{lo / len(prompts) * 1000:.1f}-{hi / len(prompts) * 1000:.1f}", runs])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            if len(answers) == 2:  # the same answers and confidences either way
                same = all(a == b and abs(x - y) <= 1e-4 for (a, x), (b, y) in zip(answers["new"], answers["old"]))
                rows[-1].append("same answers" if same else "ANSWERS DIFFER")
        for name in ("new", "old"):
            if (name, 8) in per_item and (name, 77) in per_item:
                ratios.append([student, name, f"{per_item[(name, 77)] / per_item[(name, 8)]:.2f}x",
                               "<= 2x" if per_item[(name, 77)] <= 2 * per_item[(name, 8)] else "> 2x"])
        del model
    text = table(["student", "values", "path", "ms per item (median)", "range", "runs", "check"],
                 [r + [""] * (7 - len(r)) for r in rows])
    text += "\n\n" + table(["student", "path", "77 values / 8 values", "target"], ratios)
    print(text)
    append("Scored decoding against the number of values", text, record=not args.no_record)


if __name__ == "__main__":
    main()
