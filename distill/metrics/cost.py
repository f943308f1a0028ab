"""The cost case: what 1,000 requests cost on the teacher and on the student, and when distillation pays off.

Teacher figures are measured, not estimated: tokens and latency of the very calls that labelled this run's items,
read from the ledger by their request keys. The student's come from a measured throughput, priced at
``eval.cost.student_usd_per_hour``, and the case names it (``student.throughput``): evaluate prices the predictor
it scored (``evaluate_throughput``); publish re-prices the same case (``reprice_student``) from the artifact that
ships, timed through the gateway's own scoring code. The one-off cost is the teacher spend on labelling plus the
training time (train/DONE.json) at ``eval.cost.train_usd_per_hour``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.config import Config
from distill.ledger import Ledger
from distill.teacher.pricing import is_free, usd


def ledger_usage(ledger_file: Path, rows: list[dict]) -> list[dict]:
    """Per labelled row: {"calls", "prompt_tokens", "cached_tokens", "completion_tokens", "latency_s"} summed
    over the ledger calls named in its provenance (several for teacher.method=score). Rows whose calls are not in
    the ledger (trusted labels, another ledger) are left out. The ledger is opened read-only."""
    if not Path(ledger_file).exists():
        return []
    keys_of = {r["id"]: [k for k in str((r.get("provenance") or {}).get("request_key") or "").split(",") if k]
               for r in rows}
    with Ledger.read_only(ledger_file) as ledger:
        found = ledger.usage(k for keys in keys_of.values() for k in keys)
    usage = []
    for keys in keys_of.values():
        if not keys or any(k not in found for k in keys):
            continue
        vals = np.array([found[k] for k in keys], dtype=float).sum(axis=0)
        usage.append({"calls": len(keys), "prompt_tokens": vals[0], "cached_tokens": vals[1],
                      "completion_tokens": vals[2], "latency_s": vals[3]})
    return usage


def _break_even(one_off: float, teacher: float, student: float) -> int | None:
    """Requests after which teacher spend exceeds one-off + student spend (None: the student never catches up)."""
    if teacher <= student:
        return None
    return int(np.ceil(one_off / (teacher - student)))


def _per_1k(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 6)


def evaluate_throughput(cfg: Config, items_per_s: float | None) -> dict:
    """What evaluate's throughput measured: its own predictor on the machine that ran evaluate."""
    ev = cfg.eval
    if ev.endpoint.base_url:
        artifact, runtime = f"{ev.endpoint.model} at {ev.endpoint.base_url}", "an OpenAI-compatible endpoint"
        concurrency = ev.endpoint.concurrency
    else:
        artifact = f"the evaluated {cfg.student.name} student as train left it (not a published file)"
        runtime = (f"{'the embedding classifier' if cfg.student.kind == 'embed_classifier' else 'transformers'} "
                   f"in process, eval.decode={ev.decode}, batch {ev.batch_size}")
        concurrency = 1
    return {"items_per_s": items_per_s, "measured_by": "evaluate", "artifact": artifact, "runtime": runtime,
            "concurrency": concurrency, "where": "the machine that ran evaluate"}


def _student_terms(one_off: float, teacher_per_req: list[float | None], student: float | None) -> list[int | None]:
    """Break-even requests of each teacher option against the student (None where either price is unknown)."""
    return [_break_even(one_off, t, student) if t is not None and student is not None else None
            for t in teacher_per_req]


def reprice_student(cost: dict, throughput: dict) -> dict:
    """``cost`` (a cost case from ``cost_case``) with the student priced at ``throughput`` instead: its
    ``items_per_s`` and latencies replace the student's, the student's $ per 1,000 requests and every break-even
    volume are recomputed (the teacher's figures and the one-off cost stay), and ``student.throughput`` names it.
    ``throughput`` holds ``items_per_s``, ``latency_p50_s``, ``latency_p95_s`` and what was timed (artifact,
    runtime, concurrency, measured_by, where). Raises ValueError without a positive ``items_per_s``."""
    ips = throughput.get("items_per_s")
    if not ips or ips <= 0:
        raise ValueError(f"cannot price the student at {ips!r} items/s: the timed pass measured no throughput")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cost.items()}
    stu = out["student"] = dict(cost["student"])
    p50, p95 = throughput.get("latency_p50_s"), throughput.get("latency_p95_s")
    stu.update(items_per_s=ips, latency_p50_s=p50, latency_p95_s=p95, throughput=dict(throughput))
    student = stu["usd_per_hour"] / 3600.0 / ips
    out["student_usd_per_1k"] = _per_1k(student)
    teacher = [None if cost.get(k) is None else cost[k] / 1000
               for k in ("teacher_usd_per_1k", "teacher_cached_usd_per_1k", "teacher_batch_usd_per_1k")]
    terms = _student_terms(cost["one_off"]["total_usd"], teacher, student)
    out["break_even_requests"] = dict(zip(("on_demand", "cached", "batch"), terms))
    table = [dict(r) for r in cost.get("table") or []]
    for r, be in zip(table[:3], terms):
        r["break_even_requests"] = be
    if len(table) > 3:
        table[3].update(usd_per_1k=out["student_usd_per_1k"], latency_p50_s=p50, latency_p95_s=p95)
    out["table"] = table
    return out


