"""The student ladder's rungs on Bitext intents: the embedding classifier and the LoRA LM at a few examples per intent.

    python benchmarks/student_ladder.py [--rungs embed setfit fastfit lm] [--per-intent 10 100 0] [--test-per-intent 25]
                                        [--val-per-intent 5] [--targets hard soft] [--no-record]

Bitext's 27 intents (../shared/data, never copied) with the gold labels standing in for a perfect teacher. One
fixed, stratified test set (``--test-per-intent`` messages per intent) and val set (``--val-per-intent``, what the
head's C is chosen on); for each budget n, the first n remaining messages of every intent train student=embed_classifier
with its shipped settings (distill/conf/student/embed_classifier.yaml) through the package's own code (the frozen
MiniLM, distill.student.heads.fit_heads). Exact duplicate messages (case-insensitive) are dropped first,
so no test message is also a training one. Reported: accuracy vs gold with a 95% percentile bootstrap interval
(distill.metrics.stats.rate, 1,000 resamples), seconds to train (embed train + val, fit the heads) and to score the
test set (embed + heads), the rung's wall time, and $ per 1,000 requests at eval.cost.student_usd_per_hour over the
measured scoring throughput. ``--per-intent 0`` trains on every message left after test and val (the full split);
with ``--rungs lm`` it needs ``--lm-set train.epochs=N`` (or ``train.max_steps``): an epoch there is about 45 minutes
on 2 CPU cores.

``--rungs setfit``: the same classifier on an encoder first fine-tuned the SetFit way (Tunstall et al., 2022):
sentence-transformers' CosineSimilarityLoss on pairs of training messages (per message and round one positive
partner of its intent and one negative of another, ``--setfit-iterations`` rounds, at most ``--setfit-max-pairs``),
one epoch, lr 2e-5, batch 16, mean pooling as the frozen rung. The tuned encoder is saved as a plain folder, which is
what ``student.source=hf student.path=DIR`` reads, so the rung it measures is one a user can run.

``--rungs fastfit``: the same MiniLM trained the FastFit way (Yehudai and Bandel, 2024: batch contrastive
learning against the intent names' encodings with token-level similarity, plus a classifier loss) by IBM's
``fast-fit`` package with the settings of its README (``--fastfit-epochs`` 40, batch 32, 4 repeats, adafactor,
classifier-loss factor 0.1; fp32 on CPU), scored by the package's own similarity classifier. A comparison only: no
distill rung is built on it. ``fast-fit`` 1.2.1 (its last release) predates transformers 5 and datasets 3, so it is
not a dependency: install it with ``pip install fast-fit --no-deps``; this rung bridges the three calls it makes
that were removed (``datasets.load_metric``, ``Trainer(tokenizer=)``, ``TrainingArguments.overwrite_output_dir``).

``--rungs lm``: student=smollm2_135m trained by the train stage itself (distill.stages.train.run) on the same
split with its shipped defaults (distill/conf/train/lora.yaml: train.epochs, early stopping on the val agreement
with the teacher, balanced batches when skewed) in a temporary run directory, then scored on the test set by scored
decoding (evaluate's decoder). ``--targets soft`` trains it on soft targets too; with gold labels as the teacher the
distribution is one-hot, so soft is the hard loss exactly (tests/test_train.py) and is not worth the CPU time.

``--teacher embedded``: a real teacher instead of gold labels, on Bitext's 11-value ``category`` field
(benchmarks/shared_data.py's cs_category recipe, one few-shot seed per category): the embedded teacher (SmolLM2-135M
GGUF, teacher.method=score: one 1-token call per message) labels ``--test-per-intent`` x 11 test messages and
``--per-intent`` x 11 more (every tenth in val, the rest train) through ``python -m distill generate``, one shared
ledger in the work folder (a rerun pays nothing). Each rung then trains on the teacher's labels with each of
``--targets``: ``hard`` (its top value), ``soft`` (its calibrated distribution, provenance.distribution) and
``soft_confidence`` (the fallback for data without a distribution: its top value's probability, the rest spread
evenly). Reported on the test set: accuracy vs gold and agreement with the teacher (95% bootstrap intervals), the
paired difference of each target against hard (bootstrap interval of the per-item difference, exact two-sided
McNemar p), the teacher's own accuracy vs gold, wall time.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
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


# -- --rungs setfit: the encoder fine-tuned on contrastive pairs, then the same heads ------------------------------

def contrastive_pairs(train: list, iterations: int, seed: int) -> list[tuple[str, str, float]]:
    """SetFit's pair sampling: for every training message, ``iterations`` rounds of one positive partner (same
    label, label 1.0) and one negative partner (another label, 0.0), drawn with a seeded generator."""
    rng = random.Random(seed)
    by_label = defaultdict(list)
    for text, label in train:
        by_label[label].append(text)
    labels = sorted(by_label)
    pairs = []
    for _ in range(iterations):
        for text, label in train:
            same = by_label[label]
            pairs.append((text, same[rng.randrange(len(same))], 1.0))
            other = labels[rng.randrange(len(labels) - 1)]
            other = labels[-1] if other == label else other  # uniform over the other labels
            pairs.append((text, by_label[other][rng.randrange(len(by_label[other]))], 0.0))
    rng.shuffle(pairs)
    return pairs


def finetune_encoder(folder: Path, out: Path, train: list, iterations: int, max_pairs: int, max_seq_len: int,
                     seed: int) -> dict:
    """Fine-tune the MiniLM in ``folder`` the SetFit way (sentence-transformers: mean pooling, CosineSimilarityLoss
    on ``contrastive_pairs``, one epoch, lr 2e-5, batch 16, SetFit's defaults) and save it as a plain encoder
    folder (config, safetensors, tokenizer) that student=embed_classifier reads with ``student.source=hf``."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses, modules

    pairs = contrastive_pairs(train, iterations, seed)[:max_pairs]
    word = modules.Transformer(str(folder), max_seq_length=max_seq_len)
    model = SentenceTransformer(modules=[word, modules.Pooling(word.get_embedding_dimension(), "mean")],
                                device="cpu")
    data = Dataset.from_dict({"sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs],
                              "label": [y for _, _, y in pairs]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=2e-5,
        warmup_steps=0.1, seed=seed, save_strategy="no", report_to="none", logging_steps=50,
        use_cpu=True, dataloader_drop_last=False)
    started = time.perf_counter()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.CosineSimilarityLoss(model))
    result = trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    word.auto_model.save_pretrained(out, safe_serialization=True)
    word.tokenizer.save_pretrained(out)
    return {"pairs": len(pairs), "steps": result.global_step, "loss": round(result.training_loss, 4),
            "s": time.perf_counter() - started}


# -- --teacher embedded: the embedded teacher's labels, hard vs soft targets ----------------------------------------

FIELD = "category"


def teacher_labelled(work: Path, n_test: int, n_labelled: int, seed: int, extra: list[str]) -> tuple[dict, dict]:
    """(rows by split as generate wrote them, {wall_s, paid_calls, cache_hits, recipe_dir}): the embedded teacher
    (score method) labels the cs_category recipe's inputs, the first ``n_test`` fixed as the test split."""
    import json
    import subprocess

    from distill import paths, runio

    recipes = bitext.prepare(work / "recipes", n_test + n_labelled, 1, seed, n_test=n_test)
    run_dir = work / "teacher-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # generate anew each time; the ledger outside it keeps what was paid
    args = ["recipe=cs_category", f"recipe_dir={recipes}", f"run_dir={run_dir}", "teacher=local",
            "teacher.method=score", f"generate.limit={n_test + n_labelled}", "generate.dedup.enabled=false",
            f"generate.shared_ledger={work / 'ledger.sqlite'}", f"seed={seed}", *extra]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distill", "generate", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"generate failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "generate" / "DONE.json").read_text())["summary"]
    rows = {s: runio.read_jsonl(paths.split_path(run_dir, s)) for s in paths.SPLITS}
    return rows, {"wall_s": round(wall, 1), "paid_calls": summary["paid_calls_this_run"],
                  "cache_hits": summary["cache_hits_this_run"], "rejected": summary["rejected"],
                  "recipe_dir": recipes}


