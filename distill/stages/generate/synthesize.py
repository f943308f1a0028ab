"""``generate.source=synthesize``: the teacher writes new inputs from seed examples over a diversity grid.

The recipe declares the grid (for example category x persona x tone) and how many inputs per cell; each input is one
free-text call whose prompt names the cell's attributes and shows a few seed inputs, and is labelled afterwards in a
separate call like any other input (so the label never leaks from the writing prompt). Written inputs live in the
ledger like every other paid call: a rerun writes nothing again.

    synthesis:
      prompt: synth_prompt.md          # instructions for the writer (a file beside the recipe, or the text itself)
      per_cell: 2
      seeds: 3                         # seed inputs shown per call (from the recipe's few-shot file)
      grid: {category: [...], persona: [...], tone: [...]}
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from distill import DistillError, runio
from distill.config import Config, synthesis_spec
from distill.ledger import Ledger
from distill.task import Example, Task
from distill.teacher import pricing
from distill.teacher.answers import BUDGET
from distill.teacher.budget import Budget
from distill.teacher.client import TeacherClient
from distill.teacher.request import build_chat_request

log = logging.getLogger("distill")


def plan(cfg: Config, task: Task) -> list[tuple[dict, int, list[dict]]]:
    """(cell attributes, sample index, messages) for every input to write, in a fixed order."""
    s = synthesis_spec(cfg)
    path = cfg.recipe.dir / s.prompt if cfg.recipe.dir and (cfg.recipe.dir / s.prompt).is_file() else None
    instructions = path.read_text(encoding="utf-8").strip() if path else s.prompt.strip()
    seeds = [text for text, _ in task.few_shot][: s.seeds]
    axes = list(s.grid)
    out = []
    for values in itertools.product(*(s.grid[a] for a in axes)):
        cell = dict(zip(axes, values))
        lines = ["Write one new input with these attributes: "
                 + "; ".join(f"{k}: {v}" for k, v in cell.items()) + "."]
        if seeds:
            lines += ["", "Real inputs look like these:"] + [f"- {t}" for t in seeds]
        lines += ["", "Answer with the new input's text only."]
        messages = [{"role": "system", "content": instructions}, {"role": "user", "content": "\n".join(lines)}]
        out += [(cell, k, messages) for k in range(s.per_cell)]
    if cfg.generate.limit is not None:
        out = out[: cfg.generate.limit]
    return out


def synthesize(cfg: Config, task: Task, ledger: Ledger, endpoint, budget: Budget
               ) -> tuple[list[Example], dict] | pricing.DryRun:
    """Have the teacher write the inputs; returns them as Examples (ids from the cell and sample) and a summary, or
    on a dry run the estimate of the writing calls (the labelling estimate needs their texts)."""
    jobs = plan(cfg, task)
    tcfg = cfg.teacher.model_copy(update={"max_tokens": max(cfg.teacher.max_tokens, 160)})
    requests = [build_chat_request(tcfg, task.schema, msgs, 0, k, structured=False) for _, k, msgs in jobs]
    estimate = pricing.estimate(tcfg.price, requests, tcfg.max_tokens, ledger=ledger)
    if cfg.generate.dry_run:
        return pricing.DryRun(f"dry run: {len(jobs)} inputs to write ({estimate['already_paid']} already in the "
                              f"ledger, ~${estimate['usd']:.4f}), then the same number to label; nothing was sent",
                              estimate)
    log.info("synthesize: %d inputs to write over the grid, ~%d prompt tokens (labelling is estimated after)",
             len(jobs), estimate["prompt_tokens"])
    client = TeacherClient(tcfg, endpoint(), task.schema, ledger, cfg.generate.max_attempts, budget=budget)

    async def main():
        sem = asyncio.Semaphore(tcfg.concurrency)

        async def one(messages: list[dict], k: int):
            async with sem:
                outcome = await client.write(messages, k)
            return None if outcome.reason == BUDGET else outcome

        try:
            return await asyncio.gather(*(one(msgs, k) for _, k, msgs in jobs))
        finally:
            await client.close()

    outcomes = asyncio.run(main())
    examples, failed, stopped = [], 0, 0
    for (cell, k, _), outcome in zip(jobs, outcomes):
        if outcome is None:
            stopped += 1
            continue
        if outcome.answer is None:
            failed += 1
            continue
        ex_id = "syn-" + runio.sha256_obj([cell, k])[:12]
        examples.append(Example(ex_id, outcome.answer["text"], None))
    if not examples:
        raise DistillError(f"the teacher wrote no usable input for any of {len(jobs)} grid cells; check "
                           f"synthesis.prompt")
    summary = {"cells": len({runio.sha256_obj(c) for c, _, _ in jobs}), "requested": len(jobs),
               "written": len(examples), "failed": failed, "not_written_budget": stopped,
               "cost_usd": round(sum(o.cost_usd for o in outcomes if o is not None), 6),
               "cache_hits": sum(o.cache_hit for o in outcomes if o is not None)}
    log.info("synthesize: %d inputs written over %d cells (%d failed)", len(examples), summary["cells"], failed)
    return examples, summary
