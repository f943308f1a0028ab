"""The student runtime: the published GGUF in llama.cpp, answering with evaluate's scored confidence, on loopback.

    python -m distill.serve.runtime --model publish/model/X-q8_0.gguf --tokenizer publish/model/hf --port 8090
    curl -s 127.0.0.1:8090/v1/distill/score -d '{"messages": [...], "schema": {...}, "max_new_tokens": 48}'

``distill serve`` starts it as a child process (``StudentRuntime``) and stops it on exit; you can also run it
yourself and point ``serve.student_endpoint`` at it. Routes: ``GET /v1/models``, ``GET /health`` and
``POST /v1/distill/score``, which renders the messages with the artifact's own chat template (as train did) and
returns ``{"answer", "text", "invalid_reason", "confidence", "field_confidence", "prompt_tokens"}``
(``distill.serve.scored``).

Why not llama-cpp-python's own server: reading prompt log-probs there takes its completions endpoint with ``echo``,
which builds a sorted top list over the whole vocabulary in Python for every echoed token: 1.5-2 s for a 45-token
prompt on the tiny test model, and a scored answer needs one such request per allowed value. Here the model is driven
through the same ``llama_cpp`` bindings directly (the same log-probs: checked against that endpoint): the KV cache
of the longest prefix shared with the last request is kept, and an enum field's allowed values are scored in one
decode as a token trie on top of the prompt (``LlamaTokens.trie_rows``; the prompt's uncached tokens ride in the
same call), so a support-ticket answer takes one decode per field instead of one per value. Requests run one at a
time, on one worker thread (``Scorer``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.special import log_softmax

from distill import DistillError
from distill.task import common_prefix
from distill.teacher.server import LoopbackServer

log = logging.getLogger("distill")

SCORE_PATH = "/distill/score"   # under the runtime's /v1 base URL
DEFAULT_N_CTX = 2048            # as publish serves its GGUFs for the parity check
TRIE_SEQS = 255                 # candidates one tree decode may score (llama.cpp's LLAMA_MAX_SEQ is 256, one cached)
# The largest trie decoded in one call (also capped at the context's n_batch). Past it the bound's candidate-by-
# candidate path is used: a trie node costs about one token (~1.8 ms for SmolLM2-135M q8_0 on 2 cores) and a decode
# call about 12 tokens more than its tokens, so the tree costs ~nodes and the bound ~k x (12 + a value's tokens) for
# the k candidates it scores: 3-13 on trained students, which puts the crossover between ~50 and ~220 nodes; 64
# keeps the tree where it cannot lose by much and the bound where a confident student needs it
# (benchmarks/served_scoring.py, BENCHMARKS.md "Scored decoding against the number of values").
TRIE_MAX_NODES = 64


class ContextOverflow(ValueError):
    """A prompt (with its candidates) longer than the runtime's context: the request's problem, not the runtime's."""


