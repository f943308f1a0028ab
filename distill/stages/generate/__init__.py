"""generate: the teacher labels the recipe's inputs -> generate/data/{train,val,test}.jsonl + ledger.sqlite.

    python -m distill generate recipe=support_tickets run_dir=DIR [teacher=openai] [generate.dry_run=true]

Order of work: read inputs (or have the teacher synthesize them), redact PII if asked, drop exact and near
duplicates, estimate the cost of what the ledger does not already hold (and stop there on a dry run), then label
with the teacher under the budget cap, and split without leakage. Everything paid for is in the ledger the moment it
validated, so a crash or a budget stop loses nothing. ``generate.source=traffic`` re-distils from a served run's
traffic log on that run's ledger, keeping its test split (``distill.stages.generate.traffic``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from pathlib import Path

from distill import DistillError, paths, runio
from distill.config import Config, resolve_method, score_ties
from distill.data import dedup, pii
from distill.data.embed import nearest
from distill.data.split import assign_split
from distill.ledger import Ledger
from distill.stages.generate import traffic
from distill.stages.generate.synthesize import synthesize
from distill.task import Example, Task
from distill.teacher import pricing
from distill.teacher.answers import BUDGET, Outcome
from distill.teacher.budget import Budget
from distill.teacher.client import TeacherClient
from distill.teacher.labelling import teach
from distill.teacher.request import build_chat_request, build_score_request
from distill.teacher.scoring import field_messages
from distill.teacher.server import teacher_endpoint

log = logging.getLogger("distill")


def prepare(cfg: Config, task: Task, examples: list[Example]) -> tuple[list[Example], list[str], dict]:
    """PII redaction and duplicate removal. Returns (kept examples, the text that decides each one's split, QA
    report): members of a near-duplicate group all take their group's first text, so they share a split."""
    qa: dict = {"pii_redacted": {}, "exact_duplicates": 0, "near_duplicates": 0}
    if cfg.generate.redact_pii:
        totals: Counter = Counter()
        for ex in examples:
            ex.text, counts = pii.redact(ex.text)
            totals.update(counts)
        qa["pii_redacted"] = dict(totals)
    d = cfg.generate.dedup
    groups = dedup.duplicate_groups([ex.text for ex in examples], d.threshold, d.num_perm, cfg.seed)
    norms = [dedup.normalise(ex.text) for ex in examples]
    dupes = [i for i, g in enumerate(groups) if g != i]
    first_of = {}
    for i, norm in enumerate(norms):
        first_of.setdefault(norm, i)
    qa["exact_duplicates"] = sum(first_of[norms[i]] != i for i in dupes)
    qa["near_duplicates"] = len(dupes) - qa["exact_duplicates"]
    qa["removed_ids"] = [examples[i].id for i in dupes][:200] if d.enabled else []
    if not d.enabled:
        return examples, [examples[g].text for g in groups], qa
    keep = [i for i, g in enumerate(groups) if g == i]
    return [examples[i] for i in keep], [examples[i].text for i in keep], qa


