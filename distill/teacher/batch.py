"""``generate.mode=batch``: the OpenAI Batch API at half price, restart-safe.

A round writes the requests the ledger does not hold to ``generate/batches/<submission>.jsonl`` (``custom_id`` is the
request's ledger key), uploads it, and records the submission in the ledger *before* creating the batch, with the
submission id in the batch's metadata. A restarted run first finishes every open submission: it polls the recorded
batch id, or, when the process died between the create call and recording its answer, finds the batch by its
metadata, so a batch is never created twice. Results are joined by ``custom_id``; valid answers go to the ledger
like online ones (at the batch price), invalid answers are retried as fresh samples in the next round, and errored
or expired lines go back to the queue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

from distill import DistillError, paths, runio
from distill.ledger import request_key
from distill.teacher.client import ANSWER_REASONS, Outcome, RequestFailed, TeacherClient, _usage, namespace

log = logging.getLogger("distill")

FINAL_STATUSES = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/chat/completions"


def _body(request: dict) -> dict:
    body = {k: v for k, v in request.items() if k != "extra_body" and not k.startswith("_") and v is not None}
    body.update(request.get("extra_body") or {})
    return body


class BatchRunner:
    def __init__(self, client: TeacherClient, cfg, run_dir_generate):
        self.client = client
        self.ledger = client.ledger
        self.bcfg = cfg.generate.batch
        self.folder = run_dir_generate / "batches"
        self.created = 0  # batches this process created (the rest were found and polled)

    async def _api(self, fn, *args, **kwargs):
        try:
            return await self.client.retrying(fn, *args, **kwargs)
        except RequestFailed as exc:
            raise DistillError(f"the Batch API at {self.client.base_url} failed: {exc.reason} {exc.detail}; "
                               f"rerun to resume (submitted batches are polled, not resubmitted)") from None

    async def submit(self, requests: dict[str, dict]) -> str:
        """Upload and create one batch for ``{key: request}``; returns its submission id.

        The id is the hash of the keys and a round number: the same keys after a failed or expired batch make a
        new submission, while a restarted process finds its own unfinished one.
        """
        keys = sorted(requests)
        for round_no in itertools.count():
            submission = runio.sha256_obj([keys, round_no])
            rec = self.ledger.batch(submission)
            if rec is None or rec["status"] != "done":
                break
        if rec is None:
            bodies = {key: _body(req) for key, req in requests.items()}
            self.ledger.record_batch_lines(submission, bodies)
            path = self.folder / f"{submission[:16]}.jsonl"
            runio.write_jsonl(path, [{"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
                                     for key, body in bodies.items()])
            uploaded = await self._api(self.client.client.files.create, file=(path.name, path.read_bytes()),
                                       purpose="batch")
            self.ledger.record_batch(submission, n=len(requests), input_file_id=uploaded.id, status="uploaded")
        await self._ensure_created(submission)
        return submission

    async def _ensure_created(self, submission: str) -> str:
        rec = self.ledger.batch(submission)
        if rec["batch_id"]:
            return rec["batch_id"]
        # Maybe the create call went through and we died before recording it: look for our metadata first.
        async def find() -> str | None:
            async for b in self.client.client.batches.list(limit=100):  # newest first, all pages
                if (b.metadata or {}).get("distill_submission") == submission:
                    return b.id
            return None

        if found := await self._api(find):
            self.ledger.record_batch(submission, batch_id=found, status="submitted")
            return found
        batch = await self._api(self.client.client.batches.create, input_file_id=rec["input_file_id"],
                                endpoint=ENDPOINT, completion_window="24h",
                                metadata={"distill_submission": submission})
        self.created += 1
        self.ledger.record_batch(submission, batch_id=batch.id, status="submitted")
        log.info("batch %s submitted (%s)", batch.id, submission[:16])
        return batch.id

    async def finish(self, submission: str) -> dict[str, int]:
        """Poll one submission to its end and join its results into the ledger; returns counts by outcome."""
        batch_id = await self._ensure_created(submission)
        deadline = time.monotonic() + self.bcfg.timeout_h * 3600
        while True:
            batch = await self._api(self.client.client.batches.retrieve, batch_id)
            if batch.status in FINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                raise DistillError(f"batch {batch_id} still {batch.status} after {self.bcfg.timeout_h} h; rerun "
                                   f"later to keep polling it (nothing is resubmitted)")
            await asyncio.sleep(self.bcfg.poll_interval_s)
        counts = {"ok": 0, "invalid": 0, "errored": 0, "already_joined": 0}
        bodies = self.ledger.batch_lines(submission)
        if batch.output_file_id:
            content = await self._api(self.client.client.files.content, batch.output_file_id)
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, response = item.get("custom_id"), item.get("response") or {}
                if key not in bodies or response.get("status_code") != 200:
                    counts["errored"] += 1
                    continue
                if self.ledger.get(key) is not None or self.ledger.last_failure(key) in ANSWER_REASONS:
                    counts["already_joined"] += 1  # a previous process joined it and died before marking done
                    continue
                counts["ok" if self._join(key, bodies[key], response["body"]) else "invalid"] += 1
        counts["errored"] += (batch.request_counts.failed if batch.request_counts else 0)
        self.ledger.record_batch(submission, status="done")
        log.info("batch %s %s: %s", batch_id, batch.status, counts)
        return counts

    def _join(self, key: str, body: dict, completion: dict) -> bool:
        choice = (completion.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text, finish = message.get("content"), choice.get("finish_reason")
        prompt_tokens, cached_tokens, completion_tokens = _usage(namespace(completion.get("usage") or {}))
        cost = self.client.cost(prompt_tokens, cached_tokens, completion_tokens, batch=True)
        answer, reason = self.client.schema.parse(text)
        if message.get("refusal"):
            answer, reason = None, "refusal"
        elif finish in ("length", "content_filter"):
            answer, reason = None, "finish_length" if finish == "length" else "content_filter"
        if answer is None:
            self.ledger.record_failure(key, reason, (text or "")[:200], prompt_tokens=prompt_tokens,
                                       completion_tokens=completion_tokens, cost_usd=cost)
            return False
        self.ledger.record_success(key, self.client.tcfg.model or "", body, text, prompt_tokens=prompt_tokens,
                                   cached_tokens=cached_tokens, completion_tokens=completion_tokens, cost_usd=cost)
        return True


async def label_batch(client: TeacherClient, cfg, messages: list[list[dict]], budget, run_dir) -> list:
    """Outcomes for every input, in order; None where the budget stopped it."""
    runner = BatchRunner(client, cfg, paths.stage_dir(run_dir, "generate"))
    for submission, _ in runner.ledger.open_batches():  # a previous process's batches: poll, never resubmit
        await runner.finish(submission)

    n = len(messages)
    max_attempts = client.max_attempts
    results: list = [None] * n
    for i in range(n):  # decided before this run sent anything: ledger hits
        outcome, _ = _state(client, messages[i], max_attempts)
        if outcome is not None:
            outcome.cache_hit = True
            results[i] = outcome
    spent_per_input = [0.0] * n
    paid_per_input = [0] * n
    stopped: set[int] = set()
    for _ in range(cfg.generate.batch.max_rounds + max_attempts):
        todo: dict[str, dict] = {}
        owners: dict[str, list[int]] = {}
        reserved: dict[str, float] = {}
        for i in range(n):
            if results[i] is not None or i in stopped:
                continue
            outcome, request = _state(client, messages[i], max_attempts)
            if outcome is not None:
                results[i] = outcome
                continue
            key = request_key(request)
            if key not in todo:
                estimate = client.estimate(request) * client.tcfg.price.batch_discount
                if not budget.try_admit(estimate):
                    stopped.add(i)
                    continue
                todo[key], reserved[key] = request, estimate
            owners.setdefault(key, []).append(i)
        if not todo:
            break
        submission = await runner.submit(todo)
        await runner.finish(submission)
        for key in todo:
            cost = client.ledger.cost_of(key)
            await budget.settle(reserved[key], cost)
            for i in owners[key]:
                spent_per_input[i] += cost
                paid_per_input[i] += 1
    for i in range(n):
        if results[i] is None and i not in stopped:
            outcome, request = _state(client, messages[i], max_attempts)
            results[i] = outcome or Outcome(None, "batch_unfinished", request_key(request), 0, 0)
        if results[i] is not None and not results[i].cache_hit:
            results[i].cost_usd = spent_per_input[i]
            results[i].paid_calls = paid_per_input[i]
    client.batches_created = runner.created
    return results


def _state(client: TeacherClient, messages: list[dict], max_attempts: int) -> tuple[Outcome | None, dict]:
    """Where one input stands in the ledger: its outcome if decided, else the request to send next."""
    reason = None
    for attempt in range(max_attempts):
        request = client.build_request(messages, attempt)
        key = request_key(request)
        row = client.ledger.get(key)
        if row is not None:
            answer, _ = client.schema.parse(row["response"])
            return Outcome(answer, None, key, attempt, 0), request
        reason = client.ledger.last_failure(key)
        if reason not in ANSWER_REASONS:
            return None, request
    return Outcome(None, reason, key, max_attempts - 1, max_attempts), request