class LlamaTokens:
    """``scored.TokenModel`` over a GGUF in llama.cpp: keeps the KV cache of the longest shared prefix, and computes
    logits only at the positions a score is read from (a candidate's tokens, each generated token): the prompt's
    other positions need no row over the vocabulary (``all_rows=True``: a row at every position, as before)."""

    def __init__(self, gguf: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, all_rows: bool = False,
                 trie_seqs: int = TRIE_SEQS):
        # logits_all: a logit row for every position of a batch, so a candidate's tokens are scored in one pass;
        # _eval turns it off for the stretch of a prompt no score is read from.
        self.llm = _open_llama(gguf, n_ctx, n_threads or os.cpu_count() or 1, trie_seqs + 1)
        self.n_ctx, self.all_rows = n_ctx, all_rows
        self._rows = np.zeros(n_ctx, dtype=bool)  # positions whose logit row in llm.scores is valid
        self.evaluated_tokens = 0  # tokens run through the model (not taken from the KV cache), for benchmarks
        self.decode_calls = 0      # llama_decode calls (each streams every weight once), for tests and benchmarks
        from llama_cpp import llama_cpp as lib

        # sequences beside the cached one (seq 0) that one tree decode may use: 0 turns trie_rows off
        self.trie_seqs = min(trie_seqs, int(lib.llama_n_seq_max(self.llm._ctx.ctx)) - 1)
        self._batch = None

    def _eval(self, ids: list[int], start: int, rows: bool) -> None:
        """Run ``ids`` at positions ``start`` on (the KV cache from ``start`` on is dropped), with or without their
        logit rows."""
        llm = self.llm
        llm.n_tokens = start  # eval() drops the KV cache from n_tokens on
        llm._logits_all = rows
        try:
            llm.eval(ids)
        finally:
            llm._logits_all = True
        self._rows[start:start + len(ids)] = rows
        self.evaluated_tokens += len(ids)
        self.decode_calls += -(-len(ids) // llm.n_batch)

    def _hold(self, ids: list[int], rows_from: int) -> None:
        """Make the context hold ``ids`` with a valid logit row at every position from ``rows_from`` on: the shared
        prefix stays cached (a cached position that lacks a needed row is run again), the rest is evaluated."""
        if len(ids) > self.n_ctx:
            raise ContextOverflow(f"{len(ids)} tokens do not fit the runtime's context of {self.n_ctx}")
        if self.all_rows:
            rows_from = 0
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            keep += 1
        missing = np.flatnonzero(~self._rows[rows_from:keep])
        if missing.size:
            keep = rows_from + int(missing[0])
        if keep < len(ids):
            split = max(keep, rows_from)
            if split > keep:
                self._eval(ids[keep:split], keep, rows=False)
            self._eval(ids[split:], split, rows=True)

    def _row_logp(self, position: int) -> np.ndarray:
        return _log_softmax(self.llm.scores[position])

    def path_logprobs(self, ids: list[int], start: int, want: list[list[int]]) -> list[list[float]]:
        """At each position j >= start, the log-probs of the tokens ``want[j - start]`` (``scored.TokenModel``)."""
        self._hold(ids, start - 1)
        return [[float(x) for x in self._row_logp(j - 1)[w]] for j, w in zip(range(start, len(ids)), want)]

    def logprobs(self, ids: list[int], start: int) -> list[float]:
        self._hold(ids, start - 1)
        return [float(self._row_logp(j - 1)[ids[j]]) for j in range(start, len(ids))]

    def trie_rows(self, seqs: list[list[int]], starts: list[int]) -> "TrieRows | None":
        """Every log-prob the candidates ``seqs`` (each read from ``starts[i]`` on) can ask for, from one decode.

        The candidates' tokens after their shared prefix form a token trie; each trie node is evaluated once, in
        one ``llama_decode`` call, as a token of every candidate under it (llama.cpp's sequence ids: a token that
        belongs to several sequences is attended to by each of them, and the cells of one sequence only by it, so
        each candidate sees the prompt and its own path, the exact causal context of scoring it alone). The part
        of the shared prefix that is not cached yet rides in the same call, in every sequence, and stays cached
        (sequence 0) for what follows; the last token of a candidate needs no row, so it is not run. What comes
        back answers ``logprobs`` and ``path_logprobs`` for those candidates (``TrieRows``) without running the
        model again, so the bound in ``scored.bounded_tail_probs`` costs no further call. One call instead of one
        per candidate (and one or two for the prompt): on a CPU a call of a few tokens is bound by streaming every
        weight once. None (the caller scores candidate by candidate) when the trie alone is larger than
        ``TRIE_MAX_NODES`` nodes, the candidates more than the context's spare sequences, or ``all_rows`` is
        set."""
        if not seqs or self.trie_seqs < 1 or self.all_rows:
            return None
        distinct = sorted({tuple(q) for q in seqs})
        shared = min(starts)
        for q in distinct[1:]:
            shared = min(shared, common_prefix(distinct[0], q))
        if shared < 1 or len(distinct) > self.trie_seqs:
            return None
        members: dict[tuple, list[int]] = {}   # trie node (tokens after the shared prefix) -> candidates under it
        for n, q in enumerate(distinct):
            for end in range(shared + 1, len(q)):  # the last token of a candidate is never run
                members.setdefault(q[shared:end], []).append(n + 1)
        if len(members) > min(TRIE_MAX_NODES, self.llm.n_batch):
            return None
        prefix = list(distinct[0][:shared])
        if shared + max((len(node) for node in members), default=0) > self.n_ctx:
            raise ContextOverflow(f"{len(prefix)} prompt tokens and their candidates do not fit the runtime's context "
                             f"of {self.n_ctx}")
        llm = self.llm
        keep = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prefix)
        if keep == shared and not self._rows[shared - 1]:
            keep = shared - 1  # cached without the row the first candidate token is read from: run it again
        if shared - keep + len(members) > self.llm.n_batch:  # a long prompt: cached first, then the trie alone
            self._hold(prefix, shared - 1)
            keep = shared
        nodes = sorted(members, key=len)  # by depth: every sequence's positions rise through the batch
        return self._decode_tree(prefix, keep, nodes, members, len(distinct))

    def _decode_tree(self, prefix: list[int], keep: int, nodes: list[tuple], members: dict,
                     n_seqs: int) -> "TrieRows":
        """One ``llama_decode``: ``prefix[keep:]`` in every sequence (0, the cached one, and 1..n_seqs, each a copy
        of the cached ``prefix[:keep]``), then the trie ``nodes`` in the sequences ``members[node]``. Returns the
        logit rows after the prefix and after each node. The copies are removed again, so the cache
        then holds ``prefix`` in sequence 0 alone."""
        from llama_cpp import llama_cpp as lib

        llm = self.llm
        shared, run = len(prefix), prefix[keep:]
        if not run and not nodes:
            return TrieRows(shared, np.asarray(llm.scores[shared - 1:shared], dtype=np.float32), {})
        ctx, mem = llm._ctx.ctx, llm._ctx.memory
        if self._batch is None:
            self._batch = _Batch(llm.n_batch, self.trie_seqs + 1)
        batch = self._batch.batch
        llm._ctx.kv_cache_seq_rm(0, keep, -1)
        llm.n_tokens = keep
        for s in range(1, n_seqs + 1):
            lib.llama_memory_seq_cp(mem, 0, s, 0, keep)
        every = list(range(n_seqs + 1))
        done = False
        try:
            batch.n_tokens = len(run) + len(nodes)
            for i, (token, pos, seq_ids) in enumerate([(t, keep + j, every) for j, t in enumerate(run)]
                                                      + [(n[-1], shared + len(n) - 1, members[n]) for n in nodes]):
                batch.token[i], batch.pos[i], batch.logits[i] = token, pos, i >= len(run) - 1
                batch.n_seq_id[i] = len(seq_ids)
                row = batch.seq_id[i]
                for m, s in enumerate(seq_ids):
                    row[m] = s
            code = lib.llama_decode(ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} on {batch.n_tokens} tokens of a candidate trie")
            self.evaluated_tokens += batch.n_tokens
            self.decode_calls += 1
            n_vocab = llm.n_vocab()

            def logits(i: int) -> np.ndarray:
                return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

            if run:  # the prefix is sequence 0's now: its last row is kept where _row_logp reads rows
                llm.input_ids[keep:shared] = run
                llm.scores[shared - 1, :] = logits(len(run) - 1)
                self._rows[keep:shared - 1] = False
                self._rows[shared - 1] = True
                llm.n_tokens = shared
            block = np.empty((len(nodes) + 1, n_vocab), dtype=np.float32)  # raw logits: the next decode reuses
            block[0] = llm.scores[shared - 1]                                 # llama.cpp's buffer
            for i in range(len(nodes)):
                block[i + 1] = logits(len(run) + i)
            done = True
            return TrieRows(shared, block, {node: i + 1 for i, node in enumerate(nodes)})
        finally:
            for s in range(1, n_seqs + 1):
                lib.llama_memory_seq_rm(mem, s, -1, -1)
            if not done:  # nothing of this call stays cached
                llm._ctx.kv_cache_seq_rm(0, keep, -1)
                llm.n_tokens = keep

    def greedy(self, ids: list[int], max_new_tokens: int, stop_id: int,
               done: Callable[[list[int]], bool]) -> tuple[list[int], list[float]]:
        seq, new, logps = list(ids), [], []
        self._hold(seq, len(seq) - 1)
        for _ in range(max_new_tokens):
            logp = self._row_logp(len(seq) - 1)
            token = int(logp.argmax())
            new.append(token), logps.append(float(logp[token])), seq.append(token)
            if token == stop_id or done(new):
                break
            self._hold(seq, len(seq) - 1)
        return new, logps


