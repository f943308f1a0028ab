"""Label fixed-value fields by log-probability scoring with contextual calibration (``teacher.method=score``).

A small teacher asked to write JSON collapses onto one or two favourite labels. Asked instead for one field at a
time, the first answer token's log-probabilities rank every allowed value; subtracting each value's mean score
over all inputs removes the model's prior for that value (contextual calibration, Zhao et al. 2021, "Calibrate
Before Use"), which on the embedded 135M teacher lifts accuracy well above its free-form answers (BENCHMARKS.md).

One 1-token request per input and field, field by field so a server's prompt cache keeps the shared prefix.
Works with any OpenAI-compatible server that returns ``top_logprobs`` for chat completions (OpenAI: up to 20;
llama.cpp's server when started with logits_all).
"""

from __future__ import annotations

import math
import re

import numpy as np

from distill.task import Task, value_text

TOP_LOGPROBS = 20


def field_messages(task: Task, text: str, field: str, shots: list[tuple[str, dict]] | None = None) -> list[dict]:
    """Instructions + few-shot turns answering only ``field``, then the input: static text first."""
    values = [value_text(v) for v in task.schema.enums[field]]  # an enum of numbers or booleans reads as JSON
    system = (f"{task.teacher_system}\n\nFor this request answer with the {field} only, exactly one of: "
              f"{', '.join(values)}.")
    messages = [{"role": "system", "content": system}]
    for shot_text, label in task.few_shot if shots is None else shots:
        messages.append({"role": "user", "content": shot_text})
        messages.append({"role": "assistant", "content": value_text(label[field])})
    messages.append({"role": "user", "content": text})
    return messages


def _lead(text: str) -> str:
    """A value's first word, lower-case: ``check`` of ``check_invoice``, ``card`` of ``cardArrival``."""
    split = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text).lower()
    return next((w for w in re.split(r"[^0-9a-z]+", split) if w), split.strip())


def first_token_ties(values: list) -> list[tuple[str, str]]:
    """Pairs of values that first-token scoring cannot tell apart: the same first word (``check_invoice``,
    ``check_refund_policy``: both begin with the token ``check``), or one value's text beginning another's
    (``high``, ``highest``: any token that begins the first begins the second). ``value_scores`` gives such values
    the same score or ranks the longer one first whatever the input, so their labels would be arbitrary. Decided on
    the text, without the teacher's tokenizer: a rule that holds for the subword tokenizers of chat models."""
    texts = [value_text(v) for v in values]
    ties = []
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            la, lb = a.lower(), b.lower()
            if _lead(a) == _lead(b) or la.startswith(lb) or lb.startswith(la):
                ties.append((a, b))
    return ties


def _norm(token: str) -> str:
    return token.strip().strip('"\'`').lower()


def value_scores(top: list[tuple[str, float]], values: list) -> list[float]:
    """Score each allowed value by the best first-token log-prob that could begin it.

    A token counts for a value when the value starts with it (``bill`` -> ``billing``). Values with no candidate
    in the top list get a floor just below the lowest log-prob seen. Values that are not strings (``enum: [1, 2]``)
    are matched by their JSON text; the caller keeps the typed value of the index chosen.
    """
    floor = (min(lp for _, lp in top) if top else -30.0) - 1.0
    scores = []
    for value in values:
        v = value_text(value).lower()
        best = -math.inf
        for token, logprob in top:
            t = _norm(token)
            if t and (v.startswith(t) or v.replace("_", " ").startswith(t)):
                best = max(best, logprob)
        scores.append(best if best > -math.inf else floor)
    return scores


def few_shot_log_prior(labels: list, values: list) -> np.ndarray:
    """Log of the value frequencies among the few-shot labels, add-one smoothed: the distribution we expect.

    Labels and values are compared as text, so a typed value (``2``, ``true``) counts whether the caller passes
    it typed, as JSON text or as ``str()`` of it."""
    def texts(v) -> set[str]:
        return {value_text(v), str(v)}

    counts = np.array([sum(1 for label in labels if value_text(label) in texts(v)) + 1.0 for v in values])
    return np.log(counts / counts.sum())


def calibrated_probs(scores: np.ndarray, enabled: bool = True,
                     log_prior: np.ndarray | None = None) -> np.ndarray:
    """The (inputs x values) matrix of calibrated probabilities from an (inputs x values) matrix of log-prob scores.

    Scores are renormalised over the allowed values; with calibration each value's mean log-prob over the inputs
    (the model's own bias) is subtracted and the expected log-prior added back (a uniform prior when none is given),
    then each row is a softmax. A value the server's top_logprobs did not return scores the floor of
    ``value_scores`` (just below the lowest log-prob it returned), so it keeps a small probability, not zero.
    """
    logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    if enabled and len(scores) > 1:
        logp = logp - logp.mean(axis=0, keepdims=True)
        if log_prior is not None:
            logp = logp + log_prior
    probs = np.exp(logp - logp.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def calibrate(scores: np.ndarray, enabled: bool = True,
              log_prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-input label index and confidence (the calibrated probability of the chosen value) from an
    (inputs x values) matrix of log-prob scores (``calibrated_probs``)."""
    probs = calibrated_probs(scores, enabled, log_prior)
    return probs.argmax(axis=1), probs.max(axis=1)


def value_distribution(probs: np.ndarray, values: list, digits: int = 4) -> dict[str, float]:
    """One input's calibrated distribution as {value text: probability}, most probable first, rounded to ``digits``;
    values that round to 0 are left out (a reader takes a missing value as 0) to keep data files compact."""
    pairs = sorted(((value_text(v), round(float(p), digits)) for v, p in zip(values, probs)), key=lambda kv: -kv[1])
    return {text: p for text, p in pairs if p > 0}
