"""evaluate: the student (or any served model) answers the held-out split; metrics with intervals, cost, a CI gate.

    python -m distill evaluate recipe=support_tickets run_dir=DIR [eval.gate.min_agreement=0.8] [eval.baseline=F]
    python -m distill evaluate run_dir=DIR eval.endpoint.base_url=http://127.0.0.1:8080/v1 eval.endpoint.model=M

Predictions come from the in-process student (``eval.decode=scored``: every allowed value of an enum field is
ranked by its log-likelihood in the JSON answer, which also gives a confidence; ``free``: greedy free-form JSON)
or from an OpenAI-compatible endpoint (the published GGUF in llama.cpp, vLLM, the teacher itself);
student=embed_classifier answers with its heads' most probable values (predict_classifier). Writes
evaluate/{predictions.jsonl, results.json, report.md, junit.xml, summary.md, *.png}; README lists results.json's
keys. The command exits 3 with a one-line reason when the gate fails.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distill import DistillError, EndpointFailed, paths, runio
from distill.config import Config
from distill.task import OutputSchema, Task, answer_head, common_prefix, dump_answer, literal_options, load_split
from distill.template import end_of_turn, render_prompt

log = logging.getLogger("distill")


@dataclass
class Predictions:
    """One predictor's answers to a list of rows, aligned with the rows."""

    answers: list[dict | None]
    raw: list[str]
    invalid_reason: list[str | None]
    confidence: list[float | None]   # probability of the whole answer, 0..1 (None: no answer or no logprobs)
    latency_s: list[float]           # seconds until this item's answer was ready (its batch or its request)
    failures: dict[str, int]         # counts by reason: transport errors and invalid answers
    field_confidence: list[dict | None] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def items_per_s(self) -> float | None:
        """Answers that came back per second (requests that never got a response do not count)."""
        answered = sum(r not in _TRANSPORT and not str(r).startswith("http_") for r in self.invalid_reason)
        return round(answered / self.wall_s, 4) if self.wall_s > 0 and answered else None


def agreement(a: list[dict | None], b: list[dict | None]) -> float:
    """Share of items whose whole answers are equal; None never equals anything (not even None)."""
    if len(a) != len(b):
        raise ValueError(f"agreement needs aligned lists, got {len(a)} and {len(b)} items")
    if not a:
        return 0.0
    return sum(x is not None and y is not None and x == y for x, y in zip(a, b)) / len(a)


