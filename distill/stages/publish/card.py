"""publish's Markdown: MODEL_CARD.md and report.md, both built on one parity table.

    python -m distill publish run_dir=DIR        # then read publish/MODEL_CARD.md and publish/report.md

report.md says how each shipped file answers the evaluated test items (publish/parity.json in words); evaluate's own
report is never edited, so it reads the same whether or not publish ran.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from distill import paths, routing, runio
from distill.config import Config
from distill.metrics.report import baseline_line, ladder_lines
from distill.metrics.stats import format_interval
from distill.serve import calibrate
from distill.serve.cache import CACHE_CALIBRATION
from distill.stages.publish.gguf import model_name
from distill.student import embed_classifier


def _fmt(x) -> str:
    """A figure as the card writes it (4 significant digits; ``n/a`` for none)."""
    return format_interval({"value": x}, percent=False)


def _metric_lines(m: dict, level: float | None) -> list[str]:
    """Agreement and accuracy with their intervals (results.json ``*_ci``), whole answer then per field."""
    pct = f"{level:.0%} " if level else ""
    lines = ["| | whole answer | " + " | ".join(k for k in m["agreement"] if k != "exact") + " |",
             "|---|---|" + "---|" * (len(m["agreement"]) - 1)]
    for label, key in (("student agreement with teacher", "agreement"), ("student accuracy vs gold",
                                                                          "student_vs_gold"),
                       ("teacher accuracy vs gold", "teacher_vs_gold")):
        ci, point = m.get(f"{key}_ci"), m.get(key)
        if not point:
            continue
        cells = [format_interval(ci[k], percent=False) if ci else _fmt(v) for k, v in point.items() if k != "exact"]
        whole = format_interval(ci["exact"], percent=False) if ci else _fmt(point["exact"])
        lines.append(f"| {label} | {whole} | " + " | ".join(cells) + " |")
    lines.append("")
    for f, rep in (m.get("fields") or {}).items():
        f1 = (rep.get("vs_teacher") or {}).get("macro_f1")
        if f1:
            lines.append(f"- `{f}` macro-F1 vs teacher: {format_interval(f1, percent=False)}")
    if pct:
        lines.append(f"- intervals: {pct}bootstrap over items")
    return lines


def parity_lines(cfg: Config, artifacts: dict, parity: dict) -> list[str]:
    """The parity table (Markdown lines) shared by MODEL_CARD.md and publish/report.md."""
    if artifacts and all(art["type"] == "embed_classifier" for art in artifacts.values()):
        res = next(iter(parity.values()), {})
        return [f"Parity: the published encoder and head, reloaded in a fresh classifier, give the evaluated "
                f"classifier's answer on {_fmt(res.get('parity'))} of {res.get('n', 0)} items (nothing is quantized, "
                f"so publish requires all of them); largest confidence difference "
                f"{_fmt(res.get('max_confidence_diff'))}.", "",
                "| artifact | runtime | size MB | parity | vs teacher | published |", "|---|---|---|---|---|---|",
                *[f"| `{rel}` ({art['type']}) | {art['runtime']} | {art['bytes'] / 1e6:.1f} | "
                  f"{_fmt(parity.get(rel, {}).get('parity')) if parity else 'not checked'} | "
                  f"{_fmt(parity.get(rel, {}).get('agreement_with_teacher'))} | yes |"
                  for rel, art in artifacts.items()]]
    lines = [f"Parity: share of the {next(iter(parity.values()))['n'] if parity else 0} evaluated items where the "
             f"artifact, loaded in its runtime, gives the same answer as the unquantized student (or, like it, "
             f"none); below publish.min_parity {cfg.publish.min_parity} an artifact is not published. "
             f"References: " + "; ".join(sorted({f"{res['reference']}" for res in parity.values()})) + ".", "",
             "As served (GGUF: llama.cpp with the task's schema as response_format; safetensors: transformers as "
             "evaluate ran the student): agreement with evaluate's student and with the teacher, and where one "
             "served answer ended.", "",
             "| artifact | runtime | size MB | parity | as served: vs student / vs teacher / invalid | answer ended "
             "| published |",
             "|---|---|---|---|---|---|---|"]
    for rel, art in artifacts.items():
        p = parity.get(rel, {})
        served = p.get("served_with_schema") or {"agreement_with_student": p.get("agreement_with_reference"),
                                                 "agreement_with_teacher": p.get("agreement_with_teacher"),
                                                 "invalid_rate": p.get("invalid_rate")}
        stop = p.get("stop_check")
        stop_txt = (f"{stop['finish_reason']} after {stop['completion_tokens']} tokens, "
                    f"{'valid' if stop['valid'] else 'invalid'} JSON") if stop else "-"
        status = "yes" if p.get("published", True) else f"no: {p['dropped_because']}"
        lines.append(f"| `{rel}` ({art['type']}) | {art['runtime']} | {art['bytes'] / 1e6:.1f} | "
                     f"{_fmt(p.get('parity')) if p else 'not checked'} | "
                     + (" / ".join(_fmt(served[k]) for k in ("agreement_with_student", "agreement_with_teacher",
                                                             "invalid_rate")) if p else "-")
                     + f" | {stop_txt} | {status} |")
    for rel, art in artifacts.items():
        if art.get("tensor_types"):
            lines.append(f"- `{rel}` tensor types: {art['tensor_types']}")
    return lines


def calibrate_cache(cfg: Config, staging: Path) -> None:
    """With ``serve.semantic_cache.enabled``: run calibrate-cache (serve/cache_calibration.{json,md,png}) and put its
    plot beside the card, which, like report.md, then shows the table (``cache_lines``). Nothing otherwise."""
    if not cfg.serve.semantic_cache.enabled:
        return
    calibrate.calibrate(cfg)
    shutil.copy2(paths.stage_dir(Path(cfg.run_dir), paths.SERVE_DIR) / calibrate.CACHE_PLOT,
                 staging / calibrate.CACHE_PLOT)


def cache_lines(cfg: Config) -> list[str]:
    """The semantic cache's calibration (serve/cache_calibration.json) as Markdown: the verdict, the plot and the
    table rows around the choice ([] when the cache is not enabled or was not calibrated)."""
    found = paths.stage_dir(Path(cfg.run_dir), paths.SERVE_DIR) / CACHE_CALIBRATION
    if not cfg.serve.semantic_cache.enabled or not found.is_file():
        return []
    cal = runio.read_json(found)
    rows, chosen = cal["table"], cal.get("chosen")
    # every 0.05 of the grid, and the chosen row: the full 0.005 grid is in serve/cache_calibration.md
    shown = [r for r in rows if round(r["threshold"] * 1000) % 50 == 0 or (chosen and r["threshold"] ==
                                                                           chosen["threshold"])]
    table = calibrate.markdown(shown, chosen, cal["max_false_hit"]).rstrip("\n").splitlines()
    return ["## Semantic cache calibration (serve.semantic_cache)", "",
            f"Measured by calibrate-cache on {cal['held_out_items']} held-out items, each against its nearest of "
            f"{cal['train_items']} train items: a hit is a neighbour at least as similar as the threshold, a false "
            f"hit one whose teacher answer differs from the item's own; {cal['level']:.0%} Clopper-Pearson "
            f"intervals. The gateway serves at the chosen threshold "
            f"({'none: the cache stays off' if cal['threshold'] is None else format(cal['threshold'], '.3f')}).", "",
            f"![semantic cache calibration]({calibrate.CACHE_PLOT})", "", *table, "",
            f"Every threshold: {paths.SERVE_DIR}/{calibrate.CACHE_TABLE}.", ""]


def report_markdown(cfg: Config, artifacts: dict, parity: dict, threshold: list[str] = ()) -> str:
    """publish/report.md: each artifact's parity in one sentence, then the parity table; ``threshold``: Markdown
    lines on whose confidences the routing threshold was chosen (serving.threshold_lines), appended."""
    lines = ["# Publish: the shipped artifacts", ""]
    if not parity:
        lines += ["Parity was not checked (publish.verify_load=false): the artifacts below were not reloaded.", "",
                  *[f"- `{rel}` ({art['type']}, {art['runtime']})" for rel, art in artifacts.items()]]
        return "\n".join([*lines, *_tail(cfg, threshold)]) + "\n"
    for rel, res in parity.items():
        runtime = {"gguf": "served by the llama.cpp server"}.get(artifacts[rel]["format"], "loaded in transformers")
        if artifacts[rel]["type"] == "embed_classifier":
            runtime = "reloaded in a fresh classifier"
        verdict = "published" if res["published"] else f"NOT published ({res['dropped_because']})"
        lines.append(f"- `{rel}`, {runtime}: the same answer as the in-process student on "
                     f"{res['parity'] * 100:.1f}% of {res['n']} test items; {verdict}.")
    lines += ["", *parity_lines(cfg, artifacts, parity), "", f"Figures: {paths.PARITY}; the student's own scores: "
              f"evaluate/{paths.REPORT}."]
    return "\n".join([*lines, *_tail(cfg, threshold)]) + "\n"


def _tail(cfg: Config, threshold: list[str]) -> list[str]:
    """What report.md adds after the artifacts: the semantic cache's calibration, then the threshold lines."""
    cache = cache_lines(cfg)
    return [*([""] + cache if cache else []), *([""] + list(threshold) if threshold else [])]


