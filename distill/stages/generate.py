"""generate: the teacher labels the recipe's inputs -> generate/data/{train,val,test}.jsonl + ledger.sqlite.

    python -m distill generate recipe=support_tickets run_dir=DIR [teacher=openai] [generate.dry_run=true]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from distill import DistillError, paths, runio
from distill.config import Config
from distill.ledger import Ledger
from distill.task import Example, Task

log = logging.getLogger("distill")


class DryRunStop(DistillError):
    """generate.dry_run=true: the estimate was printed and nothing was paid."""


def assign_split(text: str, fractions: dict[str, float], seed: int) -> str:
    """Deterministic split from a hash of the normalised text: identical texts always share a split."""
    norm = " ".join(text.lower().split())
    u = int(runio.sha256_text(f"{seed}:{norm}")[:12], 16) / float(1 << 48)
    edge = 0.0
    for split in paths.SPLITS:
        edge += fractions[split]
        if u < edge:
            return split
    return paths.SPLITS[-1]


def estimate_cost(cfg: Config, task: Task, examples: list[Example]) -> dict:
    """Rough pre-run estimate (4 characters per token) for the calls not yet in the ledger."""
    chars = sum(len(m["content"]) for ex in examples for m in task.teacher_messages(ex.text))
    prompt_tokens = chars / 4
    completion_tokens = len(examples) * cfg.teacher.max_tokens / 2
    p = cfg.teacher.price
    usd = (prompt_tokens * p.input_per_1m + completion_tokens * p.output_per_1m) / 1e6
    return {"requests": len(examples), "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens), "usd": round(usd, 4)}


@contextlib.contextmanager
def teacher_endpoint(cfg: Config, log_dir: Path):
    """Yield the teacher's base URL, starting (and always stopping) the llama.cpp server for teacher=local."""
    if cfg.teacher.kind != "llama_cpp":
        yield cfg.teacher.base_url
        return
    from distill.teacher.server import LlamaCppServer, embedded_gguf

    model = Path(cfg.teacher.model_path) if cfg.teacher.model_path else embedded_gguf()
    server = LlamaCppServer(model, alias=cfg.teacher.model or "teacher", n_ctx=cfg.teacher.n_ctx or 4096,
                            n_threads=cfg.teacher.n_threads, log_path=log_dir / "teacher_server.log",
                            startup_timeout_s=cfg.teacher.startup_timeout_s or 120,
                            logits_all=cfg.teacher.method == "score")
    with server:
        yield server.base_url


