"""Labelling a run's inputs with the teacher: every call of one run in one event loop, through the ledger.

    outcomes = asyncio.run(teach(client, cfg, task, method, examples, requests, shots, budget, run_dir))

``label_all`` sends one chat request per input (or ``generate.self_consistency`` votes) with bounded concurrency;
``score_all`` asks per field for the first answer token's log-probs and calibrates over all inputs
(``teacher.method=score``); ``generate.mode=batch`` goes through the Batch API (``teacher.batch``). Each returns one
``Outcome`` per input, in input order; every paid attempt is admitted by the budget inside the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distill import DistillError
from distill.collector import fewer_collections
from distill.config import Config
from distill.task import Example, Task
from distill.teacher.answers import BUDGET, Outcome
from distill.teacher.batch import label_batch
from distill.teacher.budget import Budget
from distill.teacher.client import TeacherClient, probe
from distill.teacher.scoring import (calibrated_probs, few_shot_log_prior, field_messages, value_distribution,
                                     value_scores)

log = logging.getLogger("distill")


async def teach(client: TeacherClient, cfg: Config, task: Task, method: str, examples: list[Example],
                requests: list[dict], shots, budget: Budget, run_dir: Path) -> list:
    """All teacher traffic of one run in one event loop (the client's connection pool lives in it); closes the
    client. ``requests`` are the attempt-0 requests (their messages are what ``label_all`` sends)."""
    with _stop_on_ctrl_c(client):
        try:
            await probe(client)
            if cfg.generate.mode == "batch":
                return await label_batch(client, cfg, [r["messages"] for r in requests], budget, run_dir)
            if method == "score":
                return await score_all(client, task, examples, shots, cfg.teacher.calibrate, budget)
            return await label_all(client, [r["messages"] for r in requests], budget)
        finally:
            await client.close()


@contextlib.contextmanager
def _stop_on_ctrl_c(client: TeacherClient):
    """Ctrl-C stops the run even when a library swallows the task cancellation asyncio turns it into: nothing more
    is sent from that moment (``client.fatal``), the calls in flight are cancelled, and KeyboardInterrupt is raised
    once they have unwound, whatever they returned. Answers already recorded stay in the ledger."""
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        client.fatal = True
        main.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (a notebook's worker): as asyncio does
        yield
        return
    try:
        yield
    except BaseException:  # the cancellation, or "the run is stopping" from a call that was retrying
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt


async def label_all(client: TeacherClient, messages: list[list[dict]], budget: Budget) -> list:
    """Label every input with bounded concurrency; every paid attempt is admitted by the budget inside the client."""
    results: list = [None] * len(messages)
    bar = tqdm(total=len(messages), desc="teacher", unit="input", leave=False)
    admit = asyncio.Semaphore(client.tcfg.concurrency)

    async def one(i: int) -> None:
        async with admit:
            if client.fatal:
                return
            try:
                results[i] = await client.label(messages[i])
            except DistillError:
                raise
            except Exception as exc:  # one odd answer must not cancel the calls in flight (already paid for)
                log.warning("input %d: unexpected %s: %s", i, type(exc).__name__, client.scrub(str(exc))[:200])
                results[i] = Outcome(None, f"client_error_{type(exc).__name__}", None, 0, 0)
        bar.update(1)
        bar.set_postfix(spent=f"${budget.spent_this_run:.4f}", refresh=False)

    try:
        with fewer_collections():  # a hot loop: most of its garbage dies young (distill.collector)
            await asyncio.gather(*(one(i) for i in range(len(messages))))
    finally:
        bar.close()
    return results


async def score_all(client: TeacherClient, task: Task, examples: list[Example], shots, calibrate: bool,
                    budget: Budget) -> list:
    """Score every allowed value of every field by first-token log-probs, field by field (so a server's prompt
    cache keeps the shared prefix), then calibrate each field over all inputs and pick the best value."""
    fields = task.schema.fields
    per_field: dict[str, list] = {}
    bar = tqdm(total=len(examples) * len(fields), desc="teacher (score)", unit="call", leave=False)
    admit = asyncio.Semaphore(client.tcfg.concurrency)

    async def one(i: int, field: str):
        messages = field_messages(task, examples[i].text, field, shots[i] if shots is not None else None)
        async with admit:
            if client.fatal:
                return None
            outcome = await client.top_logprobs(messages)
        bar.update(1)
        bar.set_postfix(spent=f"${budget.spent_this_run:.4f}", refresh=False)
        return None if outcome.reason == BUDGET else outcome

    try:
        with fewer_collections():
            for field in fields:
                per_field[field] = await asyncio.gather(*(one(i, field) for i in range(len(examples))))
    finally:
        bar.close()

    labels, confidence, distribution = {}, {}, {}
    for field in fields:
        values = task.schema.enums[field]
        ok = [i for i, o in enumerate(per_field[field]) if o is not None and o.answer is not None]
        if not ok:
            continue
        matrix = np.array([value_scores(per_field[field][i].answer["top"], values) for i in ok])
        prior = few_shot_log_prior([str(label[field]) for _, label in task.few_shot], values)
        probs = calibrated_probs(matrix, calibrate, prior)
        idx, conf = probs.argmax(axis=1), probs.max(axis=1)
        for row, i in enumerate(ok):
            labels.setdefault(i, {})[field] = values[idx[row]]
            confidence.setdefault(i, {})[field] = round(float(conf[row]), 4)
            distribution.setdefault(i, {})[field] = value_distribution(probs[row], values)

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
                               cost_usd=cost, confidence=confidence[i], distribution=distribution[i]))
    return results
