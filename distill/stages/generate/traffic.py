"""``generate.source=traffic``: re-distil from what a served run's gateway logged (``serve/traffic.sqlite``).

    python -m distill run recipe=support_tickets generate.source=traffic generate.traffic=runs/served \\
        eval.baseline=runs/served/evaluate/results.json run_dir=runs/next
    # the gateway ran with serve.store=redis: the same settings read its Redis stream
    python -m distill run recipe=support_tickets generate.source=traffic generate.traffic=runs/served \\
        serve.store=redis serve.redis_url=redis://127.0.0.1:6379/0 run_dir=runs/next

The log is read through the store interface (``distill.serve.traffic.read_source``): ``generate.traffic=RUN_DIR``
with ``serve.store=redis`` reads the Redis stream of ``serve.redis_url`` under ``serve.store_namespace`` (default
the recipe's name), as the gateway wrote it; otherwise the run's ``serve/traffic.sqlite`` (or the file named).
Generate's fingerprint covers the log's content (``source_digest``): a changed log re-runs generate.

The dataset: the served run's test split exactly as it was (same ids, inputs and teacher answers), so the new run is
compared with the served one item by item (McNemar, ``eval.baseline``); then the recipe's own inputs and the logged
inputs (one per distinct text), deduplicated as generate always does. An input that duplicates a test item (the same
normalised text, generate's near-duplicate estimate, or evaluate's decontamination check) is left out, and every
other input goes to train or val: its usual hash split, and a second hash between train and val when that says test.

Teacher answers, nothing paid twice. The run uses the served run's ledger itself: ``generate.shared_ledger``
defaults to it (a copy would miss what the gateway pays after the copy, and a gateway reloaded onto the new run
would pay that again). An input the gateway sent to the teacher (a fallback or a shadow call) is answered from that
ledger when its labelling request is there: the gateway asks ``TeacherClient.label(task.teacher_messages(text))``,
which is generate's request with ``teacher.method=generate`` and the recipe's fixed few-shot set. Otherwise (score,
nearest few-shot, another ledger) it takes the answer the traffic log stored, with provenance method ``traffic``.
Only inputs the teacher never answered are paid.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distill import DistillError, paths, runio
from distill.config import Config
from distill.data import dedup
from distill.data.split import assign_split
from distill.ledger import Ledger
from distill.ledger.store import request_key
from distill.serve.traffic import locate, read_source, source_name
from distill.task import Example, Task

log = logging.getLogger("distill")

PREFIX = "traffic-"  # ids of logged inputs: the prefix and the sha256 of the text


@dataclass
class TrafficPlan:
    """What the traffic source adds to generate: read before dedup, applied after it."""

    served: Path
    fixed_test: list[dict]                 # the served run's test rows, written as they are
    examples: list[Example]                # the recipe's inputs (not in the test split), then the logged ones
    answers: dict[str, dict]               # logged input id -> the teacher answer the log stored
    skipped: dict = field(default_factory=dict)
    bad_gold: int = 0
    summary: dict = field(default_factory=dict)


def load(cfg: Config, task: Task) -> TrafficPlan:
    """The served run's test split, the recipe's inputs and the distinct logged inputs (with their teacher answers)."""
    served, _ = locate(cfg.generate.traffic)
    log_file = source_name(cfg)
    if served is None:
        raise DistillError(f"generate.traffic={cfg.generate.traffic} is not inside a served run's serve/ folder; "
                           f"point it at the served run's directory")
    test_file = paths.split_path(served, "test")
    if not test_file.is_file():
        raise DistillError(f"{test_file} does not exist: the re-distilled run keeps the served run's test split")
    fixed_test = runio.read_jsonl(test_file)
    test_ids = {r["id"] for r in fixed_test}
    inputs = task.load_inputs(cfg.generate.limit)
    recipe = [ex for ex in inputs.examples if ex.id not in test_ids]

    records = read_source(cfg)  # the SQLite file, or the Redis stream with serve.store=redis
    logged: dict[str, Example] = {}
    answers: dict[str, dict] = {}
    sources: Counter = Counter()
    invalid = 0
    for rec in records:
        text = rec.get("input")
        if not isinstance(text, str) or not text.strip():
            continue
        ex_id = PREFIX + runio.sha256_text(text)[:12]
        logged.setdefault(ex_id, Example(ex_id, text))
        answer = rec.get("teacher")
        if answer is None or ex_id in answers:
            continue
        if not isinstance(answer, dict) or task.schema.errors(answer):
            invalid += 1  # kept as an input; the teacher is asked again (through the ledger)
            continue
        answers[ex_id] = answer
        sources[rec.get("teacher_source") or "unknown"] += 1
    if not logged:
        raise DistillError(f"{log_file} holds no task inputs for {cfg.serve.store_namespace or cfg.recipe.name!r}; "
                           f"send the gateway requests first")
    summary = {"served_run": str(served), "log": str(log_file), "records": len(records),
               "distinct_inputs": len(logged), "sent_to_teacher": len(answers), "teacher_source": dict(sources),
               "invalid_logged_answers": invalid, "recipe_inputs": len(recipe), "fixed_test": len(fixed_test)}
    log.info("generate: re-distilling from %s: %d records, %d distinct inputs (%d answered by the teacher), "
             "%d recipe inputs, the served run's %d test items kept", log_file, len(records), len(logged),
             len(answers), len(recipe), len(fixed_test))
    return TrafficPlan(served, fixed_test, recipe + list(logged.values()), answers, inputs.skipped, inputs.bad_gold,
                       summary)


def keep_test_fixed(cfg: Config, plan: TrafficPlan, examples: list[Example], split_keys: list[str],
                    qa: dict) -> tuple[list[Example], list[str]]:
    """After dedup: leave out every input that duplicates a test item, and put the rest in train or val
    (``Example.split``), so nothing of the fixed test split leaks into training."""
    dupes = test_duplicates(cfg, plan.fixed_test, examples)
    fractions = cfg.generate.split.model_dump()
    kept, keys, own_test = [], [], 0
    for ex, key in zip(examples, split_keys):
        if ex.id in dupes:
            continue
        if ex.split == "test":  # a recipe row's own test split that the served run did not have: never train on it
            own_test += 1
            continue
        ex.split = ex.split or train_or_val(key, fractions, cfg.seed)
        kept.append(ex)
        keys.append(key)
    qa["test_duplicates_left_out"] = len(dupes)
    qa["test_duplicate_ids"] = dict(list(dupes.items())[:200])
    plan.summary["left_out_test_duplicates"] = len(dupes)
    plan.summary["left_out_recipe_test_rows"] = own_test
    return kept, keys


def test_duplicates(cfg: Config, test_rows: list[dict], examples: list[Example]) -> dict[str, str]:
    """{input id: the test id it duplicates}: the same normalised text, generate's near-duplicate estimate
    (``generate.dedup``), or evaluate's decontamination check (``eval.decontam``), whichever finds it."""
    norms = {dedup.normalise(r["input"]): r["id"] for r in test_rows}
    d = cfg.generate.dedup
    index = dedup.NearDuplicates(d.threshold, d.num_perm, seed=cfg.seed, exact=False) if d.enabled else None
    for r in test_rows if index is not None else ():
        index.add(r["id"], r["input"])
    found: dict[str, str] = {}
    for ex in examples:
        if (test_id := norms.get(dedup.normalise(ex.text))) is not None:
            found[ex.id] = test_id
        elif index is not None and (matches := index.matches(ex.text)):
            found[ex.id] = matches[0][0]
    dc = cfg.eval.decontam
    if dc.enabled and test_rows:
        rest = [{"id": ex.id, "input": ex.text} for ex in examples if ex.id not in found]
        for ex_id, info in dedup.find_duplicates(test_rows, rest, threshold=dc.threshold, num_perm=dc.num_perm,
                                                 k=dc.shingle_chars).items():
            found[ex_id] = info["train_id"]
    return found


