"""Reading the teacher's answers: the outcome of one input, and readers for chat answers and top log-probs.

A reader turns either a stored ledger text (``text``) or a fresh response body (``body``) into (answer, reason);
its ``final`` reasons judge an answer the teacher gave, so the next attempt is a fresh sample, not a resend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

BUDGET = "budget"  # Outcome.reason of an input the budget cap stopped before it was asked: not a rejection
# Reasons that judge an answer the teacher gave: final for that request key (a new attempt is a new sample).
ANSWER_REASONS = frozenset({"empty", "invalid_json", "schema_violation", "refusal", "finish_length",
                            "content_filter"})


@dataclass
class Outcome:
    """The result of labelling one input."""

    answer: dict | None
    reason: str | None  # None on success, else why it was rejected
    key: str | None
    attempt: int
    paid_calls: int = 0
    cache_hit: bool = False
    cost_usd: float = 0.0
    confidence: dict | None = None  # per-field probability of the chosen value (score) or vote share (votes)
    # teacher.method=score: per field {value text: calibrated probability} (distill.teacher.scoring.value_distribution)
    distribution: dict | None = None
    retry_after_s: float | None = None  # the wait the teacher asked for when it refused (429/503 Retry-After)


@dataclass
class Asked:
    """One request key's result: an answer, or a reason; what it paid."""

    answer: dict | None
    reason: str | None
    paid: int = 0
    cost: float = 0.0
    cache_hit: bool = False
    final: bool = False  # the reason judges an answer (the next attempt is a fresh sample), not the transport
    retry_after_s: float | None = None  # the wait the teacher asked for when it refused (429/503 Retry-After)


class ChatReader:
    """Reads a chat answer: the stored text of a ledger row, or a fresh response body."""

    final = ANSWER_REASONS

    def __init__(self, parse):
        self.parse = parse

    def text(self, stored: str) -> tuple[dict | None, str | None]:
        answer, reason = self.parse(stored)
        return answer, None if answer is not None else f"cached_{reason}"

    def body(self, body: dict) -> tuple[str, dict | None, str | None]:
        choice = body["choices"][0]
        message = choice["message"]
        text = content_text(message.get("content"))
        answer, reason = self.parse(text)
        if message.get("refusal"):
            answer, reason = None, "refusal"
        elif choice.get("finish_reason") == "length":
            answer, reason = None, "finish_length"
        elif choice.get("finish_reason") == "content_filter":
            answer, reason = None, "content_filter"
        return text or "", answer, reason


class ScoreReader:
    """Reads the first answer token's top log-probs."""

    final = frozenset({"no_logprobs"})

    def text(self, stored: str) -> tuple[dict | None, str | None]:
        return {"top": json.loads(stored)}, None

    def body(self, body: dict) -> tuple[str, dict | None, str | None]:
        logprobs = body["choices"][0].get("logprobs") or {}
        content = logprobs.get("content") or []
        if not content or not content[0].get("top_logprobs"):
            return "server returned no top_logprobs", None, "no_logprobs"
        top = [[t["token"], float(t["logprob"])] for t in content[0]["top_logprobs"]]
        return json.dumps(top), {"top": top}, None


def content_text(content) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts (as some servers answer)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type", "text") in ("text", "output_text"))
    raise TypeError(f"message content is a {type(content).__name__}, not text or a list of parts")


def parse_text(text: str | None) -> tuple[dict | None, str | None]:
    """A free-text answer (synthesis): ``{"text": ...}``, or ``empty`` when under 8 characters."""
    text = (text or "").strip().strip('"').strip()
    return ({"text": text}, None) if len(text) >= 8 else (None, "empty")


def usage_tokens(usage: dict | None) -> tuple[int, int, int]:
    """(prompt, cached prompt, completion) tokens of a response's ``usage`` object (missing parts read as 0)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return usage.get("prompt_tokens") or 0, cached, usage.get("completion_tokens") or 0