def _count(reasons) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        if r:
            out[r] = out.get(r, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# in-process student


def predict_classifier(cfg: Config, task: Task, rows: list[dict], clf) -> Predictions:
    """Answers of the embedding classifier (student=embed_classifier, distill.students.embed_classifier) for
    ``rows`` in batches of ``eval.batch_size``: each field's most probable value under its head; confidence = the
    product of the fields' top probabilities (each in field_confidence), like the scored LM's chain-rule
    probability, so coverage curves, calibration and the routing threshold read it the same way. An answer that
    breaks the schema is counted like any student's."""
    answers, raw, reasons, conf, fconf, lat = [], [], [], [], [], []
    bs = cfg.eval.batch_size
    started = time.perf_counter()
    for start in tqdm(range(0, len(rows), bs), desc="student (classifier)", unit="batch", leave=False):
        t0 = time.perf_counter()
        out = clf.predict([r["input"] for r in rows[start:start + bs]], bs)
        took = time.perf_counter() - t0
        for answer, c, fc in out:
            why = "schema_violation" if task.schema.errors(answer) else None
            answers.append(None if why else answer), raw.append(dump_answer(answer)), reasons.append(why)
            conf.append(None if why else c), fconf.append(fc), lat.append(round(took, 4))
    return Predictions(answers, raw, reasons, conf, lat, _count(reasons), fconf,
                       wall_s=time.perf_counter() - started)


def predict_in_process(cfg: Config, task: Task, rows: list[dict], model, tokenizer) -> Predictions:
    """Student answers for ``rows`` in batches of ``eval.batch_size``.

    ``eval.decode=scored``: fields are filled in schema order; an enum field's allowed values are each scored by
    their teacher-forced log-likelihood after the answer so far (prompt KV cache shared by all candidates), and the
    softmax over allowed values gives the value and its probability. A free-text field is generated greedily
    after the answer so far, its confidence the mean token probability. Whole-answer confidence = the *product*
    of the field confidences (the chain-rule probability of the answer). ``free``: greedy free-form generation,
    confidence = the probability of the generated sequence. Never raises on a bad answer: it is counted.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(r["input"])) for r in rows]
    answers, raw, reasons, conf, fconf, lat = [], [], [], [], [], []
    bs = cfg.eval.batch_size
    started = time.perf_counter()
    model.eval()
    for start in tqdm(range(0, len(prompts), bs), desc=f"student ({cfg.eval.decode})", unit="batch", leave=False):
        batch = prompts[start:start + bs]
        t0 = time.perf_counter()
        if cfg.eval.decode == "scored":
            out = _scored_batch(model, tokenizer, batch, task.schema, eot, cfg.eval.max_new_tokens)
        else:
            out = _free_batch(model, tokenizer, batch, task.schema, eot, cfg.eval.max_new_tokens)
        took = time.perf_counter() - t0
        for ans, text, why, c, fc in out:
            answers.append(ans), raw.append(text), reasons.append(why), conf.append(c), fconf.append(fc)
            lat.append(round(took, 4))
    return Predictions(answers, raw, reasons, conf, lat, _count(reasons), fconf,
                       wall_s=time.perf_counter() - started)


def _encode_left(tokenizer, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in id_lists)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in id_lists])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in id_lists])
    return ids, mask


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _free_batch(model, tokenizer, prompts: list[str], schema: OutputSchema, eot: str, max_new_tokens: int):
    stop_id = tokenizer.convert_tokens_to_ids(eot)
    ids, mask = _encode_left(tokenizer, [_ids(tokenizer, p) for p in prompts])
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, output_scores=True,
                         return_dict_in_generate=True)
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
    results = []
    for row, scores in zip(out.sequences[:, ids.shape[1]:].cpu(), steps):
        toks = row.tolist()
        end = toks.index(stop_id) + 1 if stop_id in toks else len(toks)
        text = tokenizer.decode(toks[:end], skip_special_tokens=True)
        answer, why = schema.parse(text)
        confidence = float(math.exp(scores[:end].sum())) if answer is not None else None
        results.append((answer, text, why, confidence, None))
    return results


@functools.lru_cache(maxsize=1)
def _cache_kw() -> str:
    """transformers 5.x renamed the ``past_key_values`` argument and output to ``cache``; accept either."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"




@torch.inference_mode()
def _scored_batch(model, tokenizer, prompts: list[str], schema: OutputSchema, eot: str, max_new_tokens: int):
    device = model.device
    prompt_ids = [_ids(tokenizer, p) for p in prompts]
    ids, mask = _encode_left(tokenizer, prompt_ids)
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
    extended once with the head tokens every candidate's tokenization shares, then the candidates' remaining
    tokens are scored as one token trie per item in a single forward pass (`_trie_logprob`)."""
    n, k = len(heads), len(tails)
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([h + t for h in heads for t in tails], add_special_tokens=False)["input_ids"]
    shared_ctx, suffixes, offsets = [], [], []
    for b, hid in enumerate(head_ids):
        fulls = full_ids[b * k:(b + 1) * k]
        # head+tail can tokenize across the boundary (`: ` + `"` -> ` "`): a candidate's own tokens start where
        # its tokens leave the head's; the tokens before the earliest such start are shared by every candidate.
        starts = [common_prefix(hid, f) for f in fulls]
        shared = min(starts)
        shared_ctx.append(hid[:shared])
        suffixes.append([f[shared:] for f in fulls])
        offsets.append([s - shared for s in starts])
    cache, mask, root_logp = _extend_cache(model, tokenizer, cache, mask, last_logp, shared_ctx)
    logp = _trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets)
    return torch.softmax(logp, -1)


def _extend_cache(model, tokenizer, cache, mask, last_logp, ctx: list[list[int]]):
    """(a copy of ``cache`` extended with each item's ``ctx`` tokens, its attention mask, the log-probs after each
    item's last token). ``ctx`` is left-padded, so its padding sits masked between the prompt and the ctx."""
    cache = copy.deepcopy(cache)  # the prompt cache is reused by every field
    if not any(ctx):
        return cache, mask, last_logp
    device = mask.device
    ids, ctx_mask = _encode_left(tokenizer, ctx)
    ids, ctx_mask = ids.to(device), ctx_mask.to(device)
    attn = torch.cat([mask, ctx_mask], 1)
    pos = mask.sum(-1, keepdim=True) + (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{_cache_kw(): cache})
    cache = out.cache if _cache_kw() == "cache" else out.past_key_values
    has_ctx = torch.tensor([len(c) > 0 for c in ctx], device=device)[:, None]
    return cache, attn, torch.where(has_ctx, torch.log_softmax(out.logits[:, -1].float(), -1), last_logp)


def _trie_logprob(model, tokenizer, cache, mask, root_logp, suffixes, offsets) -> torch.Tensor:
    """(items x candidates) sum of the log-probs of ``suffixes[b][c][offsets[b][c]:]`` after item b's cache.

    Per item, the candidates' token sequences form a trie; its internal nodes (token prefixes that some longer
    candidate extends) are one row of the batch, each attending to the cache and to its own ancestors only (tree
    attention through a 4D mask, positions by depth). A prefix shared by several candidates runs once, and a
    candidate's last token needs no forward: it is read off its parent's logits (or ``root_logp``)."""
    n, k = len(suffixes), len(suffixes[0])
    device = mask.device
    tokens: list[list[int]] = []
    parents: list[list[int]] = []
    depths: list[list[int]] = []
    root_hits: list[tuple[int, int, int]] = []  # (item, token, candidate row) scored after the root
    node_hits: list[tuple[int, int, int, int]] = []  # (item, node, token, candidate row) scored after a node
    for b in range(n):
        index: dict[tuple[int, int], int] = {}
        tok, par, dep = [], [], []
        for c, seq in enumerate(suffixes[b]):
            node = -1  # the root: the end of the item's extended cache
            for d, t in enumerate(seq):
                if d >= offsets[b][c]:
                    if node < 0:
                        root_hits.append((b, t, b * k + c))
                    else:
                        node_hits.append((b, node, t, b * k + c))
                if d == len(seq) - 1:
                    break
                key = (node, t)
                if key not in index:
                    index[key] = len(tok)
                    tok.append(t), par.append(node), dep.append(d)
                node = index[key]
        tokens.append(tok), parents.append(par), depths.append(dep)
    scores = torch.zeros(n * k, device=device)
    if root_hits:
        b, t, r = torch.tensor(root_hits, device=device).T
        scores.index_add_(0, r, root_logp[b, t])
    if not node_hits:
        return scores.view(n, k).cpu()
    width = max(len(t) for t in tokens)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in tokens], device=device)
    par = torch.tensor([p + [-1] * (width - len(p)) for p in parents], device=device)
    pos = mask.sum(-1, keepdim=True) + torch.tensor([d + [0] * (width - len(d)) for d in depths], device=device)
    # each node sees the cache's unpadded positions, itself and its ancestors (found by walking up the parents)
    tree = torch.eye(width, dtype=torch.bool, device=device).repeat(n, 1, 1)
    rows = torch.arange(n, device=device)[:, None].expand(n, width)
    cols = torch.arange(width, device=device)[None].expand(n, width)
    up = par
    while (valid := up >= 0).any():
        tree[rows[valid], cols[valid], up[valid]] = True
        up = torch.where(valid, par.gather(1, up.clamp(min=0)), -1)
    allowed = torch.cat([mask.bool()[:, None, :].expand(n, width, mask.shape[1]), tree], -1)
    dtype = model.get_input_embeddings().weight.dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    out = model(input_ids=ids, attention_mask=bias[:, None], position_ids=pos, use_cache=True,
                **{_cache_kw(): cache})
    logits = out.logits.float()  # items x nodes x vocab
    lse = torch.logsumexp(logits, -1)
    b, node, t, r = torch.tensor(node_hits, device=device).T
    scores.index_add_(0, r, logits[b, node, t] - lse[b, node])
    return scores.view(n, k).cpu()