def with_targets(rows: list[dict], targets: str) -> list[dict]:
    """The rows as a student trained with ``targets`` reads them: ``soft_confidence`` drops the distribution, so
    soft training falls back to the top value's probability with the rest spread evenly."""
    if targets != "soft_confidence":
        return rows
    return [{**r, "provenance": {k: v for k, v in r["provenance"].items() if k != "distribution"}} for r in rows]


def scored(answers: list[dict | None], test: list[dict], seed: int) -> dict:
    """Per-item flags and intervals on the test rows: accuracy vs gold, agreement with the teacher."""
    from distill.metrics.stats import rate

    gold = [a is not None and a.get(FIELD) == r["gold"][FIELD] for a, r in zip(answers, test)]
    agree = [a is not None and a.get(FIELD) == r["teacher"][FIELD] for a, r in zip(answers, test)]
    boot = {"resamples": 1000, "level": 0.95, "seed": seed}
    return {"gold": gold, "agree": agree, "acc": rate(gold, **boot), "agreement": rate(agree, **boot),
            "invalid": sum(a is None for a in answers)}


def paired(base: list[bool], other: list[bool], seed: int) -> str:
    """``other`` minus ``base`` accuracy on the same items: points [95% bootstrap CI], exact two-sided McNemar p."""
    import numpy as np

    from distill.metrics.stats import bootstrap_ci, mcnemar_drop

    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    low, high = bootstrap_ci(diff, resamples=1000, level=0.95, seed=seed)
    worse, better = mcnemar_drop(base, other), mcnemar_drop(other, base)
    p = min(1.0, 2 * min(worse["p_value"], better["p_value"]))
    return (f"{100 * diff.mean():+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] (only hard right {worse['b']}, only "
            f"this right {worse['c']}; McNemar p={p:.3f})")