def _log_softmax(logits) -> np.ndarray:
    return log_softmax(np.asarray(logits, dtype=np.float64))


class TrieRows:
    """``scored.TokenModel``'s ``logprobs`` / ``path_logprobs`` for the candidates of one ``LlamaTokens.trie_rows``
    call, read from the rows it decoded: ``logits[index[node]]`` is the logit row after the ``shared`` prefix tokens
    and ``node`` (``logits[0]`` after the prefix alone). A row is log-softmaxed when first read: the bound reads few
    of them."""

    def __init__(self, shared: int, logits: np.ndarray, index: dict[tuple, int]):
        self.shared, self.logits, self.index = shared, logits, index
        self._logp: dict[int, np.ndarray] = {}

    def _row(self, ids: list[int], j: int) -> np.ndarray:
        i = self.index[tuple(ids[self.shared:j])] if j > self.shared else 0
        if i not in self._logp:
            self._logp[i] = _log_softmax(self.logits[i])
        return self._logp[i]

    def logprobs(self, ids: list[int], start: int) -> list[float]:
        return [float(self._row(ids, j)[ids[j]]) for j in range(start, len(ids))]

    def path_logprobs(self, ids: list[int], start: int, want: list[list[int]]) -> list[list[float]]:
        return [[float(x) for x in self._row(ids, j)[w]] for j, w in zip(range(start, len(ids)), want)]


