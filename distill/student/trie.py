"""Candidate values scored as token tries on top of the prompts' KV cache (tree attention).

    scores = pruned_trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets)  # what scored uses
    scores = trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets)         # every node, one pass

Per item, the candidates' token sequences form a trie; its internal nodes (token prefixes that a longer candidate
extends) are rows of a forward pass, each attending to the cache and to its own ancestors only (a 4D mask, positions
by depth). A candidate's last token needs no forward: it is read off its parent's logits (or ``root_logp``).

`pruned_trie_logprob` skips branches that cannot matter, with a bound that holds for any model: a candidate's
log-likelihood is at most that of any prefix of it, and the summed probability of all candidates under a node is at
most the node's prefix probability. Branches within ``defer_margin`` nats of the best bound are forwarded whole; the
others wait until a candidate is complete, and a waiting branch is dropped only while (a) its bound is below the best
complete candidate's score, so it cannot hold the winner, and (b) the bounds of all dropped branches sum to at most
``tol`` (PRUNE_TOL) times the probability of the complete candidates, so they move no probability in the softmax by
more than ``tol`` relative. What is exact: the winner is the full trie's argmax (ties and float rounding aside, the
same as between any two batch shapes), every complete candidate's softmax probability, the winner's included, is
within ``tol / 2`` relative of the full trie's, and each dropped candidate is given half its branch's bound, split
evenly (its true probability lies between 0 and the whole bound). The items' branches then differ in size, so a
pruned pass runs all items' rows as one unpadded sequence over the cache laid end to end (`_packed`); where that
would cost more than the full trie (flat scores: little waits), every branch goes into the first forward, batched:
the full trie, at its cost. ``counts`` tallies forwards and forwarded and skipped nodes (benchmarks, tests).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import Counter

import numpy as np
import torch

from distill.serve.scored import PRUNE_TOL  # one tolerance for evaluate's trie and the served scorer

counts: Counter = Counter()  # "forwards", "nodes" (rows forwarded), "padded" (with padding), "skipped" (never)


@functools.lru_cache(maxsize=1)
def _cache_kw() -> str:
    """transformers 5.x renamed the ``past_key_values`` argument and output to ``cache``; accept either."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class _Trie:
    """One item's candidates as a token trie. Node 0 is the root (the end of the cache); nodes 1.. are the internal
    nodes. ``path[c][d]`` is the node that candidate c's token d is scored from."""

    def __init__(self, seqs: list[list[int]], offsets: list[int]):
        self.seqs, self.offsets = seqs, offsets
        self.tok, self.par, self.dep = [-1], [-1], [-1]
        self.kids: list[list[int]] = [[]]
        self.ends: list[list[int]] = [[]]  # candidates whose last token is scored from this node
        self.under: list[list[int]] = [list(range(len(seqs)))]
        self.path: list[list[int]] = []
        index: dict[tuple[int, int], int] = {}
        for c, seq in enumerate(seqs):
            node, path = 0, []
            for d, t in enumerate(seq):
                path.append(node)
                if d == len(seq) - 1:
                    self.ends[node].append(c)
                    break
                if (node, t) not in index:
                    index[(node, t)] = len(self.tok)
                    self.tok.append(t), self.par.append(node), self.dep.append(d)
                    self.kids.append([]), self.ends.append([]), self.under.append([])
                    self.kids[node].append(index[(node, t)])
                node = index[(node, t)]
                self.under[node].append(c)
            self.path.append(path)
        self.size = [1] * len(self.tok)  # internal nodes in each subtree, itself included
        for u in range(len(self.tok) - 1, 0, -1):
            self.size[self.par[u]] += self.size[u]

    def ancestors(self, u: int) -> list[int]:
        """u and its internal ancestors."""
        out = []
        while u > 0:
            out.append(u)
            u = self.par[u]
        return out

    def subtree(self, u: int) -> list[int]:
        out, todo = [], [u]
        while todo:
            v = todo.pop()
            out.append(v)
            todo.extend(self.kids[v])
        return out


def _bias(allowed: torch.Tensor, model) -> torch.Tensor:
    dtype = model.get_input_embeddings().weight.dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _forward(model, cache, ids, pos, allowed):
    """One forward of tree rows on ``cache`` (extended in place): (logits, their log-sum-exp per row)."""
    out = model(input_ids=ids, attention_mask=_bias(allowed, model), position_ids=pos, use_cache=True,
                **{_cache_kw(): cache})
    counts["forwards"] += 1
    logits = out.logits.float()
    return logits, torch.logsumexp(logits, -1)


def trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets) -> torch.Tensor:
    """(items x candidates) sum of the log-probs of ``suffixes[b][c][offsets[b][c]:]`` after item b's cache, every
    trie node forwarded in one pass (the reference for `pruned_trie_logprob`). ``cache`` is extended in place."""
    n, k = len(suffixes), len(suffixes[0])
    tries = [_Trie(s, o) for s, o in zip(suffixes, offsets)]
    scores = torch.zeros(n, k)
    lp = {b: {0: _root_lp(trie, root_logp[b])} for b, trie in enumerate(tries)}
    width = max(len(t.tok) - 1 for t in tries)
    if width:
        _forward_rows(model, tokenizer, cache, mask, tries, [list(range(1, len(t.tok))) for t in tries], 0, lp)
    for b, trie in enumerate(tries):
        for c in range(k):
            scores[b, c] = _score(trie, lp[b], c)
    return scores