def run(cfg: Config, run_dir: Path) -> dict:
    from distill.teacher.client import TeacherClient

    out_dir = paths.stage_dir(run_dir, "generate")
    task = Task(cfg)
    inputs = task.load_inputs(cfg.generate.limit)
    examples = inputs.examples
    fractions = cfg.generate.split.model_dump()
    ledger_file = Path(cfg.generate.shared_ledger) if cfg.generate.shared_ledger else paths.ledger_path(run_dir)

    estimate = estimate_cost(cfg, task, examples)
    log.info("generate: %d inputs (%s skipped), teacher %s; estimate before ledger hits: ~%d prompt tokens, "
             "~$%.4f", len(examples), sum(inputs.skipped.values()), cfg.teacher.model, estimate["prompt_tokens"],
             estimate["usd"])
    if cfg.generate.dry_run:
        raise DryRunStop(f"dry run: {estimate['requests']} requests, ~{estimate['prompt_tokens']} prompt tokens, "
                         f"~${estimate['usd']:.4f} at teacher {cfg.teacher.model}; nothing was sent")

    if cfg.teacher.method == "score":
        free = [f for f in task.schema.fields if f not in task.schema.enums]
        if free:
            raise DistillError(f"teacher.method=score needs a fixed set of values (enum) for every field; "
                               f"{', '.join(free)} have none. Use teacher.method=generate for this recipe")
    with Ledger(ledger_file) as ledger:
        before = ledger.count()
        with teacher_endpoint(cfg, out_dir) as base_url:
            client = TeacherClient(cfg.teacher, base_url, task.schema, ledger, cfg.generate.max_attempts)
            if cfg.teacher.method == "score":
                outcomes = asyncio.run(_score_all(client, task, examples, cfg.teacher.calibrate,
                                                  cfg.generate.budget_usd))
            else:
                outcomes = asyncio.run(_label_all(client, task, examples, cfg.generate.budget_usd))
        ledger_summary = ledger.summary()
        hits = sum(o.cache_hit for o in outcomes if o is not None)
        ledger.record_hits(str(run_dir), hits)
        new_rows = ledger.count() - before

    rows: dict[str, list[dict]] = {s: [] for s in paths.SPLITS}
    rejected, reasons = [], Counter()
    budget_skipped = 0
    for ex, outcome in zip(examples, outcomes):
        if outcome is None:
            budget_skipped += 1
            continue
        if outcome.answer is None:
            reasons[outcome.reason] += 1
            rejected.append({"id": ex.id, "input": ex.text, "reason": outcome.reason})
            continue
        split = assign_split(ex.text, fractions, cfg.seed)
        rows[split].append({"id": ex.id, "input": ex.text, "teacher": outcome.answer, "gold": ex.gold,
                            "split": split,
                            "provenance": {"request_key": outcome.key, "teacher_model": cfg.teacher.model,
                                           "method": cfg.teacher.method, "attempt": outcome.attempt,
                                           "cache_hit": outcome.cache_hit, "confidence": outcome.confidence}})
    for split, split_rows in rows.items():
        runio.write_jsonl(paths.split_path(run_dir, split), split_rows)
    runio.write_jsonl(out_dir / paths.REJECTED, rejected)

    labelled = [r for split_rows in rows.values() for r in split_rows]
    summary = {
        "inputs": len(examples),
        "skipped_inputs": inputs.skipped,
        "inputs_with_bad_gold": inputs.bad_gold,
        "labelled": len(labelled),
        "rejected": dict(reasons),
        "not_labelled_budget": budget_skipped,
        "splits": {s: len(r) for s, r in rows.items()},
        "teacher": {"model": cfg.teacher.model, "kind": cfg.teacher.kind},
        "paid_calls_this_run": sum(o.paid_calls for o in outcomes if o is not None),
        "new_ledger_rows": new_rows,
        "cache_hits_this_run": hits,
        "cost_usd_this_run": round(sum(o.cost_usd for o in outcomes if o is not None), 6),
        "ledger": ledger_summary,
        "label_distribution": _distribution(labelled, task),
        "teacher_vs_gold": teacher_vs_gold(labelled, task),
        "data_sha256": {s: runio.sha256_file(paths.split_path(run_dir, s)) for s in paths.SPLITS},
    }
    if budget_skipped:
        raise DistillError(f"generate stopped at the budget cap ${cfg.generate.budget_usd}: {budget_skipped} inputs "
                           f"not labelled; everything paid is kept in the ledger. Raise generate.budget_usd and rerun")
    if not labelled:
        raise DistillError(f"the teacher produced no valid answer for any of {len(examples)} inputs "
                           f"(rejected: {dict(reasons)}); check the prompt and teacher.structured_output")
    log.info("generate: %d labelled, %d rejected %s, %d paid calls, %d ledger hits",
             len(labelled), len(rejected), dict(reasons), summary["paid_calls_this_run"], hits)
    return summary


