"""report.md, its plots (confusion_<field>.png, coverage.png, cost.png), junit.xml and summary.md from results.

The report opens with the verdict and the key numbers with their intervals, so a reviewer can stop reading after
the first screen; details (per-class scores, calibration, cost table, worst disagreements) follow.
"""

from __future__ import annotations

from pathlib import Path

from distill import runio
from distill.metrics.gate import junit_xml, summary_markdown
from distill.metrics.stats import format_interval
from distill.paths import COST_PNG, COVERAGE_PNG, JUNIT_XML, REPORT, SUMMARY_MD, confusion_png


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, field: str, conf: dict) -> None:
    plt = _plt()
    labels, matrix = conf["labels"], conf["matrix"]
    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title(f"{field}: student vs teacher")
    peak = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage(path: Path, curves: dict[str, list[dict]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        pts = [(p["coverage"], p["agreement"]) for p in curve if p["agreement"] is not None]
        if pts:
            ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", ms=3, drawstyle="steps-post", label=name)
    ax.set_xlabel("coverage (share of traffic the student answers)")
    ax.set_ylabel("agreement with the teacher on it")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Coverage vs agreement over confidence thresholds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(path: Path, cost: dict) -> None:
    """Cumulative spend against request volume: each teacher option vs the student (one-off cost + per request)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    volume = np.logspace(2, 8, 200)
    one_off = cost["one_off"]["total_usd"]
    for row in cost["table"]:
        if row["usd_per_1k"] is None:
            continue
        per_req = row["usd_per_1k"] / 1000
        spend = per_req * volume + (one_off if row["option"].startswith("student") else 0.0)
        ax.plot(volume, np.maximum(spend, 1e-6), label=row["option"],
                lw=2.5 if row["option"].startswith("student") else 1.5)
        if row["break_even_requests"]:
            ax.axvline(row["break_even_requests"], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative USD")
    ax.set_title("Cost: teacher vs distilled student (dotted: break-even)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gate_thresholds(thresholds: dict) -> str | None:
    """The thresholds a gate applied, in words; None when none is set (the defaults 0.0 and 1.0 let anything
    through, and so does a gate with no floor, no baseline and no tolerance)."""
    t = thresholds or {}
    parts = []
    if t.get("min_agreement"):
        parts.append(f"agreement >= {_pct(t['min_agreement'])}")
    if t.get("max_invalid_rate") is not None and t["max_invalid_rate"] < 1:
        parts.append(f"invalid <= {_pct(t['max_invalid_rate'])}")
    if t.get("min_accuracy") is not None:
        parts.append(f"accuracy vs gold >= {_pct(t['min_accuracy'])}")
    parts += [f"{field} agreement >= {_pct(floor)}" for field, floor in (t.get("min_field_agreement") or {}).items()]
    if t.get("baseline"):
        parts.append(f"no significant drop below {t['baseline']} (McNemar p < {t.get('baseline_alpha')})")
    if t.get("max_drop") is not None:
        parts.append(f"a drop of at most {_pct(t['max_drop'])}")
    if not parts:
        return None
    return ", ".join(parts) + ("; on the interval's bound" if t.get("use_lower_bound") else "")


def verdict_line(gate: dict) -> str:
    """The report's first line: PASS/FAIL with the thresholds it was judged by, or that no gate was set."""
    applied = gate_thresholds(gate.get("thresholds") or {})
    if gate["passed"]:
        if applied is None:
            return ("**Gate: PASS** (no gate set: every threshold is at its default, so any student with one valid "
                    "answer passes; set eval.gate.min_agreement, eval.gate.max_invalid_rate or eval.baseline to make "
                    "it block)")
        return f"**Gate: PASS** ({applied})"
    return f"**Gate: FAIL** ({applied or 'no threshold set; at least one valid answer is always required'}): " \
        + "; ".join(gate["reasons"])


def _teacher_price_note(c: dict) -> str:
    """What the teacher's cost figure stands for: its own price, or a hosted model's when the teacher is free."""
    t = c["teacher"]
    if t.get("price_source") == "eval.cost.reference_price":
        return (f"{t['model'] or 'the teacher'} costs nothing to run here, so it is priced as {t['priced_as']} "
                f"would be (eval.cost.reference_price)")
    return f"{t['priced_as']}, {t.get('price_source') or 'teacher.price'}"


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.4f}"


def ladder_lines(ladder: dict | None) -> list[str]:
    """student=auto's ladder (train/ladder.json) as Markdown: the chosen rung, why, and every rung tried with its
    val agreement (interval), cost per 1,000 requests and latency; empty for a run without student=auto."""
    if not ladder:
        return []
    lines = [f"Chosen: **{ladder['chosen']}**. {ladder['why']}. Decided on {ladder['decided_on'].get('n')} "
             f"{ladder['decided_on'].get('split')} items (publish.target_agreement={ladder['target_agreement']}).",
             "", "| rung | val agreement with the teacher | invalid | $ per 1,000 requests | latency p50 s | train s "
             "| outcome |", "|---|---|---|---|---|---|---|"]
    for r in ladder["rungs"]:
        if not r.get("trained"):
            lines.append(f"| {r['rung']} | n/a | n/a | n/a | n/a | n/a | {r['outcome']} |")
            continue
        lines.append(f"| {r['rung']} | {format_interval(r['val_agreement'])} | {_pct(r['invalid_rate'])} | "
                     f"{_usd(r['usd_per_1k'])} | {r['latency_p50_s'] or 'n/a'} | {r['train_s']} | {r['outcome']} |")
    return lines


TRAINING_KEYS = ("stopped_by", "stop_reason", "stopped_early", "steps", "epochs_trained", "best_checkpoint")


def training_end(train_summary: dict) -> dict | None:
    """How the student's training ended (results.json ``training``): the train summary's stopped_by, stop_reason,
    stopped_early, steps, epochs_trained and best_checkpoint; None for a student trained without steps (the
    embedding classifier)."""
    if not train_summary.get("stop_reason"):
        return None
    return {k: train_summary.get(k) for k in TRAINING_KEYS}


def training_line(training: dict | None) -> list[str]:
    """The report's line on how training ended, the time budget named when it stopped training early."""
    if not training:
        return []
    early = " (stopped early)" if training.get("stopped_early") else ""
    return [f"- training{early}: {training['stop_reason']}"]


def baseline_line(results: dict) -> str:
    """The report's line on the embedding baseline beside the student (results.json ``embedding_baseline``)."""
    b = results.get("embedding_baseline") or {}
    status = b.get("status")
    if status is None:
        return "- embedding baseline: not measured (results.json from an older distill)"
    if status != "measured":
        return f"- embedding baseline: {b.get('reason')}"
    student = results["metrics"]["agreement_ci"]["exact"]
    diff = b["student_minus_baseline"]
    sign = "+" if (diff["value"] or 0) >= 0 else ""
    low_high = "" if diff.get("low") is None else f" [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
    return (f"- embedding baseline (MiniLM + logistic regression on the same train labels): agreement "
            f"{format_interval(b['agreement_ci']['exact'])} at {_usd(b['usd_per_1k'])} per 1,000 requests; the "
            f"student {format_interval(student)} at {_usd(results['cost']['student_usd_per_1k'])}: "
            f"{sign}{100 * diff['value']:.1f} points{low_high} (paired)")


def render(results: dict, predictions: list[dict], worst: int = 10, level: float = 0.95) -> str:
    """The Markdown report: verdict and key numbers first, then the plots, tables and worst disagreements.
    ``level`` is ``eval.confidence_level``, the level of every interval in ``results``."""
    m, s, g, c = results["metrics"], results["speed"], results["gate"], results["cost"]
    d = results["decontamination"]
    p = results["predictor"]
    who = p.get("student") if p["kind"] == "in_process" else f"{p['model']} at {p['base_url']}"
    be = c["break_even_requests"]["on_demand"]
    if be is not None:
        even = f"break-even after {be:,} requests"
    else:
        even = "no break-even: " + ("no student throughput measured" if c["student_usd_per_1k"] is None
                                    else "the student costs more per request")
    level = f"{100 * level:g}%"
    lines = [f"# Evaluation: {results['recipe']} ({who} vs teacher {results['teacher']})", "",
             verdict_line(g), "",
             f"- agreement with the teacher (whole answer): **{format_interval(m['agreement_ci']['exact'])}** on "
             f"{m['n']} {results['split']} items ({level} bootstrap interval)",
             f"- student accuracy vs gold: {format_interval((m.get('student_vs_gold_ci') or {}).get('exact'))}; "
             f"teacher accuracy vs gold: {format_interval((m.get('teacher_vs_gold_ci') or {}).get('exact'))} "
             f"({m['n_gold']} with gold)",
             f"- invalid answers: {format_interval(m['invalid'])} {m.get('invalid_by_reason') or ''}",
             f"- cost per 1,000 requests: teacher {_usd(c['teacher_usd_per_1k'])} "
             f"({_teacher_price_note(c)}), student {_usd(c['student_usd_per_1k'])}; {even} "
             f"(one-off {_usd(c['one_off']['total_usd'])})",
             f"- left out as duplicates of training items: {d['n_excluded']} of {d['n_checked']} "
             f"({d['exact']} exact, {d['near']} near); agreement on all items "
             f"{format_interval(d['agreement_all_items'])}",
             baseline_line(results), *training_line(results.get("training")), ""]
    if results.get("ladder"):
        lines += ["## Student ladder (student=auto)", "", *ladder_lines(results["ladder"]), ""]
    if p["kind"] == "endpoint" and m.get("failures"):
        lines += [f"Endpoint failures: {m['failures']}", ""]
    fields = [f for f in m["agreement"] if f != "exact"]
    lines += ["## Per field", "", "| | whole answer | " + " | ".join(fields) + " |",
              "|---|---|" + "---|" * len(fields)]

    def row(name: str, block: dict | None) -> str:
        if not block:
            return f"| {name} | n/a |" + " |" * len(fields)
        cells = [format_interval(block["exact"])] + [format_interval(block[f]) for f in fields]
        return f"| {name} | " + " | ".join(cells) + " |"

    base = results.get("embedding_baseline") or {}
    lines += [row("student agreement with teacher", m["agreement_ci"]),
              *([row("embedding baseline agreement with teacher", base["agreement_ci"])]
                if base.get("status") == "measured" else []),
              row("student accuracy vs gold", m.get("student_vs_gold_ci")),
              *([row("embedding baseline accuracy vs gold", base.get("vs_gold_ci"))]
                if base.get("status") == "measured" and base.get("vs_gold_ci") else []),
              row("teacher accuracy vs gold", m.get("teacher_vs_gold_ci")), ""]
    macro = [(f, info) for f, info in m["fields"].items() if info["kind"] == "enum"]
    if macro:
        lines += ["| macro-F1 | vs teacher | student vs gold | teacher vs gold |", "|---|---|---|---|"]
        for f, info in macro:
            lines.append(f"| {f} | {format_interval(info['vs_teacher']['macro_f1'])} | "
                         f"{format_interval((info['vs_gold'] or {}).get('macro_f1'))} | "
                         f"{format_interval((info['teacher_vs_gold'] or {}).get('macro_f1'))} |")
        lines.append("")
    for f, info in macro:
        lines += [f"### {f}", "", f"![confusion {f}]({confusion_png(f)})", "",
                  "| class | precision | recall | F1 | support (teacher) |", "|---|---|---|---|---|"]
        for cls, v in info["vs_teacher"]["per_class"].items():
            lines.append(f"| {cls} | {v['precision']} | {v['recall']} | {v['f1']} | {v['support']} |")
        lines.append("")
    lines += ["## Coverage: how much traffic the student can take", "", f"![coverage]({COVERAGE_PNG})", "",
              "| confidence >= | coverage | agreement | items |", "|---|---|---|---|"]
    curve = results["coverage_curve"]
    step = max(1, len(curve) // 12)
    for pt in curve[::step]:
        lines.append(f"| {pt['threshold']:.3f} | {_pct(pt['coverage'])} | {_pct(pt['agreement'])} | {pt['n']} |")
    cal = results["calibration"]["whole"]
    lines += ["", f"## Calibration (whole-answer confidence vs agreement; ECE {cal['ece']})", ""]
    if cal["bins"]:
        lines += ["| confidence bin | items | mean confidence | agreement |", "|---|---|---|---|"]
        for b in cal["bins"]:
            lines.append(f"| {b['low']:.1f}-{b['high']:.1f} | {b['n']} | {b['mean_confidence']} | "
                         f"{b['accuracy']} |")
    else:
        lines.append("No answer came with a confidence (no valid answers, or an endpoint without log-probs).")
    t = c["teacher"]
    where = (f"{s['device']} (batch {s['batch_size']})" if p["kind"] == "in_process"
             else f"the endpoint ({s['concurrency']} concurrent requests)")
    lines += ["", "## Cost", "", f"![cost]({COST_PNG})", "",
              "| option | $ per 1,000 requests | latency p50 s | latency p95 s | break-even requests |",
              "|---|---|---|---|---|"]
    for r in c["table"]:
        if r["option"].startswith("student"):
            even = ""
        else:
            even = f"{r['break_even_requests']:,}" if r["break_even_requests"] else "never"
        lines.append(f"| {r['option']} | {_usd(r['usd_per_1k'])} | {r['latency_p50_s'] or 'n/a'} | "
                     f"{r['latency_p95_s'] or 'n/a'} | {even} |")
    lines += ["", f"Teacher per request (measured in the ledger over {t['items_priced']} labelled items): "
              f"{t['calls_per_item']} calls, {t['prompt_tokens_per_item']} prompt + {t['completion_tokens_per_item']} "
              f"completion tokens, priced as {t['priced_as']} ({t['price_source']}); cached share "
              f"{_pct(t['cached_input_share'])} ({t['cached_input_share_source']}). Student: {s['items_per_s']} "
              f"items/s measured on {where} at ${c['student']['usd_per_hour']}/h. "
              f"One-off: teacher labelling {_usd(c['one_off']['teacher_usd'])} + training "
              f"{c['one_off']['train_s']} s at ${c['one_off']['train_usd_per_hour']}/h = "
              f"{_usd(c['one_off']['total_usd'])}.", ""]
    if d["items"]:
        lines += [f"## Left out as duplicates of training items ({len(d['items'])})", "",
                  "| test id | train id | kind | Jaccard |", "|---|---|---|---|"]
        lines += [f"| {x['id']} | {x['train_id']} | {x['kind']} | {x['jaccard']} |" for x in d["items"][:20]]
        lines.append("")
    bad = [x for x in predictions if not x["contaminated"] and x["student"] != x["teacher"]]
    bad.sort(key=lambda x: -(x["confidence"] or 0.0))
    if bad and worst:
        lines += [f"## Worst disagreements with the teacher (most confident first, {min(worst, len(bad))} of "
                  f"{len(bad)})", "", "| input | teacher | student | confidence |", "|---|---|---|---|"]
        for x in bad[:worst]:
            text = x["input"].replace("\n", " ").replace("|", "/")[:160]
            student = x["student"] if x["student"] is not None else f"invalid ({x['invalid_reason']})"
            conf = "n/a" if x["confidence"] is None else f"{x['confidence']:.3f}"
            lines.append(f"| {text} | {x['teacher']} | {student} | {conf} |")
    return "\n".join(lines) + "\n"


def write_all(out_dir: Path, results: dict, predictions: list[dict], worst: int = 10, level: float = 0.95) -> None:
    """Plots, report.md, junit.xml and summary.md into ``out_dir`` (``level``: eval.confidence_level)."""
    for field, conf in results["confusion"].items():
        plot_confusion(out_dir / confusion_png(field), field, conf)
    curves = {f"{results['split']} split": results["coverage_curve"]}
    if results.get("val_coverage_curve"):
        curves["val split"] = results["val_coverage_curve"]
    plot_coverage(out_dir / COVERAGE_PNG, curves)
    plot_cost(out_dir / COST_PNG, results["cost"])
    runio.atomic_write_text(out_dir / REPORT, render(results, predictions, worst, level))
    runio.atomic_write_text(out_dir / JUNIT_XML, junit_xml(results["gate"]))
    runio.atomic_write_text(out_dir / SUMMARY_MD, summary_markdown(results))
