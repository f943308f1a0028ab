"""``generate.mode=batch``: the OpenAI Batch API at half price, restart-safe and safe for runs sharing a ledger.

Each round first finishes every open submission in the ledger (this run's or any other's), then claims the requests
nobody holds: in one ledger transaction it picks the keys that are not answered, not in an open batch and not
claimed online, reserves each one's upper-bound price under the cap, and records the submission and its lines
*before* anything is uploaded. Only the process that recorded a submission uploads and creates it (another one takes
over if that owner's claim on the upload lapses before a batch id is recorded), with the submission id in the
batch's metadata: a process that died between the create call and recording its answer is found by that metadata,
so a batch is never created twice, and every batch id ever created is kept (``batch_ids``).

Results are joined by ``custom_id`` in one transaction that also marks the submission done, so two runs never join
one batch twice. Valid answers go to the ledger like online ones (at the batch price); invalid answers are retried
as fresh samples in the next round; an output line that cannot be read is kept raw (read again by the next run,
never bought again) and errored or expired lines go back to the queue. A batch the API no longer knows (404) is
marked lost and its lines are queued again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import openai

from distill import DistillError, paths, runio
from distill.ledger import request_key
from distill.teacher.answers import ANSWER_REASONS, BUDGET, ChatReader, Outcome, usage_tokens
from distill.teacher.client import TeacherClient
from distill.teacher.request import wire_body
from distill.teacher.transport import RequestFailed

log = logging.getLogger("distill")

FINAL_STATUSES = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/chat/completions"


class BatchLost(Exception):
    """The Batch API does not know a batch id the ledger recorded (HTTP 404)."""


class BatchRunner:
    def __init__(self, client: TeacherClient, cfg, run_dir_generate):
        self.client = client
        self.ledger = client.ledger
        self.owner = client.budget.owner
        self.lease_s = client.budget.lease_s
        self.bcfg = cfg.generate.batch
        self.folder = run_dir_generate / "batches"
        self.created = 0  # batches this process created (the rest were found and polled)

    async def _api(self, fn, *args, **kwargs):
        try:
            return await self.client.retrying(fn, *args, **kwargs)
        except RequestFailed as exc:
            raise DistillError(f"the Batch API at {self.client.base_url} failed: {exc.reason} {exc.detail}; "
                               f"rerun to resume (submitted batches are polled, not resubmitted)") from None

    def claim(self, candidates: list[tuple[str, dict, float]], cap: float | None) -> tuple[str | None, list[str],
                                                                                         list[str], bool]:
        """Claim what nobody holds: (submission or None, its keys, keys over the cap, whether we must create it)."""
        return self.ledger.claim_batch_round(self.owner, candidates, cap=cap, lease_s=self.lease_s)

    async def create(self, submission: str) -> None:
        """Upload and create a submission this process owns (unless its batch turns out to exist already)."""
        rec = self.ledger.batch(submission)
        if rec["input_file_id"] is None:
            bodies = self.ledger.batch_lines(submission)
            path = self.folder / f"{submission[:16]}.jsonl"
            runio.write_jsonl(path, [{"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
                                     for key, body in bodies.items()])
            uploaded = await self._api(self.client.client.files.create, file=(path.name, path.read_bytes()),
                                       purpose="batch")
            self.ledger.record_batch(submission, input_file_id=uploaded.id, status="uploaded")
        await self._ensure_created(submission, owner=True)

    async def _ensure_created(self, submission: str, owner: bool) -> str | None:
        """The batch id of a submission: recorded, found by its metadata, or (as its owner) created now. None when
        another live process owns the upload and has not recorded the id yet."""
        rec = self.ledger.batch(submission)
        if rec["batch_id"]:
            return rec["batch_id"]
        if not owner:
            if not self.ledger.take_over_batch(submission, self.owner, self.lease_s):
                return None
            if rec["input_file_id"] is None:
                await self.create(submission)
                return self.ledger.batch(submission)["batch_id"]
        rec = self.ledger.batch(submission)

        # Maybe the create call went through and its owner died before recording it: look for our metadata first.
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
        deadline = time.monotonic() + self.bcfg.timeout_h * 3600
        while (batch_id := await self._ensure_created(submission, owner=False)) is None:
            if (self.ledger.batch(submission) or {}).get("status") not in ("claimed", "uploaded", "submitted"):
                return {}
            await asyncio.sleep(min(self.bcfg.poll_interval_s, 1.0))  # another run is uploading it
        while True:
            try:
                batch = await self._api(self._retrieve, batch_id)
            except BatchLost:
                n = len(self.ledger.batch_lines(submission))
                self.ledger.record_batch(submission, status="lost")
                log.warning("batch %s is unknown to the Batch API (HTTP 404): marked lost, its %d requests are "
                            "queued again", batch_id, n)
                return {"lost": n}
            if batch.status in FINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                raise DistillError(f"batch {batch_id} still {batch.status} after {self.bcfg.timeout_h} h; rerun "
                                   f"later to keep polling it (nothing is resubmitted)")
            if (self.ledger.batch(submission) or {}).get("status") == "done":
                return {"already_joined": 1}  # another run joined it while we polled
            await asyncio.sleep(self.bcfg.poll_interval_s)
        content = None
        if batch.output_file_id:
            content = await self._api(self.client.client.files.content, batch.output_file_id)
        counts, rows = self._join_rows(submission, content.text if content is not None else "")
        counts["errored"] += (batch.request_counts.failed if batch.request_counts else 0)
        if not self.ledger.join_batch(submission, *rows):
            counts = {"already_joined": sum(counts.values())}
        log.info("batch %s %s: %s", batch_id, batch.status, counts)
        return counts

    async def _retrieve(self, batch_id: str):
        try:
            return await self.client.client.batches.retrieve(batch_id)
        except openai.NotFoundError:
            raise BatchLost(batch_id) from None

    def _join_rows(self, submission: str, text: str) -> tuple[dict[str, int], tuple[list, list, list]]:
        """The ledger rows for a batch's output file; a line that cannot be read never stops the join."""
        counts = {"ok": 0, "invalid": 0, "errored": 0, "unreadable": 0, "already_joined": 0}
        successes, failures, raws = [], [], []
        bodies = self.ledger.batch_lines(submission)
        model = self.client.tcfg.model or ""
        reader = ChatReader(self.client.schema.parse)
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, response = item.get("custom_id"), item.get("response") or {}
            except (json.JSONDecodeError, AttributeError):
                counts["unreadable"] += 1  # no custom_id to join on: its request goes back to the queue
                continue
            if key not in bodies or not isinstance(response, dict) or response.get("status_code") != 200:
                counts["errored"] += 1
                continue
            if self.ledger.get(key) is not None or self.ledger.last_failure(key) in ANSWER_REASONS:
                counts["already_joined"] += 1
                continue
            completion = response.get("body") if isinstance(response.get("body"), dict) else {}
            usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
            tokens = usage_tokens(usage)
            cost = self.client.cost(*tokens, batch=True)
            request = {**bodies[key]}
            try:
                answer_text, answer, reason = reader.body(completion)
            except Exception as exc:  # noqa: BLE001 - any odd shape: keep it raw, read it again next run
                log.warning("batch line %s kept unread (%s)", key[:12], type(exc).__name__)
                raws.append((key, model, runio.canonical_json(request), json.dumps(completion), *tokens, cost, 0.0))
                counts["unreadable"] += 1
                continue
            if answer is None:
                failures.append((key, reason, answer_text[:200], tokens[0], tokens[2], cost))
                counts["invalid"] += 1
            else:
                successes.append((key, model, runio.canonical_json(request), answer_text, *tokens, cost, 0.0))
                counts["ok"] += 1
        return counts, (successes, failures, raws)