async def _label_all(client, task: Task, examples: list[Example], budget: float | None) -> list:
    """Label every example with bounded concurrency; stop starting new ones once the budget is spent."""
    results: list = [None] * len(examples)
    spent = 0.0
    bar = tqdm(total=len(examples), desc="teacher", unit="input", leave=False)

    # Admit work only as fast as it can run, so the budget is checked against what was really spent.
    admit = asyncio.Semaphore(client.tcfg.concurrency)

    async def one(i: int, ex: Example) -> None:
        nonlocal spent
        async with admit:
            if budget is not None and spent >= budget:
                return
            outcome = await client.label(task.teacher_messages(ex.text))
        spent += outcome.cost_usd
        results[i] = outcome
        bar.update(1)
        bar.set_postfix(spent=f"${spent:.4f}")

    try:
        await asyncio.gather(*(one(i, ex) for i, ex in enumerate(examples)))
    finally:
        bar.close()
        await client.close()
    return results


async def _score_all(client, task: Task, examples: list[Example], calibrate: bool,
                     budget: float | None = None) -> list:
    """Score every allowed value of every field by first-token log-probs, field by field (so a server's prompt
    cache keeps the shared prefix), then calibrate each field over all inputs and pick the best value."""
    import numpy as np

    from distill.teacher.client import Outcome
    from distill.teacher.scoring import calibrate as calibrate_scores
    from distill.teacher.scoring import few_shot_log_prior, field_messages, value_scores

    fields = task.schema.fields
    per_field: dict[str, list] = {}
    bar = tqdm(total=len(examples) * len(fields), desc="teacher (score)", unit="call", leave=False)
    admit = asyncio.Semaphore(client.tcfg.concurrency)
    spent = 0.0

    async def one(ex: Example, field: str):
        nonlocal spent
        async with admit:
            if budget is not None and spent >= budget:
                return None
            outcome = await client.top_logprobs(field_messages(task, ex.text, field))
        spent += outcome.cost_usd
        bar.update(1)
        return outcome

    try:
        for field in fields:
            per_field[field] = await asyncio.gather(*(one(ex, field) for ex in examples))
    finally:
        bar.close()
        await client.close()

    labels, confidence = {}, {}
    for field in fields:
        values = task.schema.enums[field]
        ok = [i for i, o in enumerate(per_field[field]) if o is not None and o.answer is not None]
        if not ok:
            continue
        matrix = np.array([value_scores(per_field[field][i].answer["top"], values) for i in ok])
        prior = few_shot_log_prior([str(label[field]) for _, label in task.few_shot], values)
        idx, conf = calibrate_scores(matrix, calibrate, prior)
        for row, i in enumerate(ok):
            labels.setdefault(i, {})[field] = values[idx[row]]
            confidence.setdefault(i, {})[field] = round(float(conf[row]), 4)

    results = []
    for i in range(len(examples)):
        outs = [per_field[f][i] for f in fields]
        if any(o is None for o in outs):  # not asked: the budget ran out first
            results.append(None)
            continue
        paid = sum(o.paid_calls for o in outs)
        cost = sum(o.cost_usd for o in outs)
        failed = next((o.reason for o in outs if o.answer is None), None)
        keys = ",".join(o.key for o in outs)
        if failed:
            results.append(Outcome(None, failed, keys, 0, paid, cost_usd=cost))
            continue
        results.append(Outcome(labels[i], None, keys, 0, paid, cache_hit=all(o.cache_hit for o in outs),
                               cost_usd=cost, confidence=confidence[i]))
    return results


def _distribution(rows: list[dict], task: Task) -> dict:
    return {f: dict(Counter(str(r["teacher"].get(f)) for r in rows).most_common()) for f in task.schema.enums}


def teacher_vs_gold(rows: list[dict], task: Task) -> dict:
    """The teacher's own accuracy against gold labels, per field and for the whole object."""
    scored = [r for r in rows if r.get("gold")]
    if not scored:
        return {"n": 0}
    out = {"n": len(scored)}
    for field in task.schema.fields:
        out[field] = round(sum(r["teacher"].get(field) == r["gold"].get(field) for r in scored) / len(scored), 4)
    out["exact"] = round(sum(r["teacher"] == r["gold"] for r in scored) / len(scored), 4)
    return out
