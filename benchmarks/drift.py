"""Drift alarms on a simulated request stream: false alarms when nothing changes, and how many requests after a
change the alarm fires (median of seeds), for the gateway's two detectors as the gateway feeds them.

    python benchmarks/drift.py [--requests 5000] [--change-at 2000] [--seeds 5] [--rates 0.05,0.1,0.25] [--no-record]

The stream is simulated in process, request by request, with the detectors of ``distill.serve.drift`` fed exactly
as ``distill.serve.shadow.Watch`` feeds them: every student answer goes to the answer-distribution test (chi-square
against the student's answers on held-out items, windows of ``serve.drift.answer_window``); the answers the student
keeps (confidence >= threshold) are sampled at the shadow rate and compared with the teacher's (ADWIN + Wilson
bound against routing.yaml's target minus ``serve.drift.margin``). Default settings of the ``serve`` config.

Scenarios (9 known categories in training, the rule's target agreement 0.95, so the alarm floor is 0.90):
  stationary    5,000 requests over the known categories; the student keeps 80% at agreement 0.97
  new category  from request 2,000, 30% of the inputs are a category the student never saw; it answers its
                nearest known one, confidently, and is always wrong there
  worse student from request 2,000 the student is swapped for one whose kept agreement is 0.80 (same answer mix)

    python benchmarks/drift.py --inputs [--held-out ACCOUNT] [--seeds 5] [--no-record]

``--inputs``: the input-drift test (``serve.drift.inputs``) on the shared Bitext data (``../shared/data``) with the
packaged MiniLM, fed as ``InputWatch`` feeds it (``InputDrift``, serve.drift defaults). Per seed the tickets of every
category but ``--held-out`` are shuffled into train (1,500), val (300) and a pool the stream draws from; the
reference is val's distances to train, as at gateway start. Scenarios: stationary (5,000 pool tickets), and from
request 2,000 a share (5%, 10%, 30%, 100%) of the inputs from the held-out category.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append, table  # noqa: E402
from distill.config.serve import DriftConfig  # noqa: E402
from distill.serve.drift import AgreementDrift, AnswerDrift  # noqa: E402

KNOWN = [f"c{i}" for i in range(9)]
NEW = "c9"
TARGET = 0.95
KEEP = 0.80          # share of answers the student keeps (confidence >= threshold)
AGREE = 0.97         # agreement of the kept answers with the teacher, on known categories
WORSE = 0.80         # the swapped-in student's kept agreement
NEW_SHARE = 0.30     # share of inputs from the new category after the change


def simulate(scenario: str, seed: int, requests: int, change_at: int, rate: float, d: DriftConfig) -> dict:
    """First request index at which each detector alarms (None: never)."""
    rng = random.Random(seed)
    reference = [{"category": rng.choice(KNOWN)} for _ in range(400)]  # held-out answers: the known mix
    agreement = AgreementDrift(TARGET, d.margin, delta=d.delta, confidence=d.confidence, min_samples=d.min_samples)
    answers = AnswerDrift(reference, {"category": KNOWN + [NEW]}, window=d.answer_window, p_value=d.answer_p_value)
    first: dict[str, int | None] = {"agreement": None, "answers": None}
    for i in range(requests):
        changed = scenario != "stationary" and i >= change_at
        new_input = changed and scenario == "new category" and rng.random() < NEW_SHARE
        truth = NEW if new_input else rng.choice(KNOWN)
        p_agree = 0.0 if new_input else (WORSE if changed and scenario == "worse student" else AGREE)
        kept = rng.random() < KEEP
        agree = rng.random() < p_agree
        said = KNOWN[0] if new_input else (truth if agree else rng.choice([c for c in KNOWN if c != truth]))
        if answers.update({"category": said}) == "alarm" and first["answers"] is None:
            first["answers"] = i
        if kept and rng.random() < rate and agreement.update(agree) == "alarm" and first["agreement"] is None:
            first["agreement"] = i
    return first


BITEXT = (Path(__file__).resolve().parents[2] / "shared" / "data" / "bitext_customer_support"
          / "Bitext_Sample_Customer_Support_Training_Dataset.csv")


def input_drift(args, d: DriftConfig) -> None:
    """The input-drift scenarios on Bitext with MiniLM (module docstring); prints and records one table."""
    import csv
    import os
    import time

    import numpy as np

    from distill.data.dedup import normalise
    from distill.data.embed import embed
    from distill.serve.drift import InputDrift, nearest_distances

    if not BITEXT.is_file():
        sys.exit(f"{BITEXT} is missing: --inputs needs the shared Bitext data")
    seen, texts, cats = set(), [], []
    with BITEXT.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            key = normalise(row["instruction"])
            if key not in seen:
                seen.add(key)
                texts.append(row["instruction"].strip())
                cats.append(row["category"])
    if args.held_out not in set(cats):
        sys.exit(f"--held-out {args.held_out} is not a Bitext category; choices: {', '.join(sorted(set(cats)))}")
    started = time.perf_counter()
    vecs = embed(texts, progress="MiniLM")
    embed_s = time.perf_counter() - started
    novel = np.array([i for i, c in enumerate(cats) if c == args.held_out])
    known = np.array([i for i, c in enumerate(cats) if c != args.held_out])
    rows = []
    for share in (0.0, 0.05, 0.1, 0.3, 1.0):
        scenario = f"{share:.0%} held-out category" if share else "stationary"
        firsts, refs = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            order = rng.permutation(known)
            train, val, pool = order[:1500], order[1500:1800], order[1800:]
            reference = nearest_distances(vecs[val], vecs[train])
            refs.append(float(np.median(reference)))
            detector = InputDrift(reference, window=d.input_window, p_value=d.input_p_value)
            stream = rng.choice(pool, size=args.requests)
            if share:
                switch = np.arange(args.requests) >= args.change_at
                swap = switch & (rng.random(args.requests) < share)
                stream[swap] = rng.choice(novel, size=int(swap.sum()))
            distances = nearest_distances(vecs[stream], vecs[train])
            first = next((i for i, dist in enumerate(distances) if detector.update(dist) == "alarm"), None)
            firsts.append(first)
        hits = [f for f in firsts if f is not None]
        if not share:
            result = f"{len(hits)} false alarms in {args.seeds} x {args.requests}"
        else:
            early = [h for h in hits if h < args.change_at]
            delays = [h - args.change_at for h in hits if h >= args.change_at]
            result = (f"{statistics.median(delays):.0f} ({min(delays)}-{max(delays)})" if len(delays) == args.seeds
                      else f"{len(delays)}/{args.seeds} alarmed" + (f", {len(early)} early" if early else ""))
        rows.append([scenario, result, f"{statistics.median(refs):.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    text = table(["scenario", "input-drift alarm: requests after the change, median (range)",
                  "reference median distance (val -> train)"], rows)
    text += (f"\n\n{args.seeds} seeds, change at request {args.change_at}; {len(texts)} distinct Bitext tickets "
             f"({len(novel)} of the held-out category {args.held_out}); per seed 1,500 train, 300 val, the stream "
             f"drawn from the rest; serve.drift defaults (input_window {d.input_window}, input_p_value "
             f"{d.input_p_value}, KS one-sided). The test runs once per window, so a change is seen at the end of "
             f"the window it falls in at the earliest. MiniLM embedded the {len(texts)} tickets in {embed_s:.0f} s "
             f"(load average {os.getloadavg()[0]:.1f} at the end).")
    print(text)
    append("Input drift by embedding distance on Bitext (distill serve)", text, record=not args.no_record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--change-at", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rates", default="0.05,0.1,0.25", help="shadow rates, comma-separated")
    ap.add_argument("--inputs", action="store_true", help="the input-drift test on Bitext with MiniLM instead")
    ap.add_argument("--held-out", default="ACCOUNT", help="--inputs: the Bitext category training never sees")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    d = DriftConfig()
    if args.inputs:
        input_drift(args, d)
        return
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for scenario in ("stationary", "new category", "worse student"):
            runs = [simulate(scenario, seed, args.requests, args.change_at, rate, d) for seed in range(args.seeds)]
            row = [scenario, rate]
            for kind in ("agreement", "answers"):
                hits = [r[kind] for r in runs if r[kind] is not None]
                if scenario == "stationary":
                    row.append(f"{len(hits)} false alarms in {args.seeds} x {args.requests}")
                else:
                    early = [h for h in hits if h < args.change_at]
                    delays = [h - args.change_at for h in hits if h >= args.change_at]
                    med = statistics.median(delays) if len(delays) == args.seeds else None
                    row.append(f"{med:.0f} ({min(delays)}-{max(delays)})" if med is not None else
                               f"{len(delays)}/{args.seeds} alarmed within {args.requests - args.change_at}" + (f", {len(early)} early" if early else ""))
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    text = table(["scenario", "shadow rate", "agreement alarm: requests after the change, median (range)",
                  "answer-distribution alarm: requests after the change, median (range)"], rows)
    text += (f"\n\n{args.seeds} seeds, change at request {args.change_at}; serve.drift defaults (margin {d.margin}, "
             f"ADWIN delta {d.delta}, bound {d.confidence}, min_samples {d.min_samples}, answer_window "
             f"{d.answer_window}, p {d.answer_p_value}); the rule's target agreement {TARGET}. The answer test runs "
             f"once per window, at its end, so a change is seen at the end of the window it falls in at the "
             f"earliest; the worse student gives the same answer mix, which that test is not meant to see.")
    print(text)
    append("Drift alarms on a simulated stream (distill serve)", text, record=not args.no_record)


if __name__ == "__main__":
    main()
