"""The served scorer's bound (distill.serve.scored.bounded_tail_probs): candidates that cannot win nor move a
probability are never scored, and what comes back is the unpruned answer within the tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.serve import scored

V = 97  # the fake model's vocabulary: one token per character, ord(c) % V
HEAD = '{"intent": '
PROMPT = [ord(c) % V for c in "classify: the ticket text"]


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % V for c in text]}


class FakeModel:
    """log P(next | last token) from a fixed random table (``sharpness`` 0: flat). With ``answer``, a trained
    student's shape: where the sequence is the prompt + a prefix of ``answer``, its next token gets ``boost`` nats
    more. Counts the candidates it scores."""

    def __init__(self, seed: int, sharpness: float = 1.0, answer: list[int] | None = None, boost: float = 8.0,
                 bounded: bool = True):
        self.logits = np.random.default_rng(seed).normal(size=(V, V)) * sharpness
        self.answer, self.boost = answer, boost
        self.scored = 0
        if not bounded:
            self.path_logprobs = None

    def _row(self, ids):
        row = self.logits[ids[-1]].copy()
        done = ids[len(PROMPT):]
        if self.answer is not None and done == self.answer[:len(done)] and len(done) < len(self.answer):
            row[self.answer[len(done)]] += self.boost
        return row - np.logaddexp.reduce(row)

    def logprobs(self, ids, start):
        self.scored += 1
        return [float(self._row(ids[:j])[ids[j]]) for j in range(start, len(ids))]

    def path_logprobs(self, ids, start, want):
        self.scored += 1
        return [[float(self._row(ids[:j])[t]) for t in w] for j, w in zip(range(start, len(ids)), want)]


def _tails(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = set()
    while len(words) < n:  # shared stems, as intent names have: a few first letters, then random ones
        first = "abcde"[int(rng.integers(0, 5))]
        words.add(first + "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(2, 8)))))
    return [json.dumps(w) + "}" for w in sorted(words)]


def _trained(seed: int, tails: list[str], **kw) -> FakeModel:
    """A model that has learnt one of ``tails`` as this prompt's answer."""
    answer = tails[seed * 7 % len(tails)]
    return FakeModel(seed, answer=CharTokenizer()(HEAD + answer)["input_ids"], **kw)


def _probs(model, tails, tol):
    return scored.tail_probs(model, CharTokenizer(), PROMPT, HEAD, tails, tol=tol)


@pytest.mark.parametrize("seed", range(6))
def test_a_trained_model_scores_few_candidates_and_keeps_the_unpruned_winner_and_confidence(seed):
    tails = _tails(77, seed)
    full_model, pruned_model = _trained(seed, tails), _trained(seed, tails)
    full = _probs(full_model, tails, tol=0)
    pruned = _probs(pruned_model, tails, tol=scored.PRUNE_TOL)
    assert full_model.scored == 77
    assert pruned_model.scored < 77 / 2, pruned_model.scored
    best = int(full.argmax())
    assert tails[best] == tails[seed * 7 % 77]  # the learnt answer wins
    assert int(pruned.argmax()) == best
    assert pruned[best] == pytest.approx(full[best], rel=scored.PRUNE_TOL)
    assert pruned.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("sharpness", [0.0, 1.0])
def test_flat_scores_score_every_candidate_once_with_the_same_probabilities(sharpness):
    tails = _tails(30, 1)
    bounded = FakeModel(1, sharpness)
    probs = _probs(bounded, tails, tol=scored.PRUNE_TOL)
    assert bounded.scored <= 30  # never more than without the bound
    reference = _probs(FakeModel(1, sharpness), tails, tol=0)
    assert int(probs.argmax()) == int(reference.argmax())
    np.testing.assert_allclose(probs, reference, rtol=scored.PRUNE_TOL)


def test_a_model_without_path_logprobs_and_prefix_candidates_score_every_candidate():
    tails = _tails(20, 2)
    plain = _trained(2, tails, bounded=False)
    _probs(plain, tails, tol=scored.PRUNE_TOL)
    assert plain.scored == 20
    prefixes = ['"ab', '"abc', '"abd']  # '"ab' is a prefix of the others: the bound does not hold
    model = FakeModel(3, answer=CharTokenizer()(HEAD + '"abc')["input_ids"])
    probs = _probs(model, prefixes, tol=scored.PRUNE_TOL)
    assert model.scored == 3
    np.testing.assert_allclose(probs, _probs(FakeModel(3, answer=model.answer), prefixes, tol=0), rtol=1e-12)


def test_too_loose_a_tolerance_moves_the_confidence():
    """What keeps the confidence is the tolerance: at 0.5 the skipped mass shows (so the checks above can fail)."""
    moved = 0
    for seed in range(6):
        tails = _tails(77, seed)
        full = _probs(_trained(seed, tails, boost=3.0), tails, tol=0)
        loose = _probs(_trained(seed, tails, boost=3.0), tails, tol=0.5)
        best = int(full.argmax())
        moved += abs(loose[best] - full[best]) / full[best] > scored.PRUNE_TOL
    assert moved > 0
