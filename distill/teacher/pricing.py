"""The one cost formula: tokens from text, dollars from tokens at ``teacher.price``, and the dry-run estimate.

    python -m distill generate recipe=support_tickets teacher=openai generate.dry_run=true

Two token counts, for two jobs. ``forecast_tokens`` is the expected count (``CHARS_PER_TOKEN`` characters per token,
right for English with common BPE tokenizers): what a dry run and the notebook's ``estimate`` print, and what the
client charges the tokens-per-minute limiter. ``prompt_token_bound`` is an upper bound for any tokenizer: what the
budget reserves before a call, so the cap is never crossed by a guess. ``usd`` is the only place tokens become
dollars; the client, the Batch API join, the dry run and evaluate's cost case all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.config import Config, Price
from distill.ledger import Ledger, request_key

CHARS_PER_TOKEN = 4  # the forecast: English text with a GPT-style BPE tokenizer
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers and separators of common chat templates (OpenAI's is 3-4)
TOKEN_BOUND = "utf8_bytes"  # which bound ``prompt_token_bound`` is, named in the dry-run estimate
COMPLETION_SHARE = 0.5  # the forecast assumes half of max_tokens is used; the bound assumes all of it


def message_chars(messages: list[dict]) -> int:
    """Characters of a chat prompt's text."""
    return sum(len(str(m.get("content") or "")) for m in messages)


def forecast_tokens(messages: list[dict]) -> float:
    """The expected prompt tokens of a chat prompt (``CHARS_PER_TOKEN`` characters each)."""
    return message_chars(messages) / CHARS_PER_TOKEN


def prompt_token_bound(messages: list[dict]) -> int:
    """An upper bound on a chat prompt's tokens for any tokenizer: one per UTF-8 byte (a byte-level BPE or a
    byte-fallback SentencePiece token covers at least one byte) plus the chat template's tokens per message.

    A characters-per-token guess is not a bound: CJK text runs at about one token per character (three bytes).
    The teacher's own tokenizer would be tighter, but it is not at hand offline for a remote teacher, and the
    bound only matters near the cap, where it makes the run stop a little early instead of late."""
    return sum(len(str(m.get("content") or "").encode("utf-8")) + TEMPLATE_TOKENS_PER_MESSAGE
               for m in messages) + TEMPLATE_TOKENS_PER_MESSAGE


def usd(price: Price, prompt_tokens: float, cached_tokens: float, completion_tokens: float, *,
        batch: bool = False) -> float:
    """Dollars for one call's tokens: cached prompt tokens at the cached price, the rest at the input price; the
    Batch API charges ``price.batch_discount`` of that."""
    total = ((prompt_tokens - cached_tokens) * price.input_per_1m + cached_tokens * price.cached_input_per_1m
             + completion_tokens * price.output_per_1m) / 1e6
    return total * price.batch_discount if batch else total


def is_free(price: Price) -> bool:
    """Whether a price list charges nothing (a local teacher)."""
    return not (price.input_per_1m or price.output_per_1m or price.cached_input_per_1m)


def upper_bound_usd(price: Price, request: dict, default_max_tokens: int, *, batch: bool = False) -> float:
    """What the budget admits one request at: ``prompt_token_bound`` prompt tokens and every completion token."""
    return usd(price, prompt_token_bound(request["messages"]), 0, request.get("max_tokens") or default_max_tokens,
               batch=batch)


def estimate(price: Price, requests: list[dict], default_max_tokens: int, *, votes: int = 1, batch: bool = False,
             ledger: Ledger | None = None) -> dict:
    """The pre-run estimate of the calls the ledger does not already hold: a forecast (``forecast_tokens``, half
    the completion budget used) and the upper bound the budget admits them at.

    Args:
        requests: attempt-0 requests (``messages`` and optionally ``max_tokens``), one per planned call.
        votes: calls per request (``generate.self_consistency``); requests and dollars are multiplied by it.
        batch: priced at the Batch API's ``price.batch_discount``.
        ledger: requests whose key it already answers are counted as paid, not priced.
    Returns:
        {"requests", "already_paid", "prompt_tokens", "completion_tokens", "usd", "upper_bound_usd", "token_bound"}.
    """
    todo = [r for r in requests if ledger is None or ledger.get(request_key(r)) is None]
    prompt_tokens = sum(forecast_tokens(r["messages"]) for r in todo)
    completion_tokens = sum(r.get("max_tokens") or default_max_tokens for r in todo) * COMPLETION_SHARE
    forecast = usd(price, prompt_tokens, 0, completion_tokens, batch=batch) * votes
    bound = sum(upper_bound_usd(price, r, default_max_tokens, batch=batch) for r in todo) * votes
    return {"requests": len(todo) * votes, "already_paid": len(requests) - len(todo),
            "prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "usd": round(forecast, 4), "upper_bound_usd": round(bound, 4), "token_bound": TOKEN_BOUND}


def estimate_run(cfg: Config, requests: list[dict], ledger: Ledger | None = None) -> dict:
    """``estimate`` for generate's labelling requests under ``cfg`` (its votes, its mode, the teacher's price)."""
    return estimate(cfg.teacher.price, requests, cfg.teacher.max_tokens, votes=cfg.generate.self_consistency,
                    batch=cfg.generate.mode == "batch", ledger=ledger)


@dataclass(frozen=True)
class DryRun:
    """What ``generate.dry_run=true`` returns instead of a stage summary: the estimate, and that nothing was sent.

    The pipeline stops after it without writing DONE.json; the CLI prints ``message`` and exits 0.
    """

    message: str
    estimate: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message