def priced_line(cost: dict) -> str:
    """One Markdown line naming the throughput a cost case priced the student at (cost.student.throughput)."""
    student = cost.get("student") or {}
    t = student.get("throughput")
    if not t:
        return f"- student priced at {_fmt(student.get('items_per_s'))} items/s (source not recorded)"
    return (f"- student priced at {_fmt(t['items_per_s'])} items/s and ${student.get('usd_per_hour')}/h: "
            f"{t['artifact']} in {t['runtime']}, concurrency {t.get('concurrency')}, measured by {t['measured_by']} "
            f"on {t.get('where') or 'the machine at hand'}")


def render_card(cfg: Config, generate: dict, train: dict, results: dict, rule: routing.RoutingRule,
                artifacts: dict, parity: dict, files: dict, forced_past: list[str] | None,
                priced: dict | None = None) -> str:
    """MODEL_CARD.md; ``forced_past`` holds the failed gate's reasons when publish.force overrode it; ``priced``:
    the cost case the rule's costs come from (publish's re-priced one; default results.json's)."""
    m = results["metrics"]
    ledger = generate.get("ledger", {})
    inputs = cfg.recipe_file("inputs")
    classifier = cfg.student.kind == "embed_classifier"
    if classifier:
        training = embed_classifier.training_lines(cfg, train)
    else:
        training = [
            f"- rung: {cfg.student.name}: a causal LM ({cfg.student.hub_id or cfg.student.source}) with a LoRA adapter",
            f"- {cfg.train.method} r={cfg.train.lora_r} alpha={cfg.train.lora_alpha} dropout "
            f"{cfg.train.lora_dropout} on {', '.join(cfg.student.target_modules)}; {train.get('steps')} steps, batch "
            f"{cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, lr {cfg.train.lr}, seed {cfg.seed}",
            f"- loss {_fmt(train.get('first_loss'))} -> {_fmt(train.get('final_loss'))}; val loss "
            f"{_fmt(train.get('val_loss'))}",
            *([f"- training ended: {train['stop_reason']}"] if train.get("stop_reason") else []),
            f"- chat template: the base's own; end-of-turn token `{rule.student.stop[0]}` trained and set as the stop "
            "token in every artifact"]
    lines = [
        f"# {model_name(cfg)}", "",
        f"A {cfg.student.name} student distilled by distill for one task: {cfg.recipe.description}", "",
        "**Published with publish.force=true although the evaluate gate FAILED: " + "; ".join(forced_past) + "**"
        if forced_past is not None else "Evaluate gate: passed.", "",
        "## Data",
        f"- source: recipe `{cfg.recipe.name}` inputs `{inputs.name}` (sha256 {runio.sha256_file(inputs)[:16]})"
        if inputs.exists() else f"- source: recipe `{cfg.recipe.name}`",
        f"- {generate.get('labelled')} inputs labelled by teacher `{cfg.teacher.model}` ({cfg.teacher.kind}, "
        f"method {cfg.teacher.method}); rejected {generate.get('rejected')}; splits {generate.get('splits')}",
        f"- teacher spend: ${ledger.get('cost_usd', 0.0):.4f} over {ledger.get('successful_calls')} calls "
        f"({ledger.get('prompt_tokens')} prompt + {ledger.get('completion_tokens')} completion tokens)", "",
        "## Training", *training, "",
        *(["## Student ladder (student=auto)", "", *ladder_lines(train["ladder"]), ""] if train.get("ladder") else []),
        f"## Evaluation ({results.get('split', 'test')} split, results.json)", "",
        f"{m['n']} held-out items, {m.get('n_gold')} with gold labels; invalid student answers "
        f"{_fmt(m.get('invalid_rate'))}.", "",
        *_metric_lines(m, cfg.eval.confidence_level), "", baseline_line(results),
    ]
    lines += ["", "## Artifacts and parity", "", *parity_lines(cfg, artifacts, parity)]
    if cache := cache_lines(cfg):
        lines += ["", *cache]
    r = rule.route
    lines += ["", "## Routing", "",
              f"- {'enabled' if r.enabled else 'disabled'}: {r.reason}",
              f"- expected coverage {_fmt(r.expected_coverage)}; on the test split at that threshold: coverage "
              f"{_fmt(rule.evidence.test_coverage)}, agreement {_fmt(rule.evidence.test_agreement)}",
              f"- cost per 1,000 requests: teacher {_fmt(rule.cost.teacher_usd_per_1k)}, student "
              f"{_fmt(rule.cost.student_usd_per_1k)}, blended {_fmt(rule.cost.blended_usd_per_1k)} USD "
              f"(saving {_fmt(rule.cost.saving_vs_teacher)})",
              priced_line(priced or results.get("cost") or {}), "",
              "## Limitations",
              "- The student copies the teacher, including its mistakes: compare the teacher's accuracy vs gold.",
              "- Scores hold for inputs like the held-out split; route other traffic to the teacher.",
              *([f"- The classifier reads the raw input (no prompt); inputs longer than {cfg.student.max_seq_len} "
                 "tokens are cut.", "- It answers only the values the teacher gave on the train split.",
                 "- Nothing is quantized: the published files answer exactly as the evaluated classifier (parity)."]
                if classifier else
                ["- Trained on one system prompt and one user turn; other conversation shapes are untested.",
                 "- Quantized artifacts can answer differently from the student: see parity above."]),
              *([(f"- The threshold was chosen on the served GGUF's own confidence (`{rule.evidence.artifact}`, "
                  f"scored on the val split by the gateway's code, eval.decode={cfg.eval.decode}); "
                  f"`python -m distill serve run_dir=..` computes that same confidence (SERVING.md)."
                  if rule.evidence is not None and rule.evidence.artifact else
                  f"- The threshold was chosen on the in-process student's confidence (eval.decode="
                  f"{cfg.eval.decode}); `python -m distill serve run_dir=..` computes that confidence on the served "
                  f"GGUF (SERVING.md).")
                 + f" A server of your own gives another number (token log-probs): measure its curve "
                 f"with `python -m distill evaluate run_dir=.. eval.endpoint.base_url={cfg.publish.endpoint} "
                 f"eval.endpoint.model={model_name(cfg)}` before relying on the threshold there."]
                if (results.get("predictor") or {}).get("kind", "in_process") == "in_process" and not classifier
                else []), "",
              "## Lineage",
              "- dataset: " + ", ".join(f"{s} {h[:16]}" for s, h in (generate.get("data_sha256") or {}).items()),
              f"- head: {train.get('head_sha256')}" if classifier else f"- adapter: {train.get('adapter_sha256')}",
              f"- evaluation: results.json {rule.evidence.results_sha256}"]
    lines += [f"- `{name}`: sha256 {sha}" for name, sha in files.items()]
    return "\n".join(lines) + "\n"