def embed_teacher_rung(rows: dict, values: list, targets: str, scfg, hourly: float, seed: int, cache: dict) -> dict:
    """The embedding classifier on the teacher's train labels with ``targets``; scored on the test split."""
    import numpy as np

    from distill.stages.train.soft import teacher_distribution
    from distill.student.embed_classifier import EmbedClassifier, encoder_folder, fit_heads

    started = time.perf_counter()
    if "clf" not in cache:  # one encoder and one embedding of each split, whatever the targets
        clf = EmbedClassifier(encoder_folder(scfg), {}, {"encoder": {"max_seq_len": scfg.max_seq_len}})
        t0 = time.perf_counter()
        cache.update(clf=clf, **{s: clf.embed([r["input"] for r in rows[s]], scfg.head.batch_size)
                                 for s in ("train", "val", "test")})
        cache["embed_s"] = time.perf_counter() - t0
    clf = cache["clf"]
    train = with_targets(rows["train"], targets)
    soft = None
    if targets != "hard":
        dists = [teacher_distribution(r, FIELD, values) for r in train]
        soft = {FIELD: np.array([d for d, _ in dists])}
        sources = sorted({src for _, src in dists})
    t0 = time.perf_counter()
    clf.heads, report = fit_heads(cache["train"], [r["teacher"] for r in train], cache["val"],
                                  [r["teacher"] for r in rows["val"]], {FIELD: values}, scfg.head, soft)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = [a for a, _, _ in clf.predict([r["input"] for r in rows["test"]], scfg.head.batch_size)]
    score_s = time.perf_counter() - t0
    out = scored(answers, rows["test"], seed)
    out.update(rung="embed_classifier", targets=targets, fit_s=fit_s, score_s=score_s,
               wall_s=time.perf_counter() - started, chosen=f"C={report[FIELD]['C']}",
               usd_per_1k=hourly / 3600 * score_s / len(rows["test"]) * 1000,
               note=f"embed_classifier ({targets}): val agreement by C {report[FIELD]['tried']}"
                    + (f", distribution source {sources}" if soft else ""))
    return out


