"""The student ladder's rungs on Bitext intents: the embedding classifier and the LoRA LM at a few examples per intent.

    python benchmarks/student_ladder.py [--rungs embed lm] [--per-intent 10 100] [--test-per-intent 25]
                                        [--val-per-intent 5] [--targets hard soft] [--no-record]

Bitext's 27 intents (../shared/data, never copied) with the gold labels standing in for a perfect teacher. One
fixed, stratified test set (``--test-per-intent`` messages per intent) and val set (``--val-per-intent``, what the
head's C is chosen on); for each budget n, the first n remaining messages of every intent train student=embed_classifier
with its shipped settings (distill/conf/student/embed_classifier.yaml) through the package's own code (the frozen
MiniLM, distill.student.embed_classifier.fit_heads). Exact duplicate messages (case-insensitive) are dropped first,
so no test message is also a training one. Reported: accuracy vs gold with a 95% percentile bootstrap interval
(distill.metrics.stats.rate, 1,000 resamples), seconds to train (embed train + val, fit the heads) and to score the
test set (embed + heads), the rung's wall time, and $ per 1,000 requests at eval.cost.student_usd_per_hour over the
measured scoring throughput.

``--rungs lm``: student=smollm2_135m trained by the train stage itself (distill.stages.train.run) on the same
split with its shipped defaults (distill/conf/train/lora.yaml: train.epochs, early stopping on the val agreement
with the teacher, balanced batches when skewed) in a temporary run directory, then scored on the test set by scored
decoding (evaluate's decoder). ``--targets soft`` trains it on soft targets too; with gold labels as the teacher the
distribution is one-hot, so soft is the hard loss exactly (tests/test_train.py) and is not worth the CPU time.
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


INTENT_PROMPT = "Classify the customer-support message into its intent. Answer with JSON: {\"intent\": \"<intent>\"}."


def _lm_run(root: Path, intents: list[str], train: list, val: list, test: list, targets: str, extra: list[str]):
    """A run directory whose generate stage is replaced by the split files (gold labels as the teacher's)."""
    import json

    from distill import paths, runio

    recipe_dir, run_dir = root / "recipes", root / f"run-{targets}"
    (recipe_dir / "intents").mkdir(parents=True, exist_ok=True)
    (recipe_dir / "intents" / "student_prompt.md").write_text(INTENT_PROMPT + "\n")
    (recipe_dir / "intents" / "teacher_prompt.md").write_text(INTENT_PROMPT + "\n")
    rows = {"train": train, "val": val, "test": test}
    with (recipe_dir / "intents" / "inputs.jsonl").open("w") as fh:
        for split, items in rows.items():
            for k, (text, intent) in enumerate(items):
                fh.write(json.dumps({"id": f"{split}{k}", "text": text, "gold": {"intent": intent}}) + "\n")
    schema = {"type": "object", "properties": {"intent": {"type": "string", "enum": intents}},
              "required": ["intent"], "additionalProperties": False}
    (recipe_dir / "intents.yaml").write_text(json.dumps({
        "name": "intents", "description": "Bitext intents", "inputs": "inputs.jsonl", "id_field": "id",
        "text_field": "text", "gold_field": "gold", "teacher_prompt": "teacher_prompt.md",
        "student_prompt": "student_prompt.md", "output_schema": schema}))
    for split, items in rows.items():
        out = [{"id": f"{split}{k}", "input": text, "teacher": {"intent": intent}, "gold": {"intent": intent},
                "split": split, "provenance": {"method": "trusted"}} for k, (text, intent) in enumerate(items)]
        path = paths.split_path(run_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        runio.write_jsonl(path, out)
    from distill.config import load_config

    cfg = load_config([f"recipe_dir={recipe_dir}", "recipe=intents", f"run_dir={run_dir}", "student=smollm2_135m",
                       "train.max_steps=null", f"train.targets={targets}", *extra])
    return cfg, run_dir


def lm_rung(root: Path, intents: list[str], train: list, val: list, test: list, targets: str, hourly: float,
            seed: int, extra: list[str]) -> tuple[list, str]:
    """(table row, note) of the LM rung trained by the train stage and scored on ``test`` by scored decoding."""
    import gc

    from distill import paths
    from distill.metrics.stats import rate
    from distill.stages import train as train_stage
    from distill.student.models import load_student
    from distill.student.predict import predict_in_process
    from distill.task import Task

    started = time.perf_counter()
    cfg, run_dir = _lm_run(root, intents, train, val, test, targets, extra)
    t0 = time.perf_counter()
    summary = train_stage.run(cfg, run_dir)
    train_s = time.perf_counter() - t0
    gc.collect()
    model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
    test_rows = [{"input": t, "teacher": {"intent": i}} for t, i in test]
    t0 = time.perf_counter()
    preds = predict_in_process(cfg, Task(cfg), test_rows, model, tokenizer)
    score_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - started
    acc = rate([a is not None and a["intent"] == i for a, (_, i) in zip(preds.answers, test)], resamples=1000,
               level=0.95, seed=seed)
    usd_per_1k = hourly / 3600 * score_s / len(test) * 1000
    row = [len(train), f"{100 * acc['value']:.1f}% [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]",
           f"{cfg.student.name} LoRA ({targets})", f"{summary['steps']} steps, {summary['epochs_trained']:g} epochs",
           f"{train_s:.0f}", f"{score_s:.0f}", f"{train_s + score_s:.0f}", f"{wall_s:.0f}", f"{usd_per_1k:.6f}"]
    curve = ", ".join(f"{c['step']}: {c['eval_agreement']:.3f}" for c in summary["val_agreements"])
    note = (f"{row[2]}: {summary['stop_reason']}; val agreement by step {{{curve}}}, kept "
            f"{summary['best_checkpoint'] or 'the last step'}; lr {cfg.train.lr}, lora_r {cfg.train.lora_r}, batch "
            f"{cfg.train.batch_size}, balance {summary['balance']['why']}; {summary['tokens_per_s']} tokens/s; "
            f"invalid {sum(a is None for a in preds.answers)}/{len(test)}")
    print(note, flush=True)
    del model
    gc.collect()
    return row, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", nargs="+", choices=["embed", "lm"], default=["embed"])
    ap.add_argument("--targets", nargs="+", choices=["hard", "soft"], default=["hard"], help="the LM rung's")
    ap.add_argument("--lm-set", nargs="*", default=[], help="extra key=value settings for the LM rung")
    ap.add_argument("--work", type=Path, default=None, help="keep the LM run directories here")
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
        if "lm" in args.rungs:
            import tempfile

            root = (args.work or Path(tempfile.mkdtemp(prefix="distill-ladder-"))) / f"n{n}"
            train = [(t, i) for i in intents for t in pool[i][:n]]
            for targets in args.targets:
                row, note = lm_rung(root, intents, train, val, test, targets, hourly, args.seed, args.lm_set)
                rows.append([n, *row])
                notes.append(f"n={n}: {note}")
        if "embed" not in args.rungs:
            continue
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
                     "embed_classifier", f"C={report['intent']['C']}", f"{train_s:.1f}", f"{score_s:.1f}",
                     f"{train_s + score_s:.1f}",
                     f"{wall_s:.1f}", f"{usd_per_1k:.6f}"])
        notes.append(f"n={n}: val accuracy by C {report['intent']['tried']}, converged {report['intent']['converged']}")

    headers = ["examples per intent", "train examples", "accuracy vs gold [95% CI]", "rung", "chosen on val", "train s",
               "score s", "train+score s", "wall s", "$ per 1k requests"]
    lm_text = (f" LM rung: student=smollm2_135m, LoRA with distill/conf/train/lora.yaml's defaults (train.epochs "
               f"{cfg.train.epochs:g}, early stopping on val agreement, patience {cfg.train.early_stopping_patience}) "
               f"trained by the train stage, scored by scored decoding; train s = the train stage (validations "
               f"included)." if "lm" in args.rungs else "")
    text = "\n".join([textwrap.fill(
        f"student=embed_classifier (frozen all-MiniLM-L6-v2 + LogisticRegression, class_weight "
        f"{scfg.head.class_weight}, C from {scfg.head.c_grid} on val) on Bitext's {len(intents)} intents, gold labels "
        f"as a perfect teacher; test {len(test)} messages ({args.test_per_intent} per intent), val {len(val)} "
        f"({args.val_per_intent} per intent), seed {args.seed}, torch threads {torch.get_num_threads()}. train s = "
        f"embed train + val and fit; score s = embed + heads on the test set; wall s adds loading the encoder; $ per "
        f"1k at ${hourly}/h over the measured scoring rate. Chance: {100 / len(intents):.1f}%.{lm_text}",
        width=116), "",
        table(headers, rows), "", *[f"- {note}" for note in notes]])
    print(text)
    section = ("Student ladder: the embedding classifier on Bitext intents" if args.rungs == ["embed"]
               else "Student ladder: the embedding classifier and the LoRA LM on Bitext intents")
    append(section, text, record=not args.no_record)


if __name__ == "__main__":
    main()
