"""Open a run directory from a notebook or a script: the dataset, the teacher's spend, training curves, evaluation.

    from distill.notebook.explore import open_run, latest_run
    run = open_run(latest_run("support_tickets"))      # or open_run("runs/support_tickets/20261127-101500")
    run.stages()                # which stages finished, when, how long they took
    run.dataset()               # one row per labelled input: split, text, teacher answer, gold answer
    run.plot_labels()           # label distribution per enum field and split
    run.confusion("category")   # student vs teacher, from evaluate/results.json
    run.worst_disagreements()   # the student's most confident answers that differ from the teacher's

Only what a finished stage wrote (its DONE.json exists) is read; anything else comes back as ``NotInRun``, which
prints one line saying what is missing and why, and is falsy. Training curves are the one exception: they are
shown while training runs, marked as unfinished. Nothing here changes the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from distill import DistillError, contracts, paths, runio
from distill.data.dedup import normalise
from distill.ledger import Ledger
from distill.notebook.missing import NotInRun
from distill.notebook.plots import RunPlots


def latest_run(recipe: str, root: str | Path = "runs", finished: str | None = "evaluate") -> Path:
    """The newest run directory of a recipe under ``root`` (``runs/<recipe>/<timestamp>`` by default) in which the
    stage ``finished`` has finished (None: any run).

    Raises:
        DistillError: when there is none.
    """
    folder = Path(root) / recipe
    runs = sorted((p for p in folder.glob("*") if (p / paths.CONFIG_YAML).exists()), key=lambda p: p.stat().st_mtime)
    complete = [p for p in runs if finished is None or runio.read_done(p, finished)]
    if not complete:
        what = f"no run of recipe {recipe!r} under {folder}" + (f" in which {finished} finished" if runs else "")
        raise DistillError(f"{what}; start one with `python -m distill run recipe={recipe}` or pass a run directory "
                           f"to open_run")
    return complete[-1]


def open_run(run_dir: str | Path) -> Run:
    """A read-only view of a run directory. Raises DistillError if it is not one."""
    return Run(run_dir)


class Run(RunPlots):
    """Everything a run directory holds, as pandas tables, dicts and matplotlib figures."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir).expanduser()
        if not self.dir.is_dir():
            raise DistillError(f"run dir {self.dir} does not exist")
        if not (self.dir / paths.CONFIG_YAML).exists() and not any(
                (paths.stage_dir(self.dir, s) / paths.DONE).exists() for s in paths.STAGES):
            raise DistillError(f"{self.dir} is not a run directory (no {paths.CONFIG_YAML}, no stage DONE.json); "
                               f"runs live under runs/<recipe>/<timestamp>")

    def __repr__(self) -> str:
        done = [s for s in paths.STAGES if self.done(s)]
        return f"Run({str(self.dir)!r}, finished: {', '.join(done) or 'nothing'})"

    # -- stages ---------------------------------------------------------------------------------------------------

    def done(self, stage: str) -> dict | None:
        """The stage's DONE.json ({"fingerprint", "summary"}), or None if it did not finish."""
        return runio.read_done(self.dir, stage)

    def summary(self, stage: str) -> dict | NotInRun:
        done = self.done(stage)
        return done["summary"] if done else NotInRun(f"{stage} summary", f"{stage} did not finish")

    def config(self) -> dict | NotInRun:
        """The resolved config of the last invocation (config.yaml; keys appear only as env-variable names)."""
        path = self.dir / paths.CONFIG_YAML
        if not path.exists():
            return NotInRun("config", f"no {paths.CONFIG_YAML}")
        return yaml.safe_load(path.read_text(encoding="utf-8"))

    def stages(self) -> pd.DataFrame:
        """One row per stage: finished or not, its wall time and fingerprint."""
        rows = []
        for stage in paths.STAGES:
            done = self.done(stage)
            summary = (done or {}).get("summary", {})
            rows.append({"stage": stage, "finished": done is not None, "wall_s": summary.get("wall_s"),
                         "fingerprint": (done or {}).get("fingerprint", "")[:12]})
        return pd.DataFrame(rows).set_index("stage")

    def _need(self, stage: str, what: str) -> NotInRun | None:
        return None if self.done(stage) else NotInRun(what, f"{stage} did not finish")

    # -- dataset --------------------------------------------------------------------------------------------------

    def rows(self) -> list[dict] | NotInRun:
        """Every labelled row of every split, as written by generate."""
        if (missing := self._need("generate", "dataset")) is not None:
            return missing
        return [row for split in paths.SPLITS for row in runio.read_jsonl(paths.split_path(self.dir, split))]

    def dataset(self) -> pd.DataFrame | NotInRun:
        """One row per labelled input: id, split, input, chars, words, confidence, teacher.<field>, gold.<field>."""
        rows = self.rows()
        if isinstance(rows, NotInRun):
            return rows
        if not rows:
            return NotInRun("dataset", "generate labelled nothing")
        table = []
        for r in rows:
            item = {"id": r["id"], "split": r["split"], "input": r["input"], "chars": len(r["input"]),
                    "words": len(r["input"].split())}
            conf = (r.get("provenance") or {}).get("confidence")
            item["confidence"] = min(conf.values()) if isinstance(conf, dict) and conf else conf
            item.update({f"teacher.{k}": v for k, v in (r.get("teacher") or {}).items()})
            item.update({f"gold.{k}": v for k, v in (r.get("gold") or {}).items()})
            table.append(item)
        return pd.DataFrame(table).set_index("id")

    def fields(self) -> list[str]:
        """The answer's fields, in schema order (from the resolved config)."""
        cfg = self.config()
        return list(cfg["recipe"]["output_schema"]["properties"]) if cfg else []

    def enum_fields(self) -> dict[str, list[str]]:
        """Fields with a fixed value set -> their allowed values."""
        cfg = self.config()
        if not cfg:
            return {}
        props = cfg["recipe"]["output_schema"]["properties"]
        return {k: list(v["enum"]) for k, v in props.items() if "enum" in v}

    def label_distribution(self, field: str, source: str = "teacher") -> pd.DataFrame | NotInRun:
        """Counts of each value of ``field`` per split (``source`` = "teacher" or "gold"), with a total column."""
        data = self.dataset()
        if not isinstance(data, pd.DataFrame):
            return data
        col = f"{source}.{field}"
        if col not in data:
            return NotInRun(f"{source} labels of {field!r}", f"no column {col}; fields: {', '.join(self.fields())}")
        table = pd.crosstab(data[col].astype(str), data["split"]).reindex(columns=list(paths.SPLITS), fill_value=0)
        table["total"] = table.sum(axis=1)
        allowed = self.enum_fields().get(field)
        if allowed:  # values the teacher never chose still get a row: a class with 0 examples is a finding
            table = table.reindex(allowed, fill_value=0)
        table.index.name = field
        return table.sort_values("total", ascending=False)

    def teacher_vs_gold(self) -> pd.Series | NotInRun:
        """The teacher's accuracy against the inputs' gold labels, per field and whole answer (the student's ceiling
        when it learns from these labels)."""
        summary = self.summary("generate")
        if isinstance(summary, NotInRun):
            return summary
        scores = summary.get("teacher_vs_gold") or {}
        if not scores.get("n"):
            return NotInRun("teacher accuracy vs gold", "no labelled input has a gold label")
        return pd.Series(scores, name="teacher vs gold")

    def lengths(self) -> pd.DataFrame | NotInRun:
        """Input length statistics (characters and words) per split."""
        data = self.dataset()
        if not isinstance(data, pd.DataFrame):
            return data
        return data.groupby("split")[["chars", "words"]].describe().T

    def duplicates(self) -> dict | NotInRun:
        """What generate removed as exact or near-duplicates (with the removed texts where the inputs are readable),
        and any normalised text that still sits in two splits (a leak; should be empty)."""
        rows = self.rows()
        if isinstance(rows, NotInRun):
            return rows
        qa_file = paths.stage_dir(self.dir, "generate") / paths.QA
        qa = runio.read_json(qa_file) if qa_file.exists() else (self.summary("generate").get("qa") or {})
        removed = list(qa.get("removed_ids") or [])
        texts = self._input_texts(removed) if removed else {}
        splits_of: dict[str, set] = {}
        for r in rows:
            splits_of.setdefault(normalise(r["input"]), set()).add(r["split"])
        leaks = {text: sorted(s) for text, s in splits_of.items() if len(s) > 1}
        return {"exact_duplicates": qa.get("exact_duplicates", 0), "near_duplicates": qa.get("near_duplicates", 0),
                "removed": pd.DataFrame([{"id": i, "input": texts.get(i)} for i in removed],
                                        columns=["id", "input"]),
                "cross_split_leaks": leaks}

    def _input_texts(self, ids: list[str]) -> dict[str, str]:
        """Texts of the recipe's inputs by id (for showing removed duplicates); empty if the inputs moved."""
        cfg = self.config()
        try:
            recipe = cfg["recipe"]
            path = Path(recipe["inputs"])
            path = path if path.is_absolute() else Path(recipe["dir"]) / path
            wanted = set(ids)
            out = {}
            for _, obj, err in runio.iter_jsonl_lenient(path):
                if not err and str(obj.get(recipe["id_field"])) in wanted:
                    out[str(obj[recipe["id_field"]])] = obj.get(recipe["text_field"])
            return out
        except (KeyError, TypeError, OSError):
            return {}

    def rejections(self) -> pd.DataFrame | NotInRun:
        """Inputs the teacher never answered validly: id, input, reason (generate/rejected.jsonl)."""
        if (missing := self._need("generate", "rejections")) is not None:
            return missing
        path = paths.stage_dir(self.dir, "generate") / paths.REJECTED
        rows = runio.read_jsonl(path) if path.exists() else []
        return pd.DataFrame(rows, columns=sorted({"id", "input", "reason"} | {k for r in rows for k in r}))

    def rejections_by_reason(self) -> pd.Series | NotInRun:
        rejected = self.rejections()
        if not isinstance(rejected, pd.DataFrame):
            return rejected
        return rejected["reason"].value_counts().rename("inputs")

    # -- teacher spend --------------------------------------------------------------------------------------------

    def _ledger_file(self) -> Path:
        cfg = self.config()
        return paths.ledger_path(self.dir, ((cfg or {}).get("generate") or {}).get("shared_ledger") if cfg else None)

    def spend(self) -> dict | NotInRun:
        """Ledger totals: successful calls, tokens, dollars, cache hits, failures by reason."""
        path = self._ledger_file()
        if not path.exists():
            return NotInRun("teacher spend", f"no ledger at {path}")
        with Ledger.read_only(path) as ledger:
            return ledger.summary()

    def ledger_calls(self) -> pd.DataFrame | NotInRun:
        """Every successful teacher call: time, model, tokens, dollars, latency (opened read-only)."""
        path = self._ledger_file()
        if not path.exists():
            return NotInRun("teacher calls", f"no ledger at {path}")
        with Ledger.read_only(path) as ledger:
            calls = pd.DataFrame(ledger.calls(), columns=["created_at", "model", "prompt_tokens", "cached_tokens",
                                                          "completion_tokens", "cost_usd", "latency_s"])
        calls["created_at"] = pd.to_datetime(calls["created_at"], unit="s")
        calls["cumulative_usd"] = calls["cost_usd"].cumsum()
        return calls

    # -- training -------------------------------------------------------------------------------------------------

    def training_curves(self) -> pd.DataFrame | NotInRun:
        """train/metrics.jsonl as a table indexed by step (loss, learning_rate, eval_loss, ...)."""
        path = paths.stage_dir(self.dir, "train") / paths.TRAIN_METRICS
        if not path.exists():
            return NotInRun("training curves", f"no {paths.TRAIN_METRICS} (train has not started)")
        rows = runio.read_jsonl(path)
        if not rows:
            return NotInRun("training curves", "no step logged yet")
        return pd.DataFrame(rows).groupby("step").last()

    # -- evaluation -----------------------------------------------------------------------------------------------

    def results(self) -> dict | NotInRun:
        """evaluate/results.json (keys documented in README)."""
        if (missing := self._need("evaluate", "evaluation results")) is not None:
            return missing
        return contracts.load_results(paths.stage_dir(self.dir, "evaluate") / paths.RESULTS)

    def _result_key(self, key: str, what: str) -> Any:
        results = self.results()
        if isinstance(results, NotInRun):
            return results
        if key not in results:
            return NotInRun(what, f"results.json has no {key!r} key (written by a newer evaluate stage)")
        return results[key]

    def metrics_table(self) -> pd.DataFrame | NotInRun:
        """Agreement with the teacher and accuracy vs gold, per field and for the whole answer."""
        metrics = self._result_key("metrics", "metrics")
        if isinstance(metrics, NotInRun):
            return metrics
        rows = {}
        for key, name in (("agreement", "student agreement with teacher"), ("student_vs_gold", "student vs gold"),
                          ("teacher_vs_gold", "teacher vs gold")):
            value = metrics.get(key)
            if isinstance(value, dict):
                rows[name] = {k: _point(v) for k, v in value.items()}
        return pd.DataFrame(rows).T

    def confusion(self, field: str) -> pd.DataFrame | NotInRun:
        """Student (columns) vs teacher (rows) counts for an enum field, from results.json ``confusion``."""
        table = self._result_key("confusion", "confusion matrices")
        if isinstance(table, NotInRun):
            return table
        if field not in table:
            return NotInRun(f"confusion of {field!r}", f"fields with a confusion matrix: {', '.join(table)}")
        labels, matrix = table[field]["labels"], table[field]["matrix"]
        frame = pd.DataFrame(matrix, index=labels, columns=labels)
        frame.index.name, frame.columns.name = "teacher", "student"
        return frame

    def coverage_curve(self, split: str = "test") -> pd.DataFrame | NotInRun:
        """Share of items answered at each confidence threshold and the agreement among them (``split`` = "test"
        reads ``coverage_curve``, "val" reads ``val_coverage_curve``)."""
        key = {"test": "coverage_curve", "val": "val_coverage_curve"}.get(split)
        if key is None:
            raise DistillError(f"coverage curves exist for the test and val splits, not {split!r}")
        curve = self._result_key(key, f"{split} coverage curve")
        if isinstance(curve, NotInRun):
            return curve
        if not curve:
            return NotInRun(f"{split} coverage curve", "the student gave no confidences")
        return pd.DataFrame(curve)

    def cost(self) -> dict | NotInRun:
        """The cost case from results.json: teacher vs student $ per 1,000 requests, one-off cost, break-even."""
        return self._result_key("cost", "cost case")

    def cost_table(self) -> pd.DataFrame | NotInRun:
        """$ per 1,000 requests for each way of serving the task (teacher on demand / cached / batch, student),
        with latency and the request volume after which the student has paid for its one-off cost."""
        cost = self.cost()
        if isinstance(cost, NotInRun):
            return cost
        if cost.get("table"):
            return pd.DataFrame(cost["table"]).set_index("option")
        return pd.DataFrame({"usd_per_1k": {"teacher": cost.get("teacher_usd_per_1k"),
                                            "student": cost.get("student_usd_per_1k")}})

    def predictions(self) -> pd.DataFrame | NotInRun:
        """evaluate/predictions.jsonl: input, teacher, student, gold, confidence, invalid reason per item."""
        if (missing := self._need("evaluate", "predictions")) is not None:
            return missing
        return pd.DataFrame(runio.read_jsonl(paths.stage_dir(self.dir, "evaluate") / paths.PREDICTIONS))

    def worst_disagreements(self, n: int = 10) -> pd.DataFrame | NotInRun:
        """Items where the student's answer differs from the teacher's, most confident first (a confident wrong
        answer is the one a routing threshold lets through); invalid answers come last."""
        preds = self.predictions()
        if not isinstance(preds, pd.DataFrame):
            return preds
        if preds.empty:
            return NotInRun("disagreements", "no predictions")
        differs = preds[[s != t for s, t in zip(preds["student"], preds["teacher"])]].copy()
        if "confidence" not in differs:
            differs["confidence"] = None
        differs["_order"] = pd.to_numeric(differs["confidence"], errors="coerce").fillna(-1.0)
        differs = differs.sort_values("_order", ascending=False).drop(columns="_order")
        keep = [c for c in ("id", "input", "teacher", "student", "gold", "confidence", "invalid_reason")
                if c in differs]
        return differs[keep].head(n).reset_index(drop=True)


def _point(value: Any) -> Any:
    """A metric as a number: results.json may hold a bare rate or {"value", "low", "high"} with an interval."""
    if isinstance(value, dict):
        for key in ("value", "point", "rate", "mean"):
            if key in value:
                return value[key]
    return value
