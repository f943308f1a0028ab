"""The scored decoder: an answer filled field by field, each enum value ranked by its teacher-forced log-likelihood.

    from distill.student.scored import scored_batch
    for answer, text, invalid_reason, confidence, field_confidence in scored_batch(model, tokenizer, prompts, ...):

The prompts' KV cache is computed once; each enum field's allowed values are scored after the answer so far as one
token trie per item (tree attention), branches that cannot change the winner or move its confidence by more than
distill.student.trie.PRUNE_TOL skipped, so the cost grows little with the number of values
(benchmarks/scored_decoding.py). A free-text field is generated greedily after the answer so far; where it stops and
how its value and confidence are read are the served student's own functions (distill.serve.scored.value_written,
read_value), which ranks values by the same rule, one item at a time.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch

from distill.serve.scored import read_value, value_written
from distill.student.trie import _cache_kw, pruned_trie_logprob, trie_logprob
from distill.task import OutputSchema, answer_head, common_prefix, dump_answer, literal_options


def encode_left(tokenizer, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the left, so every row's last token is the last column."""
    width = max(len(x) for x in id_lists)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in id_lists])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in id_lists])
    return ids, mask


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` as the prompt renders it (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def scored_batch(model, tokenizer, prompts: list[str], schema: OutputSchema, eot: str, max_new_tokens: int):
    """(answer, text, invalid reason, confidence, field confidences) per prompt: fields filled in schema order, an
    enum field's value picked by the softmax over its allowed values, the answer's confidence the product of the
    field confidences. A broken answer keeps what the model wrote and its reason; it never raises."""
    device = model.device
    prompt_ids = [token_ids(tokenizer, p) for p in prompts]
    ids, mask = encode_left(tokenizer, prompt_ids)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.cache if _cache_kw() == "cache" else out.past_key_values
    last_logp = torch.log_softmax(out.logits[:, -1].float(), -1)
    n = len(prompts)
    answers: list[dict] = [{} for _ in range(n)]
    fconf: list[dict] = [{} for _ in range(n)]
    broken: list[str | None] = [None] * n
    written: list[str | None] = [None] * n
    fields = schema.fields
    for i, name in enumerate(fields):
        last = i == len(fields) - 1
        heads = [answer_head(a, name) for a in answers]
        if name in schema.enums:
            values = schema.enums[name]
            tails = [json.dumps(v, ensure_ascii=False) + ("}" + eot if last else ",") for v in values]
            probs = _tail_probs(model, tokenizer, cache, mask, last_logp, heads, tails)
            best = probs.argmax(-1)
            for b in range(n):
                answers[b][name] = values[int(best[b])]
                fconf[b][name] = round(float(probs[b, best[b]]), 6)
        else:
            # The JSON type is decided by scoring, not left to the model: a boolean or null is a scored literal,
            # a string is forced to open with '"' and only its content is generated.
            options = literal_options(schema, name)
            gen_rows = list(range(n))
            prefix = '"' if options == ['"'] else ""
            if len(options) > 1:
                probs = _tail_probs(model, tokenizer, cache, mask, last_logp, heads, options)
                best = probs.argmax(-1)
                gen_rows = []
                for b in range(n):
                    choice = options[int(best[b])]
                    if choice == '"':
                        gen_rows.append(b)
                    else:
                        answers[b][name] = json.loads(choice)
                        fconf[b][name] = round(float(probs[b, best[b]]), 6)
                prefix = '"' if '"' in options else ""
            if gen_rows:
                generated = _generate_values(model, tokenizer, [prompt_ids[b] for b in gen_rows],
                                             [heads[b] + prefix for b in gen_rows], eot, max_new_tokens, prefix)
                for b, (value, c, why, text) in zip(gen_rows, generated):
                    answers[b][name] = value
                    fconf[b][name] = c
                    if why and not broken[b]:  # keep what the model really wrote where it went wrong
                        broken[b], written[b] = why, heads[b] + prefix + text
    results = []
    for b in range(n):
        text = written[b] or dump_answer(answers[b])
        why = broken[b] or ("schema_violation" if schema.errors(answers[b]) else None)
        if why:
            results.append((None, text, why, None, fconf[b]))
        else:
            results.append((answers[b], text, None, float(np.prod(list(fconf[b].values()))), fconf[b]))
    return results


def _tail_probs(model, tokenizer, cache, mask, last_logp, heads: list[str], tails: list[str]) -> torch.Tensor:
    """(items x tails) probabilities of each tail after each item's answer head, normalised over the tails.

    The same teacher-forced log-likelihoods as scoring each candidate on its own (`_tail_probs_per_candidate`),
    at a cost that does not grow with the head or repeat the prompt cache per candidate: each item's cache is
    extended once with the head tokens every candidate's tokenization shares (and the tokens all candidates share
    after it: they add the same log-probability to each, which the softmax cancels), then the candidates' remaining
    tokens are scored as one token trie per item, branches that cannot matter skipped (distill.student.trie)."""
    k = len(tails)
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([h + t for h in heads for t in tails], add_special_tokens=False)["input_ids"]
    shared_ctx, suffixes, offsets = [], [], []
    for b, hid in enumerate(head_ids):
        fulls = full_ids[b * k:(b + 1) * k]
        # head+tail can tokenize across the boundary (`: ` + `"` -> ` "`): a candidate's own tokens start where
        # its tokens leave the head's; the tokens before the earliest such start are shared by every candidate.
        starts = [common_prefix(hid, f) for f in fulls]
        shared = min(starts)
        # tokens every candidate has next run in the context too, up to each candidate's last token; candidates
        # that share a prefix score it alike (all from the same start, or all not at all), so only a constant moves
        common = min(common_prefix(fulls[0][shared:], f[shared:]) for f in fulls)
        shared += max(0, min([common] + [len(f) - shared - 1 for f in fulls]))
        shared_ctx.append(fulls[0][:shared])
        suffixes.append([f[shared:] for f in fulls])
        offsets.append([max(0, s - shared) for s in starts])
    cache, mask, root_logp = _extend_cache(model, tokenizer, cache, mask, last_logp, shared_ctx)
    logp = _trie_scores(model, tokenizer, cache, mask, root_logp, suffixes, offsets)
    return torch.softmax(logp, -1)


_trie_scores = pruned_trie_logprob  # the benchmark swaps in trie_logprob (every node) to compare
_trie_logprob = trie_logprob


def _extend_cache(model, tokenizer, cache, mask, last_logp, ctx: list[list[int]]):
    """(a copy of ``cache`` extended with each item's ``ctx`` tokens, its attention mask, the log-probs after each
    item's last token). ``ctx`` is left-padded, so its padding sits masked between the prompt and the ctx."""
    cache = copy.deepcopy(cache)  # the prompt cache is reused by every field
    if not any(ctx):
        return cache, mask, last_logp
    device = mask.device
    ids, ctx_mask = encode_left(tokenizer, ctx)
    ids, ctx_mask = ids.to(device), ctx_mask.to(device)
    attn = torch.cat([mask, ctx_mask], 1)
    pos = mask.sum(-1, keepdim=True) + (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{_cache_kw(): cache})
    cache = out.cache if _cache_kw() == "cache" else out.past_key_values
    has_ctx = torch.tensor([len(c) > 0 for c in ctx], device=device)[:, None]
    return cache, attn, torch.where(has_ctx, torch.log_softmax(out.logits[:, -1].float(), -1), last_logp)


def _tail_probs_per_candidate(model, tokenizer, cache, mask, last_logp, heads: list[str],
                              tails: list[str]) -> torch.Tensor:
    """`_tail_probs` the slow way, kept as its reference (tests, benchmarks/scored_decoding.py): every candidate's
    whole head+tail run on its own copy of the prompt cache, so the cost grows with candidates x head length."""
    seqs, starts = [], []
    for head in heads:
        head_ids = token_ids(tokenizer, head)
        for tail in tails:
            full = token_ids(tokenizer, head + tail)
            seqs.append(full)
            starts.append(common_prefix(head_ids, full))
    logp = _continuation_logprob(model, tokenizer, cache, mask, last_logp, seqs, starts, len(tails))
    return torch.softmax(logp.view(len(heads), len(tails)), -1)


def _continuation_logprob(model, tokenizer, cache, prompt_mask, last_logp, seqs, starts, k: int) -> torch.Tensor:
    """Sum of log-probs of ``seqs[r][starts[r]:]`` given its item's prompt cache; rows are item-major, ``k`` each."""
    device = prompt_mask.device
    rows, width = len(seqs), max(len(s) for s in seqs)
    inp = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    cand_mask = torch.zeros((rows, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        inp[r, :len(s)] = torch.tensor(s)
        cand_mask[r, :len(s)] = 1
    inp, cand_mask = inp.to(device), cand_mask.to(device)
    expanded = copy.deepcopy(cache)
    expanded.batch_repeat_interleave(k)
    attn = torch.cat([prompt_mask.repeat_interleave(k, 0), cand_mask], 1)
    pos = prompt_mask.sum(-1).repeat_interleave(k)[:, None] + torch.arange(width, device=device)[None]
    # Only positions from the earliest scored token on need logits: keep the last `keep` of them.
    first = min(starts)
    keep = min(width, width - first + 1)
    out = model(input_ids=inp, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=keep,
                **{_cache_kw(): expanded})
    logits = out.logits.float()  # rows x keep x vocab, positions width-keep .. width-1
    offset = width - keep
    token_logp = torch.zeros((rows, width), device=device)
    # token j is predicted by position j-1 (kept when j-1 >= offset); token 0 by the prompt's last position
    lp = torch.log_softmax(logits, -1)
    js = torch.arange(offset + 1, width, device=device)
    token_logp[:, js] = lp[:, js - 1 - offset].gather(-1, inp[:, js, None]).squeeze(-1)
    token_logp[:, 0] = last_logp.repeat_interleave(k, 0).gather(-1, inp[:, :1]).squeeze(-1)
    col = torch.arange(width, device=device)[None]
    lengths = cand_mask.sum(-1, keepdim=True)
    scored = (col >= torch.tensor(starts, device=device)[:, None]) & (col < lengths)
    return (token_logp * scored).sum(-1).cpu()


def _generate_values(model, tokenizer, prompt_ids, heads, eot, max_new_tokens, prefix: str = ""):
    """Greedy JSON value after each answer head; yields (value, mean token probability, invalid reason, text).

    ``prefix`` is what the head already opened (``"`` for a string): it is part of the value parsed. Where the
    generation stops and how its value is read are the runtime's own functions (distill.serve.scored)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ValueWritten(StoppingCriteria):
        """Stop a row once its text holds a whole JSON value followed by something (`"x",`, `12}`)."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([value_written(tokenizer, row, prefix) for row in input_ids[:, width:]],
                                device=input_ids.device)

    stop_id = tokenizer.convert_tokens_to_ids(eot)
    ids, mask = encode_left(tokenizer, [p + token_ids(tokenizer, h) for p, h in zip(prompt_ids, heads)])
    ids, mask = ids.to(model.device), mask.to(model.device)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, output_scores=True,
                         return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([ValueWritten()]))
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
    for row, scores in zip(out.sequences[:, ids.shape[1]:].cpu().tolist(), steps):
        yield read_value(tokenizer, row, scores.numpy(), prefix)
