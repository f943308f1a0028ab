"""The embedded teacher on its two runtimes, side by side: llama-cpp-python's server vs llama.cpp's C++ llama-server.

    python benchmarks/teacher_runtime.py [--items 10] [--runs 3] [--no-record]

The requests are the ones generate sends for the support_tickets recipe (distill's own request builders), in
generate's order: ``score`` (one 1-token top-20 log-probs request per input and field; the Python server started
with logits_all, as generate starts it) and ``label`` (the JSON answer under the schema's grammar, greedy). Each
runtime answers the same sequence, one request at a time, runtimes alternating per run (median of ``--runs``).

Reported per runtime and method: seconds per call, the new tokens each call evaluates (llama-server's
``timings.prompt_n``: the prompt after the slot's cached prefix), the runtime's prompt-eval rate (a ~550-token
prompt sharing no prefix, tokens/s) and the issue's limit, new tokens / prompt-eval rate. Agreement: the same top
token and the same best allowed value per score request, the largest log-prob difference over the tokens both
top-20 lists hold, the same answer text per label request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, table  # noqa: E402


def post(base_url: str, body: dict, timeout: float = 300) -> tuple[float, dict]:
    req = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - started, out


def build_requests(items: int) -> tuple[dict[str, list[dict]], list, object]:
    from distill.config import load_config
    from distill.task import Task
    from distill.teacher.request import build_chat_request, build_score_request, wire_body
    from distill.teacher.scoring import field_messages

    cfg = load_config(["recipe=support_tickets", "teacher=local", "teacher.runtime=llama_cpp_python"])
    task = Task(cfg)
    examples = task.load_inputs(items).examples[:items]
    score, fields = [], []
    for field in task.schema.fields:  # field by field, as generate's score_all sends them
        for ex in examples:
            score.append(wire_body(build_score_request(cfg.teacher, field_messages(task, ex.text, field))))
            fields.append(field)
    label = [wire_body(build_chat_request(cfg.teacher, task.schema, task.teacher_messages(ex.text), 0, None))
             for ex in examples]
    return {"score": score, "label": label}, fields, task


def long_prompt(model: str, nonce: int) -> dict:
    words = " ".join(f"w{(nonce * 7919 + i) % 1000}" for i in range(150))  # ~550 tokens, no shared prefix
    return {"model": model, "max_tokens": 1, "temperature": 0.0,
            "messages": [{"role": "user", "content": f"{nonce} {words}"}]}


def run_block(server, requests: list[dict], nonce: int) -> dict:
    post(server.base_url, requests[0])  # warm-up (the first call evaluates the whole prompt on either runtime)
    secs, bodies = [], []
    for body in requests:
        sec, out = post(server.base_url, body)
        secs.append(sec)
        bodies.append(out)
    rates = []
    for k in range(3):
        sec, out = post(server.base_url, long_prompt(requests[0]["model"], nonce * 10 + k))
        rates.append(out["usage"]["prompt_tokens"] / sec)
    return {"secs": secs, "bodies": bodies, "rate": statistics.median(rates)}


def top_list(body: dict) -> list[tuple[str, float]]:
    content = (body["choices"][0].get("logprobs") or {}).get("content") or []
    return [(t["token"], float(t["logprob"])) for t in content[0]["top_logprobs"]] if content else []


def agreement(method: str, a: list[dict], b: list[dict], fields: list, task) -> dict:
    if method == "label":
        same = sum(x["choices"][0]["message"]["content"] == y["choices"][0]["message"]["content"]
                   for x, y in zip(a, b))
        return {"same_answer": f"{same}/{len(a)}"}
    from distill.teacher.scoring import value_scores

    same_top = same_value = 0
    diffs = []
    for x, y, field in zip(a, b, fields):
        ta, tb = top_list(x), top_list(y)
        same_top += bool(ta and tb and ta[0][0] == tb[0][0])
        values = task.schema.enums[field]
        sa, sb = value_scores(ta, values), value_scores(tb, values)
        same_value += sa.index(max(sa)) == sb.index(max(sb))
        db = dict(tb)
        diffs += [abs(lp - db[tok]) for tok, lp in ta if tok in db]
    return {"same_top_token": f"{same_top}/{len(a)}", "same_best_value": f"{same_value}/{len(a)}",
            "max_abs_logprob_diff": max(diffs) if diffs else None,
            "median_abs_logprob_diff": statistics.median(diffs) if diffs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10, help="inputs (score sends one request per input and field)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slots", type=int, default=1, help="llama-server slots")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from distill.teacher.server import LlamaCppServer, LlamaServer, embedded_gguf, llama_server_binary

    if llama_server_binary() is None:
        raise SystemExit("the native llama-server is not built: python scripts/build_llama_server.py --version ...")
    gguf = embedded_gguf()
    requests, fields, task = build_requests(args.items)
    log_path = Path(tempfile.gettempdir()) / "distill-teacher-runtime-bench.log"

    def server(runtime: str, method: str):
        if runtime == "llama_server":
            return LlamaServer(gguf, alias=requests[method][0]["model"], slots=args.slots, log_path=log_path)
        return LlamaCppServer(gguf, alias=requests[method][0]["model"], logits_all=method == "score",
                              log_path=log_path)

    runtimes = ["llama_cpp_python", "llama_server"]
    per: dict = {(r, m): [] for r in runtimes for m in requests}
    for run in range(args.runs):
        for method in requests:
            for runtime in runtimes if run % 2 == 0 else runtimes[::-1]:
                with server(runtime, method) as srv:
                    per[runtime, method].append(run_block(srv, requests[method], run))
                block = per[runtime, method][-1]
                print(f"run {run} {method:5s} {runtime:16s} {statistics.median(block['secs']):.3f} s/call "
                      f"prompt-eval {block['rate']:.0f} tok/s", flush=True)

    rows, notes = [], []
    for method in requests:
        native_bodies = per["llama_server", method][0]["bodies"]
        new_tokens = [b.get("timings", {}).get("prompt_n") for b in native_bodies]
        new_med = statistics.median(n for n in new_tokens if n is not None)
        for runtime in runtimes:
            blocks = per[runtime, method]
            sec = statistics.median(statistics.median(b["secs"]) for b in blocks)
            rate = statistics.median(b["rate"] for b in blocks)
            limit = new_med / rate
            rows.append([method, runtime, len(blocks[0]["secs"]), f"{sec:.3f}", f"{new_med:.0f}", f"{rate:.0f}",
                         f"{limit:.3f}", f"{sec / limit:.1f}x"])
        py_sec = statistics.median(statistics.median(b["secs"]) for b in per["llama_cpp_python", method])
        nat_sec = statistics.median(statistics.median(b["secs"]) for b in per["llama_server", method])
        agree = agreement(method, per["llama_cpp_python", method][0]["bodies"], native_bodies, fields, task)
        notes.append(f"{method}: llama-server {py_sec / nat_sec:.1f}x faster per call; agreement {json.dumps(agree)}")
    text = (f"Embedded teacher (SmolLM2-135M-Instruct Q4_1), support_tickets, {args.items} inputs, one request at a "
            f"time, median of {args.runs} runs (runtimes alternating); llama-server {args.slots} slot(s). Limit = "
            f"median new tokens per call / prompt-eval rate.\n\n"
            + table(["method", "runtime", "calls", "s/call", "new tokens/call", "prompt-eval tok/s", "limit s",
                     "s/call / limit"], rows) + "\n\n" + "\n".join(f"- {n}" for n in notes))
    append("Embedded teacher runtime: llama-cpp-python server vs native llama-server", text,
           record=not args.no_record)
    print(text)


if __name__ == "__main__":
    main()
