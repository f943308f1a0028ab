"""Evaluate's scored decode (``eval.decode=scored``) for one request, over any model that gives token log-probs.

    from distill.serve.scored import scored_answer
    result = scored_answer(model, tokenizer, prompt_ids, schema, eot, max_new_tokens=48)
    result.answer, result.confidence, result.field_confidence

This is the confidence ``routing.yaml``'s threshold was chosen on, computed the way evaluate computes it
(``distill.stages.evaluate._scored_batch``), one item at a time instead of a padded batch:

- fields are filled in schema order; the answer text so far is evaluate's canonical head (``{"a": "x", "b": ``);
- an enum field's allowed values are each scored by the summed log-probability of their tokens after the head
  (the value, then ``,`` or ``}`` + the end-of-turn token for the last field; the tokens counted start where the
  head's own tokenization and the head + value's part ways), and the softmax over the allowed values gives the
  value and its probability, rounded to 6 decimals as evaluate stores it; values that can neither win nor move a
  probability by more than ``PRUNE_TOL`` are bounded, not scored (``bounded_tail_probs``), as evaluate's trie does;
- a free field is a scored JSON literal (true / false / null) where its type allows one, else a string generated
  greedily after an opening quote, with the mean token probability as its confidence;
- the whole answer's confidence is the product of the field confidences; an answer that breaks the schema has none.

Token ids come from the artifact's own Hugging Face tokenizer (``publish/model/hf``), exactly as evaluate tokenizes
(no special tokens added); the log-probs come from ``model`` (the published GGUF in llama.cpp in the student
runtime). On the tiny test model's f32 GGUF the numbers match evaluate's within 1e-5 (float32, and evaluate's
6-decimal rounding of each field); a quantized GGUF gives its own, slightly different, probabilities (q8_0: within
4e-4 there): that is the served artifact's confidence, and publish chooses routing.yaml's threshold on it (it
scores the val split with this code through the runtime's ``Scorer``: distill.stages.publish.parity).

``value_written`` and ``read_value`` (where a free field's generation stops, and its value and confidence) are
evaluate's too: ``distill.student.scored`` calls them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from distill.task import OutputSchema, answer_head, common_prefix, dump_answer, literal_options

PRUNE_TOL = 1e-4  # relative: how far a skipped candidate may move any softmax probability, in the worst case


class TokenModel(Protocol):
    """A causal LM that scores and extends token sequences."""

    def logprobs(self, ids: list[int], start: int) -> list[float]:
        """log P(ids[j] | ids[:j]) for j = start .. len(ids) - 1 (start >= 1)."""

    def greedy(self, ids: list[int], max_new_tokens: int, stop_id: int,
               done: Callable[[list[int]], bool]) -> tuple[list[int], list[float]]:
        """Greedy continuation of ``ids`` and each new token's log-prob; stops after ``stop_id`` or when
        ``done(new_tokens)`` holds."""

    # Optional, ``path_logprobs(ids, start, want) -> list[list[float]]``: for j = start .. len(ids) - 1, the
    # log-probs at position j of the tokens in ``want[j - start]`` (log P(t | ids[:j])). With it, ``tail_probs``
    # bounds the candidates it has not scored and skips those that cannot matter (``bounded_tail_probs``).
    # Optional, ``trie_rows(seqs, starts) -> TokenModel | None``: a model that answers ``logprobs`` and
    # ``path_logprobs`` for exactly these candidates from rows it computed at once (the runtime's tree decode);
    # ``tail_probs`` then scores and bounds the candidates on it, as it would on the model itself.


@dataclass
class ScoredAnswer:
    answer: dict | None                 # None: the answer breaks the schema (evaluate counts it invalid)
    text: str                           # the canonical answer text, or what the model wrote where it went wrong
    invalid_reason: str | None
    confidence: float | None            # product of the field confidences; None without a valid answer
    field_confidence: dict = field(default_factory=dict)
    prompt_tokens: int = 0


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]





def tail_probs(model: TokenModel, tokenizer, prompt_ids: list[int], head: str, tails: list[str],
               tol: float = PRUNE_TOL) -> np.ndarray:
    """Probabilities of each tail after the prompt and the answer head, normalised over the tails (by
    ``bounded_tail_probs`` where the model has ``path_logprobs``; ``tol=0`` scores every tail)."""
    head_ids = _ids(tokenizer, head)
    seqs, starts = [], []
    for tail in tails:
        full = _ids(tokenizer, head + tail)
        seqs.append(prompt_ids + full)
        starts.append(len(prompt_ids) + common_prefix(head_ids, full))
    trie = getattr(model, "trie_rows", None)
    rows = trie(seqs, starts) if trie is not None else None
    if rows is not None:  # every row the candidates can ask for, from one decode: the same scores, no more calls
        model = rows
    if getattr(model, "path_logprobs", None) is not None and tol > 0 and len(tails) > 2:
        scores = bounded_tail_probs(model, seqs, starts, tol)
        if scores is not None:
            return _softmax(scores)
    return _softmax(np.asarray([sum(model.logprobs(q, s)) for q, s in zip(seqs, starts)], dtype=np.float64))


def bounded_tail_probs(model, seqs: list[list[int]], starts: list[int], tol: float) -> np.ndarray | None:
    """Each candidate's log-likelihood (``seqs[i]`` from ``starts[i]`` on), scoring only those that can matter.

    The candidates form a token trie after each context (``seqs[i][:starts[i]]``). Scoring one candidate gives the
    log-probs at every node on its path, so every child of those nodes gets a bound: its prefix's log-likelihood,
    which no candidate under it can exceed, and which the candidates under it cannot exceed together. The next
    candidate scored is one under the open child with the highest bound. Scoring stops once no open child's bound
    reaches the best scored candidate (none can win) and their bounds sum to at most ``tol`` times the scored
    candidates' probability (none can move a probability by more than ``tol`` relative); the candidates under an
    open child then get half its bound, split evenly, as ``distill.student.trie`` does. So the winner is the
    unpruned argmax, every scored probability is within ``tol / 2`` relative, and no more candidates are scored
    than without the bound (flat scores: all of them, each once). None where one candidate's tokens are a prefix
    of another's (the bound does not hold): the caller scores every candidate."""
    paths = [tuple(q[s:]) for q, s in zip(seqs, starts)]
    ctxs = [tuple(q[:s]) for q, s in zip(seqs, starts)]
    under: dict[tuple, list[int]] = {}       # (context, token prefix) -> candidates under it
    for i, (c, p) in enumerate(zip(ctxs, paths)):
        for d in range(len(p) + 1):
            under.setdefault((c, p[:d]), []).append(i)
    if any(len(under[(c, p)]) > 1 for c, p in zip(ctxs, paths)):
        return None
    children: dict[tuple, list[int]] = {}
    for (c, p) in under:
        if p:
            children.setdefault((c, p[:-1]), []).append(p[-1])
    scores = np.full(len(seqs), np.nan)
    open_: dict[tuple, float] = {(c, ()): 0.0 for c in set(ctxs)}   # nodes not on a scored path, their bound
    expanded: set[tuple] = set()                                      # nodes on a scored path
    while open_:
        node = max(open_, key=open_.__getitem__)
        done = scores[~np.isnan(scores)]
        if done.size and open_[node] < done.max():
            mass = float(np.logaddexp.reduce(list(open_.values())))
            if mass <= math.log(tol) + float(np.logaddexp.reduce(done)):
                for (c, p), b in open_.items():
                    members = under[(c, p)]
                    scores[members] = b + math.log(0.5 / len(members))
                return scores
        i = min(under[node], key=lambda i: seqs[i])
        c, p = ctxs[i], paths[i]
        want = [[p[d]] if (c, p[:d]) in expanded else children[(c, p[:d])] for d in range(len(p))]
        rows = model.path_logprobs(seqs[i], starts[i], want)
        logp = 0.0
        for d, (kids, row) in enumerate(zip(want, rows)):
            open_.pop((c, p[:d]), None)
            expanded.add((c, p[:d]))
            for t, lp in zip(kids, row):
                if t != p[d]:
                    child = (c, p[:d] + (t,))
                    if not children.get(child) and len(under[child]) == 1:  # a whole candidate: scored already
                        scores[under[child][0]] = logp + lp
                    else:
                        open_[child] = logp + lp
            logp += row[kids.index(p[d])]
        scores[i] = logp
    return scores