class _Batch:
    """A ``llama_batch`` of up to ``n_tokens`` tokens, each in up to ``n_seq`` sequences; freed with the object."""

    def __init__(self, n_tokens: int, n_seq: int):
        from llama_cpp import llama_cpp as lib

        self._free = lib.llama_batch_free
        self.batch = lib.llama_batch_init(n_tokens, 0, n_seq)

    def __del__(self):
        self._free(self.batch)


def _open_llama(gguf: Path, n_ctx: int, n_threads: int, n_seq: int):
    """``llama_cpp.Llama`` on a context with ``n_seq`` sequences in one unified KV cache (every sequence may use the
    whole context; the prompt's cells are shared, not copied). ``Llama`` does not take ``n_seq_max`` itself (it
    opens one sequence), so its context defaults are extended for the duration of the call; where the installed
    bindings ignore them, the context has one sequence and ``trie_rows`` stays off."""
    from llama_cpp import Llama  # heavy native library: only the runtime process loads it
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_context_default_params

    def params():
        p = defaults()
        p.n_seq_max, p.kv_unified = max(1, n_seq), True
        return p

    lib.llama_context_default_params = params
    try:
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=n_threads, logits_all=True, verbose=False)
    finally:
        lib.llama_context_default_params = defaults


class Scorer:
    """Messages + schema -> scored answer, on one llama.cpp context (one request at a time).

    Every decode runs on the scorer's one worker thread, whichever thread asks: llama.cpp's CPU backend runs each
    decode on an OpenMP team that belongs to the calling thread, and a team whose thread is done keeps spinning on
    the cores for a while, so decodes called from a server's thread pool in turn (one team per pool thread) took
    cores from each other's teams: 4.5 tickets/s at 8 concurrent requests against 5.8 at one
    (``benchmarks/inference.py``), and the same rate at both from one thread."""

    def __init__(self, gguf: Path, tokenizer_dir: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None):
        from transformers import AutoTokenizer

        from distill.student.template import end_of_turn

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.eot = end_of_turn(self.tokenizer)
        self.model = LlamaTokens(gguf, n_ctx, n_threads)
        self._schemas: dict[str, object] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="distill-llama")

    def score(self, messages: list[dict], schema: dict, max_new_tokens: int) -> dict:
        import json
        from dataclasses import asdict

        from distill.serve.scored import scored_answer
        from distill.task import OutputSchema
        from distill.student.template import render_prompt

        key = json.dumps(schema, sort_keys=True)
        if key not in self._schemas:
            self._schemas[key] = OutputSchema(schema)
        prompt_ids = self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=False)["input_ids"]
        answer = self._worker.submit(scored_answer, self.model, self.tokenizer, prompt_ids, self._schemas[key],
                                     self.eot, max_new_tokens).result()
        return asdict(answer)


