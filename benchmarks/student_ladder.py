"""The student ladder's cheapest rung on Bitext intents: the embedding classifier at a few examples per intent.

    python benchmarks/student_ladder.py [--per-intent 10 100] [--test-per-intent 25] [--val-per-intent 5] [--no-record]

Bitext's 27 intents (../shared/data, never copied) with the gold labels standing in for a perfect teacher. One
fixed, stratified test set (``--test-per-intent`` messages per intent) and val set (``--val-per-intent``, what the
head's C is chosen on); for each budget n, the first n remaining messages of every intent train student=embed_classifier
with its shipped settings (distill/conf/student/embed_classifier.yaml) through the package's own code (the frozen
MiniLM, distill.student.embed_classifier.fit_heads). Exact duplicate messages (case-insensitive) are dropped first,
so no test message is also a training one. Reported: accuracy vs gold with a 95% percentile bootstrap interval
(distill.metrics.stats.rate, 1,000 resamples), seconds to train (embed train + val, fit the heads) and to score the
test set (embed + heads), the rung's wall time, and $ per 1,000 requests at eval.cost.student_usd_per_hour over the
measured scoring throughput. The LM rungs are not measured here (yet).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_data as bitext  # noqa: E402
from benchmarks.common import append, table  # noqa: E402


def load_intents(path: Path = bitext.DATA) -> dict[str, list[str]]:
    """Bitext messages by intent, exact duplicates (case-insensitive) dropped."""
    if not path.exists():
        raise SystemExit(f"the Bitext sample is not at {path}; it is read from ../shared/data (see SOURCE.md there) "
                         f"or from the file named by DISTILL_BITEXT_CSV")
    seen, by_intent = set(), defaultdict(list)
    with path.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            text = r["instruction"].strip()
            if text and text.lower() not in seen:
                seen.add(text.lower())
                by_intent[r["intent"]].append(text)
    return dict(by_intent)


def splits(by_intent: dict[str, list[str]], n_test: int, n_val: int, seed: int) -> tuple[list, list, dict]:
    """(test, val, training pool by intent): test and val stratified and fixed, the pool in a seeded order."""
    rng = random.Random(seed)
    test, val, pool = [], [], {}
    for intent in sorted(by_intent):
        texts = list(by_intent[intent])
        rng.shuffle(texts)
        test += [(t, intent) for t in texts[:n_test]]
        val += [(t, intent) for t in texts[n_test:n_test + n_val]]
        pool[intent] = texts[n_test + n_val:]
    return test, val, pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-intent", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--test-per-intent", type=int, default=25)
    ap.add_argument("--val-per-intent", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    from distill.config import load_config
    from distill.metrics.stats import rate
    from distill.student.embed_classifier import EmbedClassifier, encoder_folder, fit_heads

    cfg = load_config(["student=embed_classifier", "run_dir=/tmp/distill-ladder-unused"])
    scfg, hourly = cfg.student, cfg.eval.cost.student_usd_per_hour
    by_intent = load_intents()
    test, val, pool = splits(by_intent, args.test_per_intent, args.val_per_intent, args.seed)
    short = [i for i, texts in pool.items() if len(texts) < max(args.per_intent)]
    if short:
        raise SystemExit(f"intents with fewer than {max(args.per_intent)} training messages left: {short}")
    intents = sorted(by_intent)
    enums = {"intent": intents}

    rows, notes = [], []
    for n in args.per_intent:
        started = time.perf_counter()
        clf = EmbedClassifier(encoder_folder(scfg), {}, {"encoder": {"max_seq_len": scfg.max_seq_len}})
        train = [(t, i) for i in intents for t in pool[i][:n]]
        t0 = time.perf_counter()
        x = clf.embed([t for t, _ in train], scfg.head.batch_size)
        x_val = clf.embed([t for t, _ in val], scfg.head.batch_size)
        clf.heads, report = fit_heads(x, [{"intent": i} for _, i in train], x_val, [{"intent": i} for _, i in val],
                                      enums, scfg.head)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = [a for a, _, _ in clf.predict([t for t, _ in test], scfg.head.batch_size)]
        score_s = time.perf_counter() - t0
        wall_s = time.perf_counter() - started
        acc = rate([a["intent"] == i for a, (_, i) in zip(answers, test)], resamples=1000, level=0.95, seed=args.seed)
        usd_per_1k = hourly / 3600 * score_s / len(test) * 1000
        rows.append([n, len(train), f"{100 * acc['value']:.1f}% [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]",
                     report["intent"]["C"], f"{train_s:.1f}", f"{score_s:.1f}", f"{train_s + score_s:.1f}",
                     f"{wall_s:.1f}", f"{usd_per_1k:.6f}"])
        notes.append(f"n={n}: val accuracy by C {report['intent']['tried']}, converged {report['intent']['converged']}")

    headers = ["examples per intent", "train examples", "accuracy vs gold [95% CI]", "C (val)", "train s",
               "score s", "train+score s", "wall s", "$ per 1k requests"]
    text = "\n".join([textwrap.fill(
        f"student=embed_classifier (frozen all-MiniLM-L6-v2 + LogisticRegression, class_weight "
        f"{scfg.head.class_weight}, C from {scfg.head.c_grid} on val) on Bitext's {len(intents)} intents, gold labels "
        f"as a perfect teacher; test {len(test)} messages ({args.test_per_intent} per intent), val {len(val)} "
        f"({args.val_per_intent} per intent), seed {args.seed}, torch threads {torch.get_num_threads()}. train s = "
        f"embed train + val and fit; score s = embed + heads on the test set; wall s adds loading the encoder; $ per "
        f"1k at ${hourly}/h over the measured scoring rate. Chance: {100 / len(intents):.1f}%.", width=116), "",
        table(headers, rows), "", *[f"- {note}" for note in notes]])
    print(text)
    append("Student ladder: the embedding classifier on Bitext intents", text, record=not args.no_record)


if __name__ == "__main__":
    main()