def _tail_probs_per_candidate(model, tokenizer, cache, mask, last_logp, heads: list[str],
                              tails: list[str]) -> torch.Tensor:
    """`_tail_probs` the slow way, kept as its reference (tests, benchmarks/scored_decoding.py): every candidate's
    whole head+tail run on its own copy of the prompt cache, so the cost grows with candidates x head length."""
    seqs, starts = [], []
    for head in heads:
        head_ids = _ids(tokenizer, head)
        for tail in tails:
            full = _ids(tokenizer, head + tail)
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

    ``prefix`` is what the head already opened (``"`` for a string): it is part of the value parsed."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    decoder = json.JSONDecoder()

    class ValueWritten(StoppingCriteria):
        """Stop a row once its text holds a whole JSON value followed by something (`"x",`, `12}`)."""

        def __call__(self, input_ids, scores, **kwargs):
            done = []
            for row in input_ids[:, width:]:
                text = (prefix + tokenizer.decode(row, skip_special_tokens=True)).lstrip()
                try:
                    done.append(decoder.raw_decode(text)[1] < len(text))
                except json.JSONDecodeError:
                    done.append(False)
            return torch.tensor(done, device=input_ids.device)

    stop_id = tokenizer.convert_tokens_to_ids(eot)
    ids, mask = _encode_left(tokenizer, [p + _ids(tokenizer, h) for p, h in zip(prompt_ids, heads)])
    ids, mask = ids.to(model.device), mask.to(model.device)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, output_scores=True,
                         return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([ValueWritten()]))
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
    for row, scores in zip(out.sequences[:, ids.shape[1]:].cpu().tolist(), steps):
        text = tokenizer.decode(row, skip_special_tokens=True)
        stripped = (prefix + text).lstrip()
        try:
            value, end = decoder.raw_decode(stripped)
        except json.JSONDecodeError:
            yield None, None, "invalid_json", text
            continue
        end += len(prefix + text) - len(stripped) - len(prefix)
        used = next((i for i in range(1, len(row) + 1)
                     if len(tokenizer.decode(row[:i], skip_special_tokens=True)) >= end), len(row))
        yield value, round(float(math.exp(scores[:used].mean())), 6), None, text


