"""LoRA training throughput of the embedded CPU student (SmolLM2-135M-Instruct, fp32) through the train stage.

    python benchmarks/train_throughput.py [--runs 3] [--steps 6] [--batch 8] [--examples 64] [--no-record]

The support-tickets recipe is labelled once by distill's fake teacher (gold labels, loopback), then each run is
`python -m distill train ... student=smollm2_135m` in a fresh process on a fresh copy of that run dir. Per run:
  - tokens/s: non-padding tokens (prompt + answer) per second between the end of step 1 and the last step, from
    train/metrics.jsonl (step 1 is warm-up: allocator, first backward);
  - peak RSS of the training process (model load included);
  - the share of the machine's fp32 matmul peak it reaches: 4 x (base parameters) FLOPs per trained token (forward
    2, backward to the activations 2; the LoRA weights' own gradients are ignored) against the best torch GEMM
    (2048^3) measured before and after the runs with the same threads.
Median of ``--runs`` with min-max, and the load average before and after (other work on the machine slows the runs
and the GEMM alike). Prints the table last and appends it to BENCHMARKS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, gemm_peak_gflops, load_average, summary, table  # noqa: E402

FAKE_URL = "http://127.0.0.1:9/v1"  # the train stage never calls the teacher


def overrides(run_dir: Path, examples: int, *extra: str) -> list[str]:
    return ["recipe=support_tickets", f"run_dir={run_dir}", "profile=smoke", "teacher=openai",
            "teacher.model=fake-teacher", "teacher.api_key_env=null", f"generate.limit={examples}", *extra]


def label(run_dir: Path, examples: int) -> None:
    from distill import pipeline
    from distill.config import load_config
    from distill.testing.fake_teacher import FakeTeacher

    inputs = load_config(overrides(run_dir, examples, f"teacher.base_url={FAKE_URL}")).recipe_file("inputs")
    gold = {r["text"]: r["gold"] for r in map(json.loads, inputs.read_text().splitlines()) if r.get("gold")}

    def answer(messages):
        return json.dumps(gold.get(messages[-1]["content"], {"category": "feedback", "priority": "low"}))

    with FakeTeacher(answer) as teacher:
        pipeline.run(load_config(overrides(run_dir, examples, f"teacher.base_url={teacher.base_url}")),
                     ("generate",))


def child(argv: list[str], rss_file: Path) -> int:
    """One training run in this process; writes its peak RSS (MiB) afterwards."""
    from distill.__main__ import main

    rc = main(["train", *argv])
    rss_file.write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return rc


def one_run(labelled: Path, work: Path, i: int, args) -> dict:
    run_dir = work / f"run{i}"
    shutil.copytree(labelled, run_dir)
    train_args = overrides(run_dir, args.examples, f"teacher.base_url={FAKE_URL}", "student=smollm2_135m",
                           f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                           f"train.save_steps={args.steps}", "train.eval_steps=null")
    rss_file = work / f"rss{i}"
    cmd = [sys.executable, __file__, "--child", str(rss_file), *train_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    first, last = steps[0], steps[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    done = json.loads((run_dir / "train" / "DONE.json").read_text())["summary"]
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / (len(steps) - 1),
            "tokens_per_step": tokens / (len(steps) - 1), "peak_rss_mib": float(rss_file.read_text()),
            "base_params": done["total_params"] - done["trainable_params"], "threads": done["threads"],
            "losses": [round(r["loss"], 4) for r in steps]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[3:], Path(sys.argv[2])))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64, help="inputs labelled (train split is ~70%%)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up)")

    import torch

    load_before = load_average()
    gemm = [gemm_peak_gflops()]
    print(f"load average {load_before}; GEMM peak {gemm[0]:.1f} GFLOP/s ({torch.get_num_threads()} threads)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="distill-train-bench-") as tmp:
        work = Path(tmp)
        label(work / "labelled", args.examples)
        results = []
        for i in range(args.runs):
            r = one_run(work / "labelled", work, i, args)
            results.append(r)
            print(f"run {i + 1}/{args.runs}: {r['tokens_per_s']:.1f} tokens/s, {r['s_per_step']:.2f} s/step, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, losses {r['losses']}", flush=True)
    gemm.append(gemm_peak_gflops())
    load_after = load_average()
    peak = max(gemm)
    for r in results:
        r["flop_share"] = 4 * r["base_params"] * r["tokens_per_s"] / (peak * 1e9)

    def cell(key: str, fmt: str) -> list[str]:
        med, lo, hi = summary([r[key] for r in results])
        return [format(med, fmt), f"{format(lo, fmt)}-{format(hi, fmt)}"]

    per_example = results[0]["tokens_per_step"] / args.batch
    rows = [["SmolLM2-135M fp32, LoRA r=16 (7 projections)", f"{args.batch} x ~{per_example:.0f}",
             results[0]["threads"], *cell("tokens_per_s", ".1f"), *cell("s_per_step", ".2f"),
             *cell("peak_rss_mib", ".0f"), *cell("flop_share", ".3f")]]
    text = table(["model", "batch x tokens", "threads", "tokens/s (median)", "tokens/s min-max", "s/step (median)",
                  "s/step min-max", "peak RSS MiB (median)", "peak RSS min-max", "share of GEMM peak (median)",
                  "share min-max"], rows)
    text += (f"\n\nMedian of {args.runs} runs, each a fresh `python -m distill train ... student=smollm2_135m` "
             f"process: {args.steps} steps, throughput over steps 2-{args.steps}, trained (non-padding) tokens. "
             f"Share of GEMM peak: 4 x {results[0]['base_params'] / 1e6:.1f}M base parameters FLOPs per token at the "
             f"median tokens/s over the best fp32 torch GEMM (2048^3) of this machine, {peak:.1f} GFLOP/s "
             f"(before {gemm[0]:.1f}, after {gemm[1]:.1f}). Load average before {load_before}, after {load_after}. "
             f"Losses per step, run 1: {results[0]['losses']}.")
    print(text, flush=True)
    sys.argv[0] = str(Path(__file__).resolve())  # the recorded command names the script relative to the repo
    append("CPU: LoRA training throughput (SmolLM2-135M)", text, record=not args.no_record)


if __name__ == "__main__":
    main()