def _softmax(logp: np.ndarray) -> np.ndarray:
    probs = np.exp(logp - logp.max())
    return probs / probs.sum()


def scored_answer(model: TokenModel, tokenizer, prompt_ids: list[int], schema: OutputSchema, eot: str,
                  max_new_tokens: int) -> ScoredAnswer:
    """The student's answer and confidence for one rendered prompt, by evaluate's scored decode (module docstring).

    Args:
        model: token log-probs of the served artifact.
        tokenizer: the artifact's Hugging Face tokenizer (the one train and evaluate used).
        prompt_ids: the rendered student prompt's token ids (``template.render_prompt``, no special tokens added).
        schema: the task's output schema.
        eot: the end-of-turn token the student was trained to end its answer with.
        max_new_tokens: the budget for a generated string field (``eval.max_new_tokens``).
    Returns:
        ScoredAnswer; never raises on a bad answer (it is marked invalid with evaluate's reason).
    """
    answer: dict = {}
    fconf: dict = {}
    broken = written = None
    fields = schema.fields
    for i, name in enumerate(fields):
        last = i == len(fields) - 1
        head = answer_head(answer, name)
        if name in schema.enums:
            values = schema.enums[name]
            tails = [json.dumps(v, ensure_ascii=False) + ("}" + eot if last else ",") for v in values]
            probs = tail_probs(model, tokenizer, prompt_ids, head, tails)
            best = int(probs.argmax())
            answer[name], fconf[name] = values[best], round(float(probs[best]), 6)
            continue
        options = literal_options(schema, name)
        prefix = '"' if '"' in options else ""
        if len(options) > 1:
            probs = tail_probs(model, tokenizer, prompt_ids, head, options)
            best = int(probs.argmax())
            if options[best] != '"':
                answer[name], fconf[name] = json.loads(options[best]), round(float(probs[best]), 6)
                continue
        value, conf, why, text = _generate_value(model, tokenizer, prompt_ids, head + prefix, eot, max_new_tokens,
                                                 prefix)
        answer[name], fconf[name] = value, conf
        if why and not broken:  # keep what the model really wrote where it went wrong
            broken, written = why, head + prefix + text
    why = broken or ("schema_violation" if schema.errors(answer) else None)
    if why:
        return ScoredAnswer(None, written or dump_answer(answer), why, None, fconf, len(prompt_ids))
    return ScoredAnswer(answer, dump_answer(answer), None, float(np.prod(list(fconf.values()))), fconf,
                        len(prompt_ids))


