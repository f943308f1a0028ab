"""Scored decoding's pruned trie against the full trie and against scoring each candidate on its own."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_overrides

from distill.config import load_config
from distill.student import scored, trie
from distill.student.template import end_of_turn, render_prompt
from distill.task import OutputSchema, Task, answer_head

TICKETS = ["I was charged twice this month", "the app crashes when I open settings, please help asap",
           "where is my parcel", "how do I change the email on my account?"]
STEMS = ["card", "card_arrival", "cash", "account", "top_up", "transfer", "exchange_rate", "pin", "refund",
         "beneficiary", "direct debit", "order"]
VALUES = [f"{s}_{e}" for s in STEMS for e in ("fee", "failed", "pending", "limit", "not_working", "x")]


TAUGHT = ["refund_fee", "card_arrival_failed", "order_pending", "account_limit"]  # one per ticket


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(task, flat model, peaked model, tokenizer): the tiny random student (flat scores), and a copy taught each
    ticket's answer (``{"intent": TAUGHT[i]}``), so its scores are peaked as a trained student's are."""
    from distill.student.models import load_base

    cfg = load_config(tiny_overrides(tmp_path_factory.mktemp("run"), "http://127.0.0.1:9/v1"))
    model, tokenizer = load_base(cfg)
    tokenizer.padding_side = "left"
    task = Task(cfg)
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in TICKETS]
    answers = [scored.token_ids(tokenizer, answer_head({}, "intent") + json.dumps(v) + "}" + eot) for v in TAUGHT]
    return task, model.eval(), _taught(copy.deepcopy(model), tokenizer, prompts, answers), tokenizer