def run(cfg: Config, run_dir: Path) -> dict | pricing.DryRun:
    """Label (or synthesize, then label) the recipe's inputs; returns the stage summary, or a ``pricing.DryRun``
    with the estimate when ``generate.dry_run`` is set (nothing is sent then, and no DONE.json is written)."""
    out_dir = paths.stage_dir(run_dir, "generate")
    task = Task(cfg)
    method = resolve_method(cfg, task)
    if cfg.teacher.method == "auto" and method == "generate" and (ties := score_ties(cfg)):
        log.info("generate: teacher.method=auto writes answers instead of scoring: values begin alike, so their first "
                 "token cannot rank them (%s)", "; ".join(f"{f}: {a} / {b}" for f, pairs in ties.items()
                                                          for a, b in pairs[:2]))
    ledger_file = paths.ledger_path(run_dir, cfg.generate.shared_ledger)
    skipped: dict = {}
    bad_gold = 0
    plan = None  # generate.source=traffic (distill.stages.generate.traffic)
    if cfg.generate.source == "label":
        inputs = task.load_inputs(cfg.generate.limit)
        examples, skipped, bad_gold = inputs.examples, inputs.skipped, inputs.bad_gold
    elif cfg.generate.source == "traffic":
        plan = traffic.load(cfg, task)
        examples, skipped, bad_gold = plan.examples, plan.skipped, plan.bad_gold
    else:
        examples = []  # written by the teacher below, once the endpoint is up
    fractions = cfg.generate.split.model_dump()

    with Ledger(ledger_file) as ledger:
        before = ledger.count()
        with contextlib.ExitStack() as stack:
            base_url = None

            def endpoint() -> str:
                nonlocal base_url
                if base_url is None:
                    base_url = stack.enter_context(teacher_endpoint(cfg, out_dir, logits_all=method == "score"))
                return base_url

            # The cap is counted over the ledger and shared with every process using it (claims + reservations).
            budget = stack.enter_context(Budget(cfg.generate.budget_usd, ledger,
                                                max_billed=cfg.teacher.max_billed_attempts,
                                                lease_s=cfg.teacher.claim_lease_s))
            synth_summary = None
            if cfg.generate.source == "synthesize":
                written = synthesize(cfg, task, ledger, endpoint, budget)
                if isinstance(written, pricing.DryRun):  # the labelling estimate needs the texts: stop here
                    return written
                examples, synth_summary = written

            examples, split_keys, qa = prepare(cfg, task, examples)
            if plan is not None:
                examples, split_keys = traffic.keep_test_fixed(cfg, plan, examples, split_keys, qa)
            shots = _choose_shots(cfg, task, examples)
            from_log: set[str] = set()
            if plan is not None:
                from_log = traffic.use_logged_answers(plan, examples, lambda i: _planned_requests(
                    cfg, task, method, [examples[i]], None if shots is None else [shots[i]]), ledger)
            trusted = [ex for ex in examples if ex.trusted is not None]
            to_label = [ex for ex in examples if ex.trusted is None]
            requests = _planned_requests(cfg, task, method, to_label, shots)
            estimate = pricing.estimate_run(cfg, requests, ledger)
            log.info("generate: %d inputs (%d skipped, %d duplicates removed, %d with trusted labels), teacher %s "
                     "(%s); %d requests already in the ledger; estimate for the rest: %d requests, ~%d prompt "
                     "tokens, ~$%.4f", len(examples), sum(skipped.values()),
                     qa["exact_duplicates"] + qa["near_duplicates"] if cfg.generate.dedup.enabled else 0,
                     len(trusted), cfg.teacher.model, method, estimate["already_paid"], estimate["requests"],
                     estimate["prompt_tokens"], estimate["usd"])
            if cfg.generate.dry_run:
                return pricing.DryRun(f"dry run: {estimate['requests']} requests to send ({estimate['already_paid']} "
                                      f"already in the ledger), ~{estimate['prompt_tokens']} prompt tokens, "
                                      f"~${estimate['usd']:.4f} at teacher {cfg.teacher.model}; nothing was sent",
                                      estimate)

            if to_label:
                client = TeacherClient(cfg.teacher, endpoint(), task.schema, ledger, cfg.generate.max_attempts,
                                       votes=cfg.generate.self_consistency,
                                       min_vote_share=cfg.generate.min_vote_share, budget=budget)
                labelled_outcomes = asyncio.run(teach(client, cfg, task, method, to_label, requests, shots,
                                                       budget, run_dir))
                labelled_outcomes = [None if o is not None and o.reason == BUDGET else o for o in labelled_outcomes]
                transport = dict(client.transport_errors)
                batches_created = getattr(client, "batches_created", None)
                http_transport = client.transport  # "aiohttp ..." or "httpx (fallback: why)"
            else:
                labelled_outcomes, transport, batches_created, http_transport = [], {}, None, None
        ledger_summary = ledger.summary()
        spent_total = ledger.spent()
        by_id = {ex.id: o for ex, o in zip(to_label, labelled_outcomes)}
        outcomes = [by_id.get(ex.id) if ex.trusted is None else _trusted(ex, ex.id in from_log) for ex in examples]
        hits = sum(o.cache_hit for o in outcomes if o is not None and o.key not in ("trusted", "traffic"))
        ledger.record_hits(str(run_dir), hits)
        new_rows = ledger.count() - before

    # Near-duplicates share their group's split: the group's first member decides for all.
    rows: dict[str, list[dict]] = {s: [] for s in paths.SPLITS}
    rejected, reasons = [], Counter()
    budget_skipped = 0
    for ex, split_key, outcome in zip(examples, split_keys, outcomes):
        if outcome is None:
            budget_skipped += 1
            continue
        if outcome.answer is None:
            reasons[outcome.reason] += 1
            rejected.append({"id": ex.id, "input": ex.text, "reason": outcome.reason, "request_key": outcome.key})
            continue
        split = ex.split or assign_split(split_key, fractions, cfg.seed)
        rows[split].append({"id": ex.id, "input": ex.text, "teacher": outcome.answer, "gold": ex.gold,
                            "split": split,
                            "provenance": {"request_key": outcome.key, "teacher_model": cfg.teacher.model,
                                           "method": outcome.key if ex.trusted is not None else method,
                                           "attempt": outcome.attempt, "cache_hit": outcome.cache_hit,
                                           "confidence": outcome.confidence,
                                           **({"distribution": outcome.distribution} if outcome.distribution
                                              else {})}})
    if plan is not None:  # the served run's test split, as it was: the comparison with it is paired
        rows["test"] = plan.fixed_test
    for split, split_rows in rows.items():
        runio.write_jsonl(paths.split_path(run_dir, split), split_rows)
    runio.write_jsonl(out_dir / paths.REJECTED, rejected)

    labelled = [r for split_rows in rows.values() for r in split_rows]
    summary = {
        "inputs": len(examples),
        "method": method,
        "mode": cfg.generate.mode,
        "source": cfg.generate.source,
        "synthesis": synth_summary,
        "skipped_inputs": skipped,
        "inputs_with_bad_gold": bad_gold,
        "trusted_labels": len(trusted) - len(from_log),
        "traffic": traffic.settle(plan, examples, outcomes, from_log) if plan is not None else None,
        "qa": {k: v for k, v in qa.items() if k != "removed_ids"},
        "labelled": len(labelled),
        "rejected": dict(reasons),
        "not_labelled_budget": budget_skipped,
        "splits": {s: len(r) for s, r in rows.items()},
        "teacher": {"model": cfg.teacher.model, "kind": cfg.teacher.kind, "transport": http_transport},
        "estimate": estimate,
        "paid_calls_this_run": sum(o.paid_calls for o in outcomes if o is not None),
        "new_ledger_rows": new_rows,
        "cache_hits_this_run": hits,
        "cost_usd_this_run": round(budget.spent_this_run, 6),
        "transport_errors": transport,
        "batches_created_this_run": batches_created,
        "ledger": ledger_summary,
        "label_distribution": _distribution(labelled, task),
        "teacher_vs_gold": teacher_vs_gold(labelled, task),
        "data_sha256": {s: runio.sha256_file(paths.split_path(run_dir, s)) for s in paths.SPLITS},
    }
    runio.write_json(out_dir / "qa.json", {**qa, "label_distribution": summary["label_distribution"]})
    if budget_skipped:
        raise DistillError(f"generate stopped at the budget cap ${cfg.generate.budget_usd} (the ledger holds "
                           f"${spent_total:.4f}, ${summary['cost_usd_this_run']:.4f} of it from this run): "
                           f"{budget_skipped} inputs not labelled; everything paid is kept in the ledger. Raise "
                           f"generate.budget_usd and rerun: only the difference is spent")
    if not labelled:
        raise DistillError(f"the teacher produced no valid answer for any of {len(examples)} inputs "
                           f"(rejected: {dict(reasons)}); check the prompt and teacher.structured_output")
    log.info("generate: %d labelled, %d rejected %s, %d paid calls, %d ledger hits, $%.4f",
             len(labelled), len(rejected), dict(reasons), summary["paid_calls_this_run"], hits,
             summary["cost_usd_this_run"])
    return summary