def _forward_rows(model, tokenizer, cache, mask, tries, rows, done_cols: int, lp, col=None):
    """Forward ``rows[b]`` (nodes of item b, ancestors before descendants) on ``cache``, which holds ``done_cols``
    columns of earlier tree rows after ``mask``'s; each node's log-probs at its children's tokens go into ``lp``
    and its cache column into ``col``. Returns the number of columns added."""
    device = mask.device
    n, width = len(rows), max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    base = mask.shape[1]
    col = {} if col is None else col
    ids = torch.full((n, width), pad, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, width, base + done_cols + width), dtype=torch.bool)
    allowed[:, :, :base] = mask.bool().cpu()[:, None, :]
    for b, (trie, nodes) in enumerate(zip(tries, rows)):
        for j, u in enumerate(nodes):
            col[(b, u)] = base + done_cols + j
        for j, u in enumerate(nodes):
            ids[b, j], pos[b, j] = trie.tok[u], trie.dep[u]
            allowed[b, j, [col[(b, a)] for a in trie.ancestors(u)]] = True
        for j in range(len(nodes), width):
            allowed[b, j, base + done_cols + j] = True  # a padding row attends to itself only
    pos += mask.sum(-1, keepdim=True).cpu()
    logits, lse = _forward(model, cache, ids.to(device), pos.to(device), allowed.to(device))
    counts["nodes"] += sum(len(r) for r in rows)
    counts["padded"] += n * width
    picks = [(b, j, u, t) for b, (trie, nodes) in enumerate(zip(tries, rows)) for j, u in enumerate(nodes)
             for t in _child_tokens(trie, u)]
    if picks:
        b, j, _, t = torch.tensor(picks, device=device).T
        got = (logits[b, j, t] - lse[b, j]).tolist()
        for (b, _, u, t), value in zip(picks, got):
            lp[b].setdefault(u, {})[t] = value
    return width


def _packed(cache, n: int):
    """The items' batched cache as one sequence (item after item along the positions): rows of different items then
    share one forward without padding, each attending to its own item's block (keys are cached after RoPE)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        flat = [x.permute(1, 0, 2, 3).reshape(1, x.shape[1], -1, x.shape[3]) for x in (layer.keys, layer.values)]
        out.update(*flat, i)
    return out


def _forward_packed(model, tokenizer, cache, mask, tries, rows, done_cols: int, lp, col):
    """`_forward_rows` on a `_packed` cache: all items' rows in one sequence. Returns the number of rows."""
    device = mask.device
    n, base = mask.shape
    flat = [(b, u) for b, nodes in enumerate(rows) for u in nodes]
    start = n * base + done_cols
    for r, key in enumerate(flat):
        col[key] = start + r
    ids = torch.tensor([[tries[b].tok[u] for b, u in flat]])
    pos = torch.tensor([[int(mask[b].sum()) + tries[b].dep[u] for b, u in flat]])
    allowed = torch.zeros((1, len(flat), start + len(flat)), dtype=torch.bool)
    prompt = mask.bool().cpu()
    for r, (b, u) in enumerate(flat):
        allowed[0, r, b * base:(b + 1) * base] = prompt[b]
        allowed[0, r, [col[(b, a)] for a in tries[b].ancestors(u)]] = True
    logits, lse = _forward(model, cache, ids.to(device), pos.to(device), allowed.to(device))
    counts["nodes"] += len(flat)
    counts["padded"] += len(flat)
    picks = [(r, b, u, t) for r, (b, u) in enumerate(flat) for t in _child_tokens(tries[b], u)]
    r, _, _, t = torch.tensor(picks, device=device).T
    for (_, b, u, t), value in zip(picks, (logits[0, r, t] - lse[0, r]).tolist()):
        lp[b].setdefault(u, {})[t] = value
    return len(flat)


def _cost(model, rows: int, cols: int) -> float:
    """A forward's multiply-adds, roughly: every row through the weights, and attention over ``cols`` columns."""
    cfg = model.config
    return rows * (model.num_parameters() + 2 * cfg.hidden_size * cfg.num_hidden_layers * cols)


def _child_tokens(trie: "_Trie", u: int) -> set[int]:
    """The tokens scored from node u: its internal children's and the last tokens of the candidates ending there."""
    return {trie.tok[v] for v in trie.kids[u]} | {trie.seqs[c][-1] for c in trie.ends[u]}


def _root_lp(trie: "_Trie", root_logp: torch.Tensor) -> dict[int, float]:
    tokens = sorted(_child_tokens(trie, 0))
    return dict(zip(tokens, root_logp[tokens].tolist()))