def _taught(model, tokenizer, prompts: list[str], answers: list[list[int]], steps: int = 120):
    """``model`` trained on each prompt's answer tokens (the loss and the vocabulary projection on those only)."""
    ids, mask = scored.encode_left(tokenizer, [scored.token_ids(tokenizer, p) + a for p, a in zip(prompts, answers)])
    width = max(len(a) for a in answers)
    labels = ids[:, -width:].masked_fill(torch.tensor([[j < width - len(a) for j in range(width)]
                                                       for a in answers]), -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        hidden = model.model(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        logits = model.lm_head(hidden[:, -width - 1:-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()  # it learned the answers
    return model.eval()


def _prompt_cache(model, tokenizer, prompts):
    ids, mask = scored.encode_left(tokenizer, [scored.token_ids(tokenizer, p) for p in prompts])
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = out.cache if trie._cache_kw() == "cache" else out.past_key_values
    return cache, mask, torch.log_softmax(out.logits[:, -1].float(), -1)


def _three_ways(model, tokenizer, prompts, heads, tails, monkeypatch, **pruning):
    """(per-candidate reference, full trie, pruned trie) probabilities and the pruned pass's counts."""
    with torch.inference_mode():
        cache, mask, last_logp = _prompt_cache(model, tokenizer, prompts)
        reference = scored._tail_probs_per_candidate(model, tokenizer, cache, mask, last_logp, heads, tails)
        monkeypatch.setattr(scored, "_trie_scores", trie.trie_logprob)
        full = scored._tail_probs(model, tokenizer, cache, mask, last_logp, heads, tails)
        monkeypatch.setattr(scored, "_trie_scores",
                            lambda *a: trie.pruned_trie_logprob(*a, **pruning))
        trie.counts.clear()
        pruned = scored._tail_probs(model, tokenizer, cache, mask, last_logp, heads, tails)
    return reference, full, pruned, dict(trie.counts)


def _same_winner_and_confidence(a, b, rel: float) -> bool:
    wa, wb = a.argmax(-1), b.argmax(-1)
    ca, cb = a.max(-1).values, b.max(-1).values
    return bool(torch.equal(wa, wb) and ((ca - cb).abs() <= rel * cb).all())


@pytest.mark.parametrize("k", [3, 8, 30, len(VALUES)])
@pytest.mark.parametrize("last", [False, True])
def test_pruned_trie_gives_the_full_tries_winner_and_confidence(tiny, monkeypatch, k, last):
    """On the flat model and on the peaked one, at several k, as a middle and as a last field: the pruned trie's
    winner and confidence are the full trie's and the per-candidate reference's (confidence within PRUNE_TOL)."""
    task, flat, peaked, tokenizer = tiny
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in TICKETS]
    heads = [answer_head({}, "intent"), answer_head({"category": "billing"}, "intent"),
             answer_head({"n": 3}, "intent"), answer_head({}, "intent")]
    tails = [json.dumps(v) + ("}" + eot if last else ",") for v in VALUES[:k]]
    for model in (flat, peaked):
        reference, full, pruned, counts = _three_ways(model, tokenizer, prompts, heads, tails, monkeypatch)
        assert torch.allclose(full, reference, atol=1e-4, rtol=0)
        assert _same_winner_and_confidence(pruned, full, trie.PRUNE_TOL)
        assert _same_winner_and_confidence(pruned, reference, trie.PRUNE_TOL)
        assert torch.allclose(pruned.sum(-1), torch.ones(len(prompts)), atol=1e-5)


def test_the_peaked_model_really_skips_nodes_and_the_flat_one_costs_one_forward(tiny, monkeypatch):
    """Pruning pays where scores are peaked (most trie nodes never forwarded) and falls back to the full trie's one
    forward where they are flat (every node forwarded, nothing skipped)."""
    task, flat, peaked, tokenizer = tiny
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in TICKETS]
    heads = [answer_head({}, "intent")] * len(prompts)
    tails = [json.dumps(v) + "}" + eot for v in VALUES]
    *_, sharp = _three_ways(peaked, tokenizer, prompts, heads, tails, monkeypatch)
    *_, even = _three_ways(flat, tokenizer, prompts, heads, tails, monkeypatch)
    assert sharp["skipped"] > 2 * sharp["nodes"], sharp
    assert even.get("skipped", 0) == 0 and even["forwards"] == 1, even
    assert even["nodes"] >= sharp["nodes"] + sharp["skipped"] - len(prompts), (even, sharp)


@pytest.mark.parametrize("wrong", ["tolerance", "bound"])
def test_pruning_too_eagerly_is_caught(tiny, monkeypatch, wrong):
    """A branch dropped that does matter shows as a different winner or confidence, so the comparisons above would
    fail on a wrong bound: a loose tolerance (dropped branches may hold half the mass), or a prefix bound that is
    not one (the prefix's log-probability less 20 nats, as if a branch could not hold its prefix's mass)."""
    task, flat, peaked, tokenizer = tiny
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in TICKETS]
    heads = [answer_head({}, "intent")] * len(prompts)
    tails = [json.dumps(v) + "}" + eot for v in VALUES]
    # defer_margin=0: only the best branch goes first, the rest must pass the bound (the margin moves cost only)
    _, full, right, counts = _three_ways(peaked, tokenizer, prompts, heads, tails, monkeypatch, defer_margin=0.0)
    assert _same_winner_and_confidence(right, full, trie.PRUNE_TOL) and counts["forwards"] > 1
    if wrong == "bound":
        bound = trie._bound
        monkeypatch.setattr(trie, "_bound", lambda *a: (bound(*a)[0] - 20.0, bound(*a)[1]))
    _, full, pruned, counts = _three_ways(peaked, tokenizer, prompts, heads, tails, monkeypatch, defer_margin=0.0,
                                          **({"tol": 0.5} if wrong == "tolerance" else {}))
    assert counts["skipped"] > 0
    assert not _same_winner_and_confidence(pruned, full, trie.PRUNE_TOL)


def test_a_tolerance_outside_zero_one_is_refused(tiny):
    task, flat, peaked, tokenizer = tiny
    with pytest.raises(ValueError, match="relative probability in \\(0, 1\\)"):
        trie.pruned_trie_logprob(flat, tokenizer, None, None, None, [[[1, 2]]], [[0]], tol=0)


def test_scored_batch_answers_alike_with_and_without_pruning(tiny, monkeypatch):
    """The whole decoder (two enum fields, the second after the first's pick) gives the same answers and
    confidences through the pruned trie as through the full one."""
    task, flat, peaked, tokenizer = tiny
    eot = end_of_turn(tokenizer)
    schema = OutputSchema({"type": "object", "properties": {"intent": {"enum": VALUES}, "urgent": {"enum": [
        "yes", "no", "maybe"]}}, "required": ["intent", "urgent"]})
    prompts = [render_prompt(tokenizer, task.student_messages(t)) for t in TICKETS]
    runs = {}
    for name, fn in (("full", trie.trie_logprob), ("pruned", trie.pruned_trie_logprob)):
        monkeypatch.setattr(scored, "_trie_scores", fn)
        runs[name] = scored.scored_batch(peaked, tokenizer, prompts, schema, eot, 8)
    for (a, _, _, ca, fa), (b, _, _, cb, fb) in zip(runs["full"], runs["pruned"]):
        assert a == b and a is not None
        assert ca == pytest.approx(cb, rel=2 * trie.PRUNE_TOL)