def _trusted(ex: Example, logged: bool = False) -> Outcome:
    """A label that costs no call: the input's own (``trusted``) or the teacher's answer the traffic log stored."""
    return Outcome(ex.trusted, None, "traffic" if logged else "trusted", 0, 0)


def _choose_shots(cfg: Config, task: Task, examples: list[Example]) -> list | None:
    """Per-input few-shot sets (``generate.few_shot=nearest``), or None for the recipe's fixed set."""
    if cfg.generate.few_shot == "fixed" or not examples:
        return None
    if not task.few_shot:
        raise DistillError(f"generate.few_shot=nearest needs labelled seeds: recipe {task.recipe.name!r} has no "
                           f"few_shot file")
    pool = [text for text, _ in task.few_shot]
    order = nearest([ex.text for ex in examples], pool, cfg.generate.few_shot_k)
    return [[task.few_shot[j] for j in idx] for idx in order]


def _planned_requests(cfg: Config, task: Task, method: str, examples: list[Example], shots) -> list[dict]:
    """The attempt-0 requests this run would send, in input order (per field for the score method)."""
    out = []
    for i, ex in enumerate(examples):
        mine = shots[i] if shots is not None else None
        if method == "score":
            out += [build_score_request(cfg.teacher, field_messages(task, ex.text, f, mine))
                    for f in task.schema.fields]
        else:
            out.append(build_chat_request(cfg.teacher, task.schema, task.teacher_messages(ex.text, mine), 0,
                                          None if cfg.generate.self_consistency == 1 else 0))
    return out


def _distribution(rows: list[dict], task: Task) -> dict:
    return {f: dict(Counter(str(r["teacher"].get(f)) for r in rows).most_common()) for f in task.schema.enums}


def teacher_vs_gold(rows: list[dict], task: Task) -> dict:
    """The teacher's own accuracy against gold labels, per field and for the whole object."""
    scored = [r for r in rows if r.get("gold") and r["provenance"]["method"] != "trusted"]
    if not scored:
        return {"n": 0}
    out = {"n": len(scored)}
    for field in task.schema.fields:
        out[field] = round(sum(r["teacher"].get(field) == r["gold"].get(field) for r in scored) / len(scored), 4)
    out["exact"] = round(sum(r["teacher"] == r["gold"] for r in scored) / len(scored), 4)
    return out