def create_app(scorer: Scorer, alias: str):
    """The runtime's ASGI app (Starlette)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "distill"}]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def score(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            messages, schema = body["messages"], body["schema"]
            max_new = int(body.get("max_new_tokens", 48))
        except Exception as exc:  # a malformed request from a client other than the gateway
            return JSONResponse({"error": {"message": f"bad score request: {type(exc).__name__}: {exc}",
                                           "type": "invalid_request_error"}}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(scorer.score, messages, schema, max_new))
        except ValueError as exc:  # e.g. a prompt longer than the context: the request's problem, not the runtime's
            code = "context_length_exceeded" if isinstance(exc, ContextOverflow) else None
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "code": code}},
                                status_code=400)

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health),
                             Route(f"/v1{SCORE_PATH}", score, methods=["POST"])])


class StudentRuntime(LoopbackServer):
    """``python -m distill.serve.runtime`` as a child process on 127.0.0.1; always stopped (exit, error, atexit)."""

    def __init__(self, gguf: Path, tokenizer_dir: Path, *, alias: str = "student", n_ctx: int = DEFAULT_N_CTX,
                 n_threads: int | None = None, log_path: Path | None = None, startup_timeout_s: float = 120):
        self.gguf, self.tokenizer_dir = Path(gguf), Path(tokenizer_dir)
        for path in (self.gguf, self.tokenizer_dir):
            if not path.exists():
                raise DistillError(f"the published student file {path} does not exist; re-run publish")
        super().__init__(log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.alias, self.n_ctx, self.n_threads = alias, n_ctx, n_threads
        self.what, self.model_name = "the student runtime", self.gguf.name

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "distill.serve.runtime", "--model", str(self.gguf), "--tokenizer",
               str(self.tokenizer_dir), "--port", str(self.port), "--alias", self.alias, "--n-ctx", str(self.n_ctx)]
        if self.n_threads:
            cmd += ["--n-threads", str(self.n_threads)]
        return cmd


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m distill.serve.runtime", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the published GGUF")
    parser.add_argument("--tokenizer", required=True, type=Path, help="publish/model/hf (tokenizer + chat template)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--alias", default="student")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument("--n-threads", type=int, default=None)
    args = parser.parse_args(argv)
    scorer = Scorer(args.model, args.tokenizer, args.n_ctx, args.n_threads)
    uvicorn.run(create_app(scorer, args.alias), host=args.host, port=args.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