def lm_teacher_rung(root: Path, rows: dict, recipe_dir: Path, targets: str, hourly: float, seed: int,
                    extra: list[str]) -> dict:
    """The LoRA LM on the teacher's labels with ``targets`` (the train stage itself), scored by scored decoding."""
    import gc

    from distill import paths, runio
    from distill.config import load_config
    from distill.stages import train as train_stage
    from distill.student.models import load_student
    from distill.student.predict import predict_in_process
    from distill.task import Task

    started = time.perf_counter()
    run_dir = root / f"lm-{targets}"
    for split, split_rows in rows.items():
        path = paths.split_path(run_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        runio.write_jsonl(path, with_targets(split_rows, targets))
    cfg = load_config([f"recipe_dir={recipe_dir}", "recipe=cs_category", f"run_dir={run_dir}",
                       "student=smollm2_135m", "train.max_steps=null",
                       f"train.targets={'hard' if targets == 'hard' else 'soft'}", f"seed={seed}", *extra])
    t0 = time.perf_counter()
    summary = train_stage.run(cfg, run_dir)
    train_s = time.perf_counter() - t0
    gc.collect()
    model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
    t0 = time.perf_counter()
    preds = predict_in_process(cfg, Task(cfg), rows["test"], model, tokenizer)
    score_s = time.perf_counter() - t0
    del model
    gc.collect()
    out = scored(preds.answers, rows["test"], seed)
    curve = ", ".join(f"{c['step']}: {c['eval_agreement']:.3f}" for c in summary["val_agreements"])
    out.update(rung=f"{cfg.student.name} LoRA", targets=targets, fit_s=train_s, score_s=score_s,
               wall_s=time.perf_counter() - started, usd_per_1k=hourly / 3600 * score_s / len(rows["test"]) * 1000,
               chosen=f"{summary['steps']} steps, {summary['epochs_trained']:g} epochs",
               note=f"{cfg.student.name} LoRA ({targets}): {summary['stop_reason']}; val agreement by step "
                    f"{{{curve}}}; soft sources {(summary.get('soft_targets') or {}).get('fields_by_source')}; lr "
                    f"{cfg.train.lr}, lora_r {cfg.train.lora_r}, batch {cfg.train.batch_size}; "
                    f"{summary['tokens_per_s']} tokens/s; invalid {out['invalid']}/{len(rows['test'])}")
    return out


def teacher_main(args, scfg, hourly: float) -> None:
    import torch

    from distill.metrics.stats import format_interval, rate

    work = args.work or Path(tempfile.mkdtemp(prefix="distill-ladder-teacher-"))
    values = sorted({r["category"] for r in bitext.load_rows()})
    n_test, n_labelled = args.test_per_intent * len(values), max(args.per_intent) * len(values)
    rows, gen = teacher_labelled(work, n_test, n_labelled, args.seed, args.teacher_set)
    splits = {s: len(r) for s, r in rows.items()}
    print(f"teacher: paid calls {gen['paid_calls']}, ledger hits {gen['cache_hits']}, {gen['wall_s']} s; splits "
          f"{splits}", flush=True)
    boot = {"resamples": 1000, "level": 0.95, "seed": args.seed}
    teacher_acc = {s: rate([r["teacher"][FIELD] == r["gold"][FIELD] for r in rows[s]], **boot) for s in rows}
    results, cache = [], {}
    for rung in args.rungs:
        for targets in args.targets:
            if rung == "embed":
                res = embed_teacher_rung(rows, values, targets, scfg, hourly, args.seed, cache)
            else:
                res = lm_teacher_rung(work, rows, gen["recipe_dir"], targets, hourly, args.seed, args.lm_set)
            print(res["note"], format_interval(res["acc"]), format_interval(res["agreement"]), flush=True)
            results.append(res)
    headers = ["rung", "targets", "accuracy vs gold [95% CI]", "agreement with teacher [95% CI]",
               "vs hard, same rung: accuracy points [95% CI]", "chosen", "train s", "score s", "wall s",
               "$ per 1k requests"]
    table_rows = []
    for res in results:
        hard = next((h for h in results if h["rung"] == res["rung"] and h["targets"] == "hard"), None)
        vs = "-" if hard is None or hard is res else paired(hard["gold"], res["gold"], args.seed)
        table_rows.append([res["rung"], res["targets"], format_interval(res["acc"]), format_interval(res["agreement"]),
                           vs, res["chosen"], f"{res['fit_s']:.1f}", f"{res['score_s']:.1f}", f"{res['wall_s']:.1f}",
                           f"{res['usd_per_1k']:.6f}"])
    text = "\n".join([textwrap.fill(
        f"Bitext's 11 categories labelled by the embedded teacher (SmolLM2-135M GGUF, teacher=local, "
        f"teacher.method=score, one few-shot seed per category, calibrated): splits {splits} (test fixed, "
        f"{args.test_per_intent} per category; val every tenth of the rest), seed {args.seed}, torch threads "
        f"{torch.get_num_threads()}. The teacher's accuracy vs gold: test {format_interval(teacher_acc['test'])}, "
        f"train {format_interval(teacher_acc['train'])}. Teacher labelling: {gen['paid_calls']} paid calls, "
        f"{gen['cache_hits']} ledger hits, {gen['wall_s']} s wall (generate, server start included), rejected "
        f"{gen['rejected'] or 0}. Students train on the teacher's train labels (C or early stopping on val "
        f"agreement with the teacher) and are scored on the test split. train s: the embedding classifier's head fit "
        f"(the shared embedding of all splits, {cache.get('embed_s', 0):.1f} s, not included) or the LM's train "
        f"stage; $ per 1k at ${hourly}/h over the measured scoring rate. Paired column: the rung's accuracy minus "
        f"the same rung's hard-target accuracy on the same test items. Chance: {100 / len(values):.1f}%.",
        width=116), "", table(headers, table_rows), "", *[f"- {res['note']}" for res in results]])
    print(text)
    append("Student ladder: soft vs hard targets from the embedded teacher (Bitext categories)", text,
           record=not args.no_record)


def embed_rung(folder: Path, scfg, train: list, val: list, test: list, enums: dict, hourly: float, seed: int,
               tune_s: float, started: float) -> tuple[list, str]:
    """([train examples, accuracy, chosen, train s, score s, train+score s, wall s, $/1k], note): the classifier
    on the encoder in ``folder`` (train s includes ``tune_s``, the encoder's fine-tuning)."""
    from distill.metrics.stats import format_interval, rate
    from distill.student.embed_classifier import EmbedClassifier
    from distill.student.heads import fit_heads

    clf = EmbedClassifier(folder, {}, {"encoder": {"max_seq_len": scfg.max_seq_len}})
    t0 = time.perf_counter()
    x = clf.embed([t for t, _ in train], scfg.head.batch_size)
    x_val = clf.embed([t for t, _ in val], scfg.head.batch_size)
    clf.heads, report = fit_heads(x, [{"intent": i} for _, i in train], x_val, [{"intent": i} for _, i in val],
                                  enums, scfg.head)
    train_s = time.perf_counter() - t0 + tune_s
    t0 = time.perf_counter()
    answers = [a for a, _, _ in clf.predict([t for t, _ in test], scfg.head.batch_size)]
    score_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - started
    acc = rate([a["intent"] == i for a, (_, i) in zip(answers, test)], resamples=1000, level=0.95, seed=seed)
    usd_per_1k = hourly / 3600 * score_s / len(test) * 1000
    row = [len(train), format_interval(acc), f"C={report['intent']['C']}", f"{train_s:.1f}", f"{score_s:.1f}",
           f"{train_s + score_s:.1f}", f"{wall_s:.1f}", f"{usd_per_1k:.6f}"]
    return row, f"val accuracy by C {report['intent']['tried']}, converged {report['intent']['converged']}"


def _fastfit():
    """IBM's ``fast-fit`` package, bridged to the transformers and datasets installed (see the module docstring):
    (FastFitTrainer, the per-item correctness of the last metric call, in a list the caller reads)."""
    import datasets
    import numpy as np
    import transformers

    last: list = []

    class Accuracy:  # what datasets.load_metric("accuracy") returned, keeping the per-item result for intervals
        def compute(self, predictions, references):
            last[:] = list(np.asarray(predictions) == np.asarray(references))
            return {"accuracy": float(np.mean(last))}

    if not hasattr(datasets, "load_metric"):
        datasets.load_metric = lambda *args, **kwargs: Accuracy()
    if not hasattr(transformers.TrainingArguments, "overwrite_output_dir"):
        transformers.TrainingArguments.overwrite_output_dir = True
    try:
        import fastfit.train as fastfit_train
    except ImportError as exc:
        raise SystemExit(f"--rungs fastfit needs IBM's fast-fit package: pip install fast-fit --no-deps ({exc})")

    class Trainer(transformers.Trainer):  # transformers 5 renamed the tokenizer argument processing_class
        def __init__(self, *args, tokenizer=None, **kwargs):
            super().__init__(*args, processing_class=tokenizer, **kwargs)

    fastfit_train.Trainer = Trainer
    return fastfit_train.FastFitTrainer, last


def fastfit_rung(folder: Path, out: Path, train: list, val: list, test: list, epochs: int, hourly: float,
                 seed: int) -> tuple[list, str]:
    """([train examples, accuracy, chosen, train s, score s, train+score s, wall s, $/1k], note): FastFit."""
    import datasets

    from distill.metrics.stats import format_interval, rate

    started = time.perf_counter()
    trainer_class, last = _fastfit()

    def frame(items):
        return datasets.Dataset.from_dict({"text": [t for t, _ in items], "label": [i for _, i in items]})

    data = datasets.DatasetDict({"train": frame(train), "validation": frame(val), "test": frame(test)})
    t0 = time.perf_counter()
    trainer = trainer_class(
        model_name_or_path=str(folder), label_column_name="label", text_column_name="text", dataset=data,
        num_train_epochs=epochs, per_device_train_batch_size=32, per_device_eval_batch_size=64, max_text_length=128,
        dataloader_drop_last=False, num_repeats=4, optim="adafactor", clf_loss_factor=0.1, fp16=False,
        output_dir=str(out), save_strategy="no", report_to="none", seed=seed)
    trainer.train()
    val_acc = trainer.evaluate()["eval_accuracy"]
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.test()
    score_s = time.perf_counter() - t0
    if len(last) != len(test):
        raise SystemExit(f"fast-fit scored {len(last)} test items, not {len(test)}: its API has changed")
    acc = rate(last, resamples=1000, level=0.95, seed=seed)
    wall_s = time.perf_counter() - started
    usd_per_1k = hourly / 3600 * score_s / len(test) * 1000
    row = [len(train), format_interval(acc), f"{epochs} epochs", f"{train_s:.1f}", f"{score_s:.1f}",
           f"{train_s + score_s:.1f}", f"{wall_s:.1f}", f"{usd_per_1k:.6f}"]
    return row, f"val accuracy {100 * val_acc:.1f}% after {epochs} epochs (train s includes that validation)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", nargs="+", choices=["embed", "setfit", "fastfit", "lm"], default=["embed"],
                    help="setfit: the encoder fine-tuned on contrastive pairs first; fastfit: IBM's fast-fit "
                         "package on the same encoder (both with gold labels only)")
    ap.add_argument("--fastfit-epochs", type=int, default=40, help="FastFit's epochs (its README's setting)")
    ap.add_argument("--setfit-iterations", type=int, default=20, help="pair rounds per message (SetFit's default)")
    ap.add_argument("--setfit-max-pairs", type=int, default=20000, help="a cap on the pairs (CPU time)")
    ap.add_argument("--targets", nargs="+", choices=["hard", "soft", "soft_confidence"], default=["hard"],
                    help="hard and soft for the LM rung with gold labels; any of them with --teacher embedded")
    ap.add_argument("--teacher", choices=["gold", "embedded"], default="gold",
                    help="gold labels as a perfect teacher (intents), or the embedded teacher's (categories)")
    ap.add_argument("--teacher-set", nargs="*", default=[], help="extra key=value settings for generate")
    ap.add_argument("--lm-set", nargs="*", default=[], help="extra key=value settings for the LM rung")
    ap.add_argument("--work", type=Path, default=None, help="keep the LM run directories here")
    ap.add_argument("--per-intent", type=int, nargs="+", default=[10, 100],
                    help="training messages per intent; 0 = every message left after test and val (the full split)")
    ap.add_argument("--test-per-intent", type=int, default=25)
    ap.add_argument("--val-per-intent", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.teacher == "gold" and "soft_confidence" in args.targets:
        ap.error("--targets soft_confidence needs --teacher embedded: gold labels carry no confidence to fall back on")
    if args.teacher == "embedded" and {"setfit", "fastfit"} & set(args.rungs):
        ap.error("--rungs setfit and fastfit are measured with gold labels (--teacher gold)")
    bounded = any(s.split("=", 1)[0] in ("train.epochs", "train.max_steps") for s in args.lm_set)
    if "lm" in args.rungs and 0 in args.per_intent and not bounded:
        ap.error("--per-intent 0 (the full split) with the LM rung trains about 4,100 messages, about 45 minutes an "
                 "epoch on 2 CPU cores and up to 5 epochs by default: bound it with --lm-set train.epochs=N (or "
                 "train.max_steps=N), or leave lm out of --rungs")

    import torch

    from distill.config import load_config
    from distill.student.embed_classifier import encoder_folder

    cfg = load_config(["student=embed_classifier", "run_dir=/tmp/distill-ladder-unused"])
    scfg, hourly = cfg.student, cfg.eval.cost.student_usd_per_hour
    if args.teacher == "embedded":
        teacher_main(args, scfg, hourly)
        return
    by_intent = load_intents()
    test, val, pool = splits(by_intent, args.test_per_intent, args.val_per_intent, args.seed)
    short = [i for i, texts in pool.items() if len(texts) < max(args.per_intent)]
    if short:
        raise SystemExit(f"intents with fewer than {max(args.per_intent)} training messages left: {short}")
    intents = sorted(by_intent)
    enums = {"intent": intents}

    rows, notes = [], []
    for n in args.per_intent:
        take, label = (n, n) if n else (None, "all")  # 0: the whole pool of every intent
        if "lm" in args.rungs:
            root = (args.work or Path(tempfile.mkdtemp(prefix="distill-ladder-"))) / f"n{n}"
            train = [(t, i) for i in intents for t in pool[i][:take]]
            for targets in args.targets:
                row, note = lm_rung(root, intents, train, val, test, targets, hourly, args.seed, args.lm_set)
                rows.append([label, *row])
                notes.append(f"n={label}: {note}")
        for rung in [r for r in ("embed", "setfit") if r in args.rungs]:
            started = time.perf_counter()
            train = [(t, i) for i in intents for t in pool[i][:take]]
            folder, tuned, tune_s = encoder_folder(scfg), None, 0.0
            if rung == "setfit":
                folder = (args.work or Path(tempfile.mkdtemp(prefix="distill-setfit-"))) / f"setfit-n{n}"
                tuned = finetune_encoder(encoder_folder(scfg), folder, train, args.setfit_iterations,
                                         args.setfit_max_pairs, scfg.max_seq_len, args.seed)
                tune_s = tuned["s"]
            row, note = embed_rung(folder, scfg, train, val, test, enums, hourly, args.seed, tune_s, started)
            name = "embed_classifier" + (" (SetFit-tuned encoder)" if tuned else "")
            rows.append([label, row[0], row[1], name, *row[2:]])
            notes.append(f"n={label} {rung}: {note}" + (
                f"; encoder fine-tuned on {tuned['pairs']} pairs ({args.setfit_iterations} rounds per message, "
                f"cap {args.setfit_max_pairs}), {tuned['steps']} steps, loss {tuned['loss']}, {tuned['s']:.0f} s"
                if tuned else ""))
        if "fastfit" in args.rungs:
            train = [(t, i) for i in intents for t in pool[i][:take]]
            out = (args.work or Path(tempfile.mkdtemp(prefix="distill-fastfit-"))) / f"fastfit-n{n}"
            row, note = fastfit_rung(encoder_folder(scfg), out, train, val, test, args.fastfit_epochs, hourly,
                                     args.seed)
            rows.append([label, row[0], row[1], "FastFit (fast-fit package, MiniLM)", *row[2:]])
            notes.append(f"n={label} fastfit: {note}")

    headers = ["examples per intent", "train examples", "accuracy vs gold [95% CI]", "rung", "chosen on val", "train s",
               "score s", "train+score s", "wall s", "$ per 1k requests"]
    lm_text = (f" LM rung: student=smollm2_135m, LoRA with distill/conf/train/lora.yaml's defaults (train.epochs "
               f"{cfg.train.epochs:g}, early stopping on val agreement, patience {cfg.train.early_stopping_patience}) "
               f"trained by the train stage, scored by scored decoding; train s = the train stage (validations "
               f"included)." if "lm" in args.rungs else "")
    setfit_text = (" SetFit-tuned rows: the encoder first fine-tuned the SetFit way (contrastive pairs, "
                   "CosineSimilarityLoss, one epoch, sentence-transformers), then the same heads; train s includes "
                   "the fine-tuning." if "setfit" in args.rungs else "")
    setfit_text += (" FastFit rows: IBM's fast-fit package on the same MiniLM (its README's settings, fp32), scored "
                    "by its own token-similarity classifier; train s includes one val pass." if "fastfit" in args.rungs
                    else "")
    text = "\n".join([textwrap.fill(
        f"student=embed_classifier (frozen all-MiniLM-L6-v2 + LogisticRegression, class_weight "
        f"{scfg.head.class_weight}, C from {scfg.head.c_grid} on val) on Bitext's {len(intents)} intents, gold labels "
        f"as a perfect teacher; test {len(test)} messages ({args.test_per_intent} per intent), val {len(val)} "
        f"({args.val_per_intent} per intent), seed {args.seed}, torch threads {torch.get_num_threads()}. train s = "
        f"embed train + val and fit; score s = embed + heads on the test set; wall s adds loading the encoder; $ per "
        f"1k at ${hourly}/h over the measured scoring rate. Chance: {100 / len(intents):.1f}%.{setfit_text}{lm_text}",
        width=116), "",
        table(headers, rows), "", *[f"- {note}" for note in notes]])
    print(text)
    section = ("Student ladder: the embedding classifier and the LoRA LM on Bitext intents" if "lm" in args.rungs
               else "Student ladder: the embedding classifier on Bitext intents")
    append(section, text, record=not args.no_record)


if __name__ == "__main__":
    main()