# ---------------------------------------------------------------------------------------------------------------
# any OpenAI-compatible endpoint


_DOWN = ("connection_error", "timeout")
_TRANSPORT = (*_DOWN, "bad_response", "not_sent_endpoint_down")


def predict_endpoint(cfg: Config, task: Task, rows: list[dict], base_url: str, model_name: str) -> Predictions:
    """Answers from an OpenAI-compatible chat endpoint, ``eval.endpoint.concurrency`` requests at a time.

    Never raises on a down server or garbage: transport errors are counted by reason ("connection_error",
    "timeout", "http_500", "bad_response"), unparseable answers by their parse reason ("invalid_json", ...).
    When the first request cannot reach the server, the rest are not sent ("not_sent_endpoint_down").
    Confidence = the probability of the returned token sequence when the server returns log-probs.
    """
    import openai

    from distill.teacher.client import NO_KEY

    e = cfg.eval.endpoint
    key = NO_KEY
    if e.api_key_env:
        from distill.config import read_secret_env

        key = read_secret_env(e.api_key_env, "eval.endpoint.api_key_env") or ""
        if not key:
            raise DistillError(f"eval.endpoint.api_key_env={e.api_key_env} is not set in the environment")
    client = openai.OpenAI(base_url=base_url, api_key=key, timeout=e.timeout_s, max_retries=e.max_retries)
    fmt = task.schema.response_format(e.structured_output)
    extra = task.schema.extra_body(e.structured_output)
    state = {"logprobs": e.logprobs}
    lock = threading.Lock()
    n = len(rows)
    answers: list = [None] * n
    raw, reasons, conf, lat = [""] * n, [None] * n, [None] * n, [0.0] * n

    def request(i: int, logprobs: bool) -> tuple:
        text = rows[i]["input"]
        messages = task.student_messages(text) if e.prompt == "student" else task.teacher_messages(text)
        body = {"model": model_name, "messages": messages, "temperature": 0.0,
                "max_tokens": cfg.eval.max_new_tokens}
        if fmt:
            body["response_format"] = fmt
        if extra:
            body["extra_body"] = extra
        if logprobs:
            body["logprobs"] = True
        t0 = time.perf_counter()
        try:
            resp = client.chat.completions.create(**body)
            choice = resp.choices[0]
            if choice.message is None:  # a 200 whose body is not a chat completion
                raise ValueError("no message")
        except openai.APITimeoutError:
            return None, "timeout", time.perf_counter() - t0
        except openai.APIConnectionError:
            return None, "connection_error", time.perf_counter() - t0
        except openai.APIStatusError as exc:
            return None, f"http_{exc.status_code}", time.perf_counter() - t0
        except Exception:  # a 200 whose body is not a chat completion
            return None, "bad_response", time.perf_counter() - t0
        return choice, None, time.perf_counter() - t0

    def one(i: int) -> None:
        choice, failure, took = request(i, state["logprobs"])
        if failure and failure.startswith("http_4") and state["logprobs"] and failure not in ("http_401",
                                                                                               "http_404"):
            with lock:  # the server may not do logprobs: drop them for every later request
                state["logprobs"] = False
            choice, failure, took = request(i, False)
        lat[i] = round(took, 4)
        if failure:
            reasons[i] = failure
            return
        raw[i] = choice.message.content or ""
        answer, why = task.schema.parse(raw[i])
        if choice.finish_reason == "length" and answer is None:
            why = "finish_length"
        answers[i], reasons[i] = answer, why
        tokens = getattr(getattr(choice, "logprobs", None), "content", None)
        if answer is not None and tokens:
            conf[i] = round(float(math.exp(sum(t.logprob for t in tokens))), 6)

    started = time.perf_counter()
    if n:
        one(0)
        if reasons[0] in _DOWN:
            for i in range(1, n):
                reasons[i] = "not_sent_endpoint_down"
        else:
            with ThreadPoolExecutor(max_workers=e.concurrency) as pool:
                list(tqdm(pool.map(one, range(1, n)), total=n - 1, desc="endpoint", unit="req", leave=False))
    client.close()
    return Predictions(answers, raw, reasons, conf, lat, _count(reasons), [None] * n,
                       wall_s=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# scoring


def score(rows: list[dict], preds: list[dict | None], schema: OutputSchema, boot: dict | None = None) -> dict:
    """Agreement with the teacher and accuracy vs gold, per field and for the whole answer, with intervals.

    Keeps the point values under ``agreement`` / ``student_vs_gold`` / ``teacher_vs_gold`` ({field: share,
    "exact": share}) and adds ``*_ci`` twins holding {"value", "low", "high", "n"}, plus per-field class reports
    (accuracy, macro-F1 with interval, per-class precision / recall / F1) for fields with a fixed set of values.
    """
    from distill.metrics.stats import class_report, rate

    boot = boot or {}
    n = len(rows)
    valid = [p is not None for p in preds]

    def field_of(obj, f):
        return None if obj is None else obj.get(f)

    def block(ref_rows, pred_list, key: str) -> dict:
        out = {f: rate([p is not None and field_of(p, f) == r[key].get(f) for r, p in zip(ref_rows, pred_list)],
                       **boot) for f in schema.fields}
        out["exact"] = rate([p is not None and p == r[key] for r, p in zip(ref_rows, pred_list)], **boot)
        return out

    agree_ci = block(rows, preds, "teacher")
    out: dict = {"n": n, "invalid_rate": round(1 - sum(valid) / n, 4) if n else None,
                 "invalid": rate([not v for v in valid], **boot),
                 "agreement": {k: v["value"] for k, v in agree_ci.items()}, "agreement_ci": agree_ci}
    gold_idx = [i for i, r in enumerate(rows) if r.get("gold")]
    out["n_gold"] = len(gold_idx)
    gold_rows, gold_preds = [rows[i] for i in gold_idx], [preds[i] for i in gold_idx]
    if gold_idx:
        stu = block(gold_rows, gold_preds, "gold")
        tea = block(gold_rows, [r["teacher"] for r in gold_rows], "gold")
        out["student_vs_gold"] = {k: v["value"] for k, v in stu.items()}
        out["teacher_vs_gold"] = {k: v["value"] for k, v in tea.items()}
        out["student_vs_gold_ci"], out["teacher_vs_gold_ci"] = stu, tea
    fields = {}
    for f in schema.fields:
        labels = schema.enums.get(f)
        if labels is None:  # free text: exact-match agreement and accuracy only
            fields[f] = {"kind": "free_text", "vs_teacher": {"accuracy": agree_ci[f]},
                         "vs_gold": {"accuracy": stu[f]} if gold_idx else None}
            continue
        fields[f] = {"kind": "enum",
                     "vs_teacher": class_report([r["teacher"].get(f) for r in rows],
                                                [field_of(p, f) for p in preds], labels, **boot),
                     "vs_gold": class_report([r["gold"].get(f) for r in gold_rows],
                                             [field_of(p, f) for p in gold_preds], labels, **boot)
                     if gold_idx else None,
                     "teacher_vs_gold": class_report([r["gold"].get(f) for r in gold_rows],
                                                     [r["teacher"].get(f) for r in gold_rows], labels, **boot)
                     if gold_idx else None}
    out["fields"] = fields
    return out


def _latency(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 4), "p95": round(float(np.percentile(values, 95)), 4)}