def train_or_val(key: str, fractions: dict[str, float], seed: int) -> str:
    """generate's hash split; an input it would put in test gets a second hash between train and val."""
    split = assign_split(key, fractions, seed)
    if split != "test":
        return split
    t, v = fractions["train"], fractions["val"]
    return assign_split(f"not-test:{key}", {"train": t / (t + v), "val": v / (t + v), "test": 0.0}, seed)


def use_logged_answers(plan: TrafficPlan, examples: list[Example], planned: Callable[[int], list[dict]],
                       ledger: Ledger) -> set[str]:
    """Give each input the gateway sent to the teacher the logged answer (``Example.trusted``) unless the ledger
    holds its labelling request (then labelling reads it there, at no cost). Returns the ids answered from the log."""
    from_log = set()
    for i, ex in enumerate(examples):
        answer = plan.answers.get(ex.id)
        if answer is None or ex.trusted is not None:
            continue
        if all(ledger.get(request_key(r)) is not None for r in planned(i)):
            continue
        ex.trusted = answer
        from_log.add(ex.id)
    return from_log


def settle(plan: TrafficPlan, examples: list[Example], outcomes: list, from_log: set[str]) -> dict:
    """The traffic part of generate's summary: where each logged input's answer came from and what it cost."""
    sent = [(ex, o) for ex, o in zip(examples, outcomes) if ex.id in plan.answers and o is not None]
    never = [(ex, o) for ex, o in zip(examples, outcomes)
             if ex.id.startswith(PREFIX) and ex.id not in plan.answers and o is not None]
    return {**plan.summary,
            "sent_inputs_kept": len(sent),
            "answered_from_ledger": sum(ex.id not in from_log and o.cache_hit and not o.paid_calls for ex, o in sent),
            "answered_from_log": len(from_log),
            "paid_calls_for_sent_inputs": sum(o.paid_calls for _, o in sent),
            "never_sent_inputs_kept": len(never),
            "paid_calls_for_never_sent_inputs": sum(o.paid_calls for _, o in never)}