async def label_batch(client: TeacherClient, cfg, messages: list[list[dict]], budget, run_dir) -> list:
    """Outcomes for every input, in order; ``Outcome(reason=BUDGET)`` where the budget stopped it."""
    runner = BatchRunner(client, cfg, paths.stage_dir(run_dir, "generate"))
    n = len(messages)
    max_attempts = client.max_attempts
    results: list = [None] * n
    for i in range(n):  # decided before this run sent anything: ledger hits
        outcome, _ = _state(client, messages[i], max_attempts)
        if outcome is not None:
            outcome.cache_hit = True
            results[i] = outcome
    touched: set[str] = set()  # keys this run claimed into a batch of its own
    stopped: set[int] = set()
    for _ in range(cfg.generate.batch.max_rounds + max_attempts):
        for submission, _ in runner.ledger.open_batches():  # any run's open batches: poll and join, never resubmit
            await runner.finish(submission)
        candidates, owners = [], {}
        for i in range(n):
            if results[i] is not None:
                continue
            outcome, request = _state(client, messages[i], max_attempts)
            if outcome is not None:
                results[i] = outcome
                continue
            key = request_key(request)
            if key not in owners:
                estimate = client.estimate(request, batch=True)
                candidates.append((key, wire_body(request), estimate))
            owners.setdefault(key, []).append(i)
        if not candidates:
            break
        submission, keys, over_cap, mine = runner.claim(candidates, budget.cap)
        if submission is None:
            if over_cap and not runner.ledger.open_batches():
                budget.stopped = True
                stopped.update(i for key in over_cap for i in owners[key])
                break
            await asyncio.sleep(min(cfg.generate.batch.poll_interval_s, 1.0))  # another run holds them
            continue
        touched.update(keys)
        if mine:
            await runner.create(submission)
        await runner.finish(submission)
    for i in range(n):
        outcome, request = _state(client, messages[i], max_attempts)
        if results[i] is None:
            key = request_key(request)
            results[i] = outcome or Outcome(None, BUDGET if i in stopped else "batch_unfinished", key, 0, 0)
        if not results[i].cache_hit:
            keys = [request_key(client.build_request(messages[i], a)) for a in range(max_attempts)]
            mine = [k for k in keys if k in touched]
            results[i].cost_usd = sum(client.ledger.cost_of(k) for k in mine)
            results[i].paid_calls = len(mine)
            budget.charged(results[i].cost_usd)
    client.batches_created = runner.created
    return results


def _state(client: TeacherClient, messages: list[dict], max_attempts: int) -> tuple[Outcome | None, dict]:
    """Where one input stands in the ledger: its outcome if decided, else the request to send next."""
    reason = None
    reader = ChatReader(client.schema.parse)
    for attempt in range(max_attempts):
        request = client.build_request(messages, attempt)
        key = request_key(request)
        row = client.ledger.get(key)
        if row is not None:
            answer, _ = client.schema.parse(row["response"])
            return Outcome(answer, None, key, attempt, 0), request
        raw = client.ledger.raw(key)
        if raw is not None:  # kept unread by an earlier join: read it now, at no cost
            got = client.read_raw_now(key, request, raw, reader)
            if got.answer is not None:
                return Outcome(got.answer, None, key, attempt, 0), request
            if got.reason not in ANSWER_REASONS:
                return Outcome(None, got.reason, key, attempt, 0), request
        reason = client.ledger.last_failure(key)
        if reason not in ANSWER_REASONS:
            return None, request
    return Outcome(None, reason, key, max_attempts - 1, max_attempts), request