def _static_prefix_share(task: Task, rows: list[dict]) -> float | None:
    """Share of the teacher's prompt that is the same for every request (system + few-shot): what a provider's
    prompt cache can bill at the cached rate."""
    shares = []
    for r in rows[:50]:
        messages = task.teacher_messages(r["input"])
        static = sum(len(m["content"]) for m in messages[:-1])
        shares.append(static / max(1, static + len(messages[-1]["content"])))
    return round(float(np.mean(shares)), 4) if shares else None


# ---------------------------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, run_dir: Path) -> dict:
    from distill.metrics import cost as costs
    from distill.metrics import gate as gates
    from distill.metrics import report
    from distill.metrics.decontam import find_duplicates
    from distill.metrics.stats import calibration, confusion, coverage_curve

    out_dir = paths.stage_dir(run_dir, "evaluate")
    task = Task(cfg)
    ev = cfg.eval
    generate = runio.require_done(run_dir, "generate", "evaluate")["summary"]
    rows = load_split(run_dir, ev.split)[: ev.limit]
    if not rows:
        raise_empty(run_dir, ev.split)
    val_rows = load_split(run_dir, "val")[: ev.limit] if ev.val_curve and ev.split != "val" else []
    train_rows = load_split(run_dir, "train") if ev.split != "train" else []

    dup = {}
    if ev.decontam.enabled and train_rows:
        dup = find_duplicates(train_rows, rows, threshold=ev.decontam.threshold, num_perm=ev.decontam.num_perm,
                              k=ev.decontam.shingle_chars)
    if len(dup) == len(rows):
        raise DistillError(f"all {len(rows)} {ev.split} items duplicate a train item (eval.decontam.threshold="
                           f"{ev.decontam.threshold}); nothing clean to score: raise the threshold or set "
                           f"eval.decontam.enabled=false")

    endpoint = ev.endpoint.base_url
    if endpoint:
        if not ev.endpoint.model:
            raise DistillError("eval.endpoint.model is required with eval.endpoint.base_url (the model name the "
                               "server serves; llama.cpp accepts any)")
        predictor = {"kind": "endpoint", "base_url": endpoint, "model": ev.endpoint.model,
                     "prompt": ev.endpoint.prompt, "structured_output": ev.endpoint.structured_output}
        log.info("evaluate: scoring endpoint %s (model %s) on %d %s items", endpoint, ev.endpoint.model, len(rows),
                 ev.split)
        preds = predict_endpoint(cfg, task, rows, endpoint, ev.endpoint.model)
        val_preds = predict_endpoint(cfg, task, val_rows, endpoint, ev.endpoint.model) if val_rows else None
        device = "endpoint"
    elif cfg.student.kind == "embed_classifier":
        from distill.students.embed_classifier import EmbedClassifier

        clf = EmbedClassifier.from_run(cfg, run_dir)
        predictor = {"kind": "in_process", "student": cfg.student.name, "decode": "classifier"}
        preds = predict_classifier(cfg, task, rows, clf)
        val_preds = predict_classifier(cfg, task, val_rows, clf) if val_rows else None
        device = "cpu"
    else:
        from distill.models import load_student

        model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
        predictor = {"kind": "in_process", "student": cfg.student.name, "decode": ev.decode}
        preds = predict_in_process(cfg, task, rows, model, tokenizer)
        val_preds = predict_in_process(cfg, task, val_rows, model, tokenizer) if val_rows else None
        device = str(model.device)

    clean = [i for i, r in enumerate(rows) if r["id"] not in dup]
    boot = {"resamples": ev.bootstrap_resamples, "level": ev.confidence_level, "seed": cfg.seed}
    c_rows, c_preds = [rows[i] for i in clean], [preds.answers[i] for i in clean]
    metrics = score(c_rows, c_preds, task.schema, boot)
    metrics["invalid_by_reason"] = _count(preds.invalid_reason[i] for i in clean)
    metrics["failures"] = preds.failures
    agree = [p is not None and p == r["teacher"] for r, p in zip(rows, preds.answers)]
    c_agree = [agree[i] for i in clean]
    c_conf = [preds.confidence[i] for i in clean]

    from distill.metrics.stats import rate

    decontamination = {"enabled": ev.decontam.enabled, "method": "normalized exact match + MinHash LSH "
                       "(datasketch) confirmed by exact Jaccard of character shingles",
                       "threshold": ev.decontam.threshold, "shingle_chars": ev.decontam.shingle_chars,
                       "n_checked": len(rows), "n_excluded": len(dup), "n_clean": len(clean),
                       "exact": sum(d["kind"] == "exact" for d in dup.values()),
                       "near": sum(d["kind"] == "near" for d in dup.values()),
                       "items": [{"id": k, **v} for k, v in dup.items()],
                       "agreement_all_items": rate(agree, **boot)}
    lat = _latency([t for t, why in zip(preds.latency_s, preds.invalid_reason)
                    if why not in _TRANSPORT and not str(why).startswith("http_")])
    speed = {"items": len(rows), "wall_s": round(preds.wall_s, 3), "items_per_s": preds.items_per_s,
             "latency_p50_s": lat["p50"], "latency_p95_s": lat["p95"], "batch_size": ev.batch_size,
             "device": device, "predictor": predictor["kind"], "decode": predictor.get("decode"),
             "concurrency": ev.endpoint.concurrency if endpoint else None,
             "latency_note": "seconds until an item's answer was ready: its whole batch in process, its request "
                             "on an endpoint"}
    split_rows = {s: load_split(run_dir, s) for s in paths.SPLITS}
    ledger_file = Path(cfg.generate.shared_ledger) if cfg.generate.shared_ledger else paths.ledger_path(run_dir)
    usage = costs.ledger_usage(ledger_file, [r for s in paths.SPLITS for r in split_rows[s]])
    train_done = runio.read_done(run_dir, "train") or {}
    cost = costs.cost_case(cfg, usage, preds.items_per_s, lat, (train_done.get("summary") or {}).get("wall_s"),
                           _static_prefix_share(task, rows))

    per_item = [{"id": r["id"], "agree": bool(a), "valid": p is not None, "confidence": c,
                 "contaminated": r["id"] in dup}
                for r, p, a, c in zip(rows, preds.answers, agree, preds.confidence)]
    gate = gates.evaluate_gate(cfg, metrics, per_item, task.schema.fields)
    val_curve = []
    if val_preds is not None:
        val_agree = [p is not None and p == r["teacher"] for r, p in zip(val_rows, val_preds.answers)]
        val_curve = coverage_curve(val_preds.confidence, val_agree)
    calib = {"whole": calibration(c_conf, c_agree, ev.calibration_bins), "fields": {}}
    for f in task.schema.enums:
        fc = [(preds.field_confidence[i] or {}).get(f) if preds.field_confidence else None for i in clean]
        ok = [p is not None and p.get(f) == r["teacher"].get(f) for r, p in zip(c_rows, c_preds)]
        calib["fields"][f] = calibration(fc, ok, ev.calibration_bins)
    calib["target"] = "agreement with the teacher"
    results = {
        "schema_version": 2, "recipe": cfg.recipe.name, "split": ev.split, "student": cfg.student.name,
        "teacher": cfg.teacher.model, "predictor": predictor, "metrics": metrics,
        "confusion": {f: confusion([r["teacher"].get(f) for r in c_rows],
                                   [None if p is None else p.get(f) for p in c_preds], labels)
                      for f, labels in task.schema.enums.items()},
        "coverage_curve": coverage_curve(c_conf, c_agree), "val_coverage_curve": val_curve,
        "val": {"n": len(val_rows), "agreement": round(agreement(val_preds.answers, [r["teacher"] for r in val_rows]),
                                                       4) if val_preds is not None and val_rows else None},
        "calibration": calib, "cost": cost, "speed": speed, "decontamination": decontamination, "gate": gate,
        "per_item": per_item, "generate": generate.get("teacher_vs_gold"),
    }

    predictions = [{"id": r["id"], "input": r["input"], "teacher": r["teacher"], "gold": r.get("gold"),
                    "student_raw": t, "student": p, "invalid_reason": why, "confidence": c,
                    "field_confidence": fc, "latency_s": ls, "contaminated": r["id"] in dup}
                   for r, t, p, why, c, fc, ls in zip(rows, preds.raw, preds.answers, preds.invalid_reason,
                                                      preds.confidence, preds.field_confidence or [None] * len(rows),
                                                      preds.latency_s)]
    runio.write_jsonl(out_dir / paths.PREDICTIONS, predictions)
    runio.write_json(out_dir / paths.RESULTS, results)
    report.write_all(out_dir, results, predictions, ev.worst)
    for target, text in ((ev.junit_xml, gates.junit_xml(gate)), (ev.summary_md, gates.summary_markdown(results))):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a" if target == ev.summary_md else "w", encoding="utf-8") as fh:
                fh.write(text)

    valid = sum(p is not None for p in preds.answers)
    if endpoint and valid == 0:
        raise EndpointFailed(f"no valid answer from {endpoint} (model {ev.endpoint.model}) for any of {len(rows)} "
                             f"items: {_failure_text(preds.failures)}; report in {out_dir / paths.REPORT}")
    if endpoint and preds.failures:
        log.warning("evaluate: endpoint failures %s", _failure_text(preds.failures))
    log.info("evaluate: agreement %.3f [%s, %s] on %d clean items (%d duplicates left out), invalid %.3f, gate %s",
             metrics["agreement"]["exact"], metrics["agreement_ci"]["exact"]["low"],
             metrics["agreement_ci"]["exact"]["high"], len(clean), len(dup), metrics["invalid_rate"],
             "passed" if gate["passed"] else "FAILED")
    return {"metrics": {k: metrics[k] for k in ("n", "n_gold", "invalid_rate", "agreement", "student_vs_gold",
                                                "teacher_vs_gold") if k in metrics},
            "speed": speed, "gate": {k: gate[k] for k in ("passed", "reasons", "thresholds")},
            "cost": {k: cost[k] for k in ("teacher_usd_per_1k", "student_usd_per_1k", "break_even_requests")},
            "predictor": predictor, "results_sha256": runio.sha256_file(out_dir / paths.RESULTS)}


def _failure_text(failures: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])) or "none"


def raise_empty(run_dir: Path, split: str) -> None:
    raise DistillError(f"the {split} split in {paths.split_path(run_dir, split)} is empty: nothing to evaluate "
                       f"(label more inputs with generate.limit)")
