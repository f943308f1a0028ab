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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--change-at", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rates", default="0.05,0.1,0.25", help="shadow rates, comma-separated")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    d = DriftConfig()
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
