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
through the same ``llama_cpp`` bindings directly (the same log-probs: checked against that endpoint): the prompt is
evaluated once, its KV cache kept, and only each candidate value's few tokens are evaluated on top of it (25-50 ms
for a whole support-ticket answer on the tiny model). Requests run one at a time (one llama.cpp context).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from distill import DistillError
from distill.teacher.server import LoopbackServer

log = logging.getLogger("distill")

SCORE_PATH = "/distill/score"   # under the runtime's /v1 base URL
DEFAULT_N_CTX = 2048            # as publish serves its GGUFs for the parity check


class LlamaTokens:
    """``scored.TokenModel`` over a GGUF in llama.cpp: keeps the KV cache of the longest shared prefix, and computes
    logits only at the positions a score is read from (a candidate's tokens, each generated token): the prompt's
    other positions need no row over the vocabulary (``all_rows=True``: a row at every position, as before)."""

    def __init__(self, gguf: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, all_rows: bool = False):
        from llama_cpp import Llama  # heavy native library: only the runtime process loads it

        # logits_all: a logit row for every position of a batch, so a candidate's tokens are scored in one pass;
        # _eval turns it off for the stretch of a prompt no score is read from.
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count() or 1,
                         logits_all=True, verbose=False)
        self.n_ctx, self.all_rows = n_ctx, all_rows
        self._rows = np.zeros(n_ctx, dtype=bool)  # positions whose logit row in llm.scores is valid
        self.evaluated_tokens = 0  # tokens run through the model (not taken from the KV cache), for benchmarks

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

    def _hold(self, ids: list[int], rows_from: int) -> None:
        """Make the context hold ``ids`` with a valid logit row at every position from ``rows_from`` on: the shared
        prefix stays cached (a cached position that lacks a needed row is run again), the rest is evaluated."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the runtime's context of {self.n_ctx}")
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
        row = np.asarray(self.llm.scores[position], dtype=np.float64)
        top = row.max()
        return row - (top + np.log(np.exp(row - top).sum()))

    def path_logprobs(self, ids: list[int], start: int, want: list[list[int]]) -> list[list[float]]:
        """At each position j >= start, the log-probs of the tokens ``want[j - start]`` (``scored.TokenModel``)."""
        self._hold(ids, start - 1)
        return [[float(x) for x in self._row_logp(j - 1)[w]] for j, w in zip(range(start, len(ids)), want)]

    def logprobs(self, ids: list[int], start: int) -> list[float]:
        self._hold(ids, start - 1)
        return [float(self._row_logp(j - 1)[ids[j]]) for j in range(start, len(ids))]

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


class Scorer:
    """Messages + schema -> scored answer, on one llama.cpp context (one request at a time)."""

    def __init__(self, gguf: Path, tokenizer_dir: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None):
        from transformers import AutoTokenizer

        from distill.student.template import end_of_turn

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.eot = end_of_turn(self.tokenizer)
        self.model = LlamaTokens(gguf, n_ctx, n_threads)
        self._schemas: dict[str, object] = {}
        self._lock = threading.Lock()

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
        with self._lock:
            return asdict(scored_answer(self.model, self.tokenizer, prompt_ids, self._schemas[key], self.eot,
                                        max_new_tokens))


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
        except ValueError as exc:  # e.g. a prompt longer than the context
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, status_code=400)

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