def _edge(trie: _Trie, lp: dict, c: int, d: int) -> float:
    return float(lp[trie.path[c][d]][trie.seqs[c][d]])


def _score(trie: _Trie, lp: dict, c: int) -> float:
    return sum(_edge(trie, lp, c, d) for d in range(trie.offsets[c], len(trie.seqs[c])))


def _bound(trie: _Trie, lp: dict, u: int) -> tuple[float, bool]:
    """(log-probability of node u's prefix as its candidates score it, whether that bounds their summed mass):
    the bound needs every token after u to be scored for every candidate under it."""
    cands = trie.under[u]
    depth = trie.dep[u] + 1
    off = max(trie.offsets[c] for c in cands)
    c = cands[0]
    return sum(_edge(trie, lp, c, d) for d in range(off, depth)), off <= depth


def pruned_trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets, tol: float = PRUNE_TOL,
                        defer_margin: float | None = None) -> torch.Tensor:
    """`trie_logprob`'s scores with the branches that cannot matter skipped (module docstring: what is exact).
    ``cache`` is extended in place."""
    if not 0 < tol < 1:
        raise ValueError(f"tol={tol}: the pruning tolerance is a relative probability in (0, 1), e.g. 1e-4")
    margin = math.log(1 / tol) if defer_margin is None else defer_margin
    n, k = len(suffixes), len(suffixes[0])
    tries = [_Trie(s, o) for s, o in zip(suffixes, offsets)]
    lp = {b: {0: _root_lp(trie, root_logp[b])} for b, trie in enumerate(tries)}
    exact: list[dict[int, float]] = [{} for _ in range(n)]
    dropped: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # (node, bound)
    frontier: list[list[int]] = [[] for _ in range(n)]
    col: dict = {}
    done_cols = 0
    newly = [[0] for _ in range(n)]
    packed = None
    while True:
        rows, left = [], []
        for b, trie in enumerate(tries):
            for u in newly[b]:
                exact[b].update((c, _score(trie, lp[b], c)) for c in trie.ends[u])
                frontier[b].extend(v for v in trie.kids[u] if (b, v) not in col)
            rows.append(_choose(trie, lp[b], exact[b], dropped[b], frontier[b], tol, margin))
            gone = {v for v, _ in dropped[b]}
            left.append([u for u in frontier[b] if u not in gone])
            frontier[b] = [u for u in left[-1] if u not in set(rows[-1])]
        if not any(rows):
            break
        chosen = _subtrees(tries, rows)
        if packed is None:
            # the first forward: where the branches left out would save less than packing costs (flat scores),
            # every branch goes now, batched as the full trie
            everything = _subtrees(tries, left)
            width = max(len(r) for r in everything)
            go = sum(len(r) for r in chosen)
            if _cost(model, n * width, mask.shape[1] + width) <= _cost(model, go, n * mask.shape[1] + go):
                _forward_rows(model, tokenizer, cache, mask, tries, everything, 0, lp, col)
                frontier = [[] for _ in range(n)]
                newly = everything
                continue
            packed = _packed(cache, n)
        done_cols += _forward_packed(model, tokenizer, packed, mask, tries, chosen, done_cols, lp, col)
        newly = chosen
    scores = torch.zeros(n, k)
    for b, trie in enumerate(tries):
        for c, s in exact[b].items():
            scores[b, c] = s
        for u, bound in dropped[b]:
            counts["skipped"] += trie.size[u]
            share = bound - math.log(2 * len(trie.under[u]))
            for c in trie.under[u]:
                scores[b, c] = share
    return scores


def _subtrees(tries: list[_Trie], tops: list[list[int]]) -> list[list[int]]:
    """Each item's nodes under its ``tops`` (themselves included), ancestors before descendants."""
    return [[v for u in r for v in sorted(trie.subtree(u), key=trie.dep.__getitem__)] for trie, r in zip(tries, tops)]


def _choose(trie: _Trie, lp: dict, exact: dict, dropped: list, frontier: list[int], tol: float,
            margin: float) -> list[int]:
    """The frontier nodes whose subtrees are forwarded next; drops the ones that cannot matter into ``dropped``."""
    if not frontier:
        return []
    bounds = {u: _bound(trie, lp, u) for u in frontier}
    best = max(exact.values(), default=-math.inf)
    if exact:
        budget = math.log(tol) + float(np.logaddexp.reduce(list(exact.values())))
        spent = float(np.logaddexp.reduce([b for _, b in dropped] or [-math.inf]))
        for u in sorted((u for u in frontier if bounds[u][1]), key=lambda u: bounds[u][0]):
            bound = bounds[u][0]
            total = float(np.logaddexp(spent, bound))
            if bound >= best or total > budget:
                break
            dropped.append((u, bound))
            spent = total
    gone = {u for u, _ in dropped}
    left = [u for u in frontier if u not in gone]
    if not left:
        return []
    ref = max([best] + [bounds[u][0] for u in left])
    go = [u for u in left if bounds[u][0] >= ref - margin or not bounds[u][1]]
    return go or left