def cost_case(cfg: Config, usage: list[dict], items_per_s: float | None, student_latency: dict,
              train_wall_s: float | None, static_prefix_share: float | None, throughput: dict | None = None) -> dict:
    """$ per 1,000 requests for the teacher (on demand, cached prefix, batch API) and the student, and the
    break-even volume including the one-off distillation cost. See README ("results.json") for the keys.

    ``throughput`` names what ``items_per_s`` timed (``student.throughput``); by default evaluate's predictor
    (``evaluate_throughput``)."""
    c = cfg.eval.cost
    price, source = (c.teacher_price, "eval.cost.teacher_price") if c.teacher_price else (cfg.teacher.price,
                                                                                           "teacher.price")
    priced_as = cfg.teacher.model
    if is_free(price):
        price, source, priced_as = c.reference_price, "eval.cost.reference_price", c.reference_model
    n = len(usage)
    mean = {k: (float(np.mean([u[k] for u in usage])) if n else 0.0)
            for k in ("calls", "prompt_tokens", "cached_tokens", "completion_tokens")}
    lat = [u["latency_s"] for u in usage]
    measured_share = mean["cached_tokens"] / mean["prompt_tokens"] if mean["prompt_tokens"] else 0.0
    if c.cached_input_share is not None:
        share, share_source = c.cached_input_share, "eval.cost.cached_input_share"
    elif measured_share > 0:
        share, share_source = measured_share, "ledger"
    else:
        share, share_source = static_prefix_share or 0.0, "static prompt prefix"
    on_demand = usd(price, mean["prompt_tokens"], 0.0, mean["completion_tokens"])
    cached = usd(price, mean["prompt_tokens"], share * mean["prompt_tokens"], mean["completion_tokens"])
    batch = usd(price, mean["prompt_tokens"], 0.0, mean["completion_tokens"], batch=True)

    hourly = c.student_usd_per_hour
    student = hourly / 3600.0 / items_per_s if items_per_s else None
    train_rate = c.train_usd_per_hour if c.train_usd_per_hour is not None else hourly
    teacher_spend = sum(usd(price, u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"]) for u in usage)
    train_usd = (train_wall_s or 0.0) / 3600.0 * train_rate
    one_off = teacher_spend + train_usd

    per_1k = _per_1k

    def row(option: str, per_req: float | None, p50, p95, student_row: bool = False) -> dict:
        be = None if student_row else _student_terms(one_off, [per_req], student)[0]
        return {"option": option, "usd_per_1k": per_1k(per_req), "latency_p50_s": p50, "latency_p95_s": p95,
                "break_even_requests": be}

    t50 = round(float(np.percentile(lat, 50)), 4) if lat else None
    t95 = round(float(np.percentile(lat, 95)), 4) if lat else None
    table = [row(f"teacher {priced_as} on demand", on_demand, t50, t95),
             row(f"teacher {priced_as} cached prefix ({share:.0%} of input)", cached, t50, t95),
             row(f"teacher {priced_as} batch API ({price.batch_discount:.0%} of price)", batch, None, None),
             row(f"student {cfg.student.name} at ${hourly}/h", student, student_latency.get("p50"),
                 student_latency.get("p95"), student_row=True)]
    return {
        "teacher": {"model": cfg.teacher.model, "priced_as": priced_as, "price_source": source,
                    "price": price.model_dump(), "items_priced": n, "calls_per_item": round(mean["calls"], 3),
                    "prompt_tokens_per_item": round(mean["prompt_tokens"], 1),
                    "cached_prompt_tokens_per_item": round(mean["cached_tokens"], 1),
                    "completion_tokens_per_item": round(mean["completion_tokens"], 1),
                    "latency_p50_s": t50, "latency_p95_s": t95,
                    "cached_input_share": round(share, 4), "cached_input_share_source": share_source},
        "student": {"name": cfg.student.name, "usd_per_hour": hourly, "items_per_s": items_per_s,
                    "latency_p50_s": student_latency.get("p50"), "latency_p95_s": student_latency.get("p95"),
                    "throughput": throughput or evaluate_throughput(cfg, items_per_s)},
        "teacher_usd_per_1k": per_1k(on_demand),
        "teacher_cached_usd_per_1k": per_1k(cached),
        "teacher_batch_usd_per_1k": per_1k(batch),
        "student_usd_per_1k": per_1k(student),
        "one_off": {"teacher_usd": round(teacher_spend, 6), "train_s": train_wall_s, "train_usd_per_hour": train_rate,
                    "train_usd": round(train_usd, 6), "total_usd": round(one_off, 6)},
        "break_even_requests": {"on_demand": table[0]["break_even_requests"],
                                "cached": table[1]["break_even_requests"],
                                "batch": table[2]["break_even_requests"]},
        "table": table,
    }
