"""What a teacher request is: its canonical form, the ledger key's rule, and the JSON body actually sent.

    request = build_chat_request(cfg.teacher, task.schema, messages, attempt=0, sample=None)
    key = request_key(request)     # the ledger key: sha256 of the canonical request
    body = wire_body(request)      # what goes over the wire (online and in a Batch API file alike)

Keys starting with ``_`` are part of the key and never sent (``teacher_identity``, the schema's hash).
"""

from __future__ import annotations

import functools
import urllib.parse
from pathlib import Path

from distill import runio
from distill.config import TeacherConfig
from distill.task import OutputSchema
from distill.teacher.scoring import TOP_LOGPROBS
from distill.teacher.server import embedded_gguf, resolve_runtime

DEFAULT_N_CTX = 4096


def teacher_identity(tcfg: TeacherConfig) -> dict:
    """What identifies the model behind ``teacher.model``, beyond its name: part of every ledger key, never sent.

    The rule for a request key (the one place it is decided): it covers exactly what changes the answer. That is
    the body sent (model, messages, sampling, response format, logprobs, seed) plus what the body cannot show: for a
    local teacher the model file's sha256 and its context size (never the loopback port of the server distill
    starts for it), for a remote one the base URL (another provider serving the same model name is another
    teacher), and for structured answers the schema (an answer bought under one schema is never served under
    another, even with ``structured_output=none``). Speed and retry knobs are not part of it. A local teacher's
    runtime is: llama.cpp's C++ server and llama-cpp-python's return log-probs that differ in the last digits and
    sample differently, so the native one adds ``"runtime": "llama_server"`` (keys of llama-cpp-python's answers
    stay the ones ledgers already hold).
    """
    if tcfg.kind == "llama_cpp":
        path = Path(tcfg.model_path) if tcfg.model_path else embedded_gguf()
        stat = path.stat()
        identity = {"gguf_sha256": _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns),
                    "n_ctx": tcfg.n_ctx or DEFAULT_N_CTX}
        if (runtime := resolve_runtime(tcfg.runtime)) != "llama_cpp_python":
            identity["runtime"] = runtime
        return identity
    url = urllib.parse.urlsplit((tcfg.base_url or "").rstrip("/"))
    host = url.hostname or ""  # never user:password@ (the key is stored in the ledger's request column)
    netloc = f"{host}:{url.port}" if url.port else host
    return {"base_url": urllib.parse.urlunsplit((url.scheme.lower(), netloc.lower(), url.path, url.query, ""))}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file is hashed again
    return runio.sha256_file(Path(path))


def build_chat_request(tcfg: TeacherConfig, schema: OutputSchema, messages: list[dict], attempt: int,
                       sample: int | None, *, structured: bool = True) -> dict:
    """The canonical request; its hash is the ledger key (see ``teacher_identity`` for what a key covers).

    Attempt 0 is greedy; later attempts and votes sample. ``sample`` (self-consistency, synthesis) is part of the
    key, so the k votes are k distinct paid calls, each paid once. ``structured=False`` (free text, synthesis)
    sends no response format, and the schema is then not part of the key. Keys starting with _ are not sent.
    """
    sampled = attempt > 0 or sample is not None
    request = {"model": tcfg.model, "messages": messages, "max_tokens": tcfg.max_tokens,
               "temperature": max(tcfg.temperature, 0.7) if sampled else tcfg.temperature,
               "_teacher": teacher_identity(tcfg)}
    if structured:
        request["response_format"] = schema.response_format(tcfg.structured_output)
        if extra := schema.extra_body(tcfg.structured_output):
            request["extra_body"] = extra
        request["_schema"] = schema.sha256
    seed = (sample or 0) * 1000 + attempt
    if seed:
        request["seed"] = seed
    return request


def build_score_request(tcfg: TeacherConfig, messages: list[dict]) -> dict:
    """A one-token request for the first answer token's top log-probs (``teacher.method=score``)."""
    return {"model": tcfg.model, "messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
            "top_logprobs": TOP_LOGPROBS, "_teacher": teacher_identity(tcfg)}


def wire_body(request: dict) -> dict:
    """The JSON body sent for a canonical request: ``extra_body`` merged in, private (_) and null keys left out.

    The one place a request is stripped for sending: the online client and the Batch API's input file both use it.
    """
    body = {k: v for k, v in request.items() if k != "extra_body" and not k.startswith("_") and v is not None}
    body.update(request.get("extra_body") or {})
    return body