def _generate_value(model: TokenModel, tokenizer, prompt_ids: list[int], head: str, eot: str, max_new_tokens: int,
                    prefix: str) -> tuple:
    """A greedy JSON value after ``head``: (value, mean token probability, invalid reason, text), as evaluate's
    ``_generate_values``. ``prefix`` is what the head already opened (``"`` for a string)."""
    stop_id = tokenizer.convert_tokens_to_ids(eot)
    row, logps = model.greedy(prompt_ids + _ids(tokenizer, head), max_new_tokens, stop_id,
                              lambda new: value_written(tokenizer, new, prefix))
    return read_value(tokenizer, row, logps, prefix)


_DECODER = json.JSONDecoder()


def value_written(tokenizer, row: list[int], prefix: str = "") -> bool:
    """Whether generated tokens ``row`` (after ``prefix``, what the head opened) hold a whole JSON value followed
    by something (`"x",`, `12}`): where a free field's greedy generation stops, in evaluate and in the runtime."""
    text = (prefix + tokenizer.decode(row, skip_special_tokens=True)).lstrip()
    try:
        return _DECODER.raw_decode(text)[1] < len(text)
    except json.JSONDecodeError:
        return False


def read_value(tokenizer, row: list[int], logps, prefix: str = "") -> tuple:
    """A free field's value from its generated tokens: (value, confidence, invalid reason, text written).

    Shared by evaluate (``distill.student.scored``) and the runtime. The value is the JSON value the text after
    ``prefix`` opens with; its confidence is exp of the mean log-prob (``logps``, one per token of ``row``) of the
    tokens up to the value's end, rounded to 6 decimals; text that opens with no JSON value is ``invalid_json``."""
    text = tokenizer.decode(row, skip_special_tokens=True)
    stripped = (prefix + text).lstrip()
    try:
        value, end = _DECODER.raw_decode(stripped)
    except json.JSONDecodeError:
        return None, None, "invalid_json", text
    end += len(prefix + text) - len(stripped) - len(prefix)
    used = next((i for i in range(1, len(row) + 1)
                 if len(tokenizer.decode(row[:i], skip_special_tokens=True)) >= end), len(row))
    return value, round(float(math.exp(np.mean(logps[:used]))), 6), None, text
