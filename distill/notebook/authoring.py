"""Author a recipe of your own from a notebook: write it, try the teacher on a few inputs, estimate the cost.

    from distill.notebook.authoring import write_recipe, preview_teacher, estimate
    write_recipe("my_recipes", "reviews", description="...", output_schema={...}, teacher_prompt="...",
                 student_prompt="...", inputs=[{"id": "r1", "text": "..."}, ...])
    preview_teacher(["recipe=reviews", "recipe_dir=my_recipes"], n=5)   # five real teacher answers, as a table
    estimate(["recipe=reviews", "recipe_dir=my_recipes", "teacher=openai"])  # $ for every input at that price
    run_pipeline(load_config(["recipe=reviews", "recipe_dir=my_recipes"]))  # generate -> ... -> publish

A recipe written here is the same ``NAME.yaml`` + ``NAME/`` pair as the shipped ones, so
``python -m distill run recipe=NAME recipe_dir=FOLDER`` runs it from the command line too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from distill import DistillError, paths, pipeline, runio
from distill.config import load_config
from distill.task import Task
from distill.teacher import pricing


def off_the_event_loop(fn, *args, **kwargs):
    """Call ``fn`` in a worker thread when this thread already runs an asyncio loop (a Jupyter kernel does): the
    teacher client starts its own loop with ``asyncio.run``, which refuses to nest. Elsewhere, call it directly."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kwargs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_pipeline(cfg, stages: tuple[str, ...] | None = None) -> dict[str, dict]:
    """``distill.pipeline.run`` that also works inside a notebook (see ``off_the_event_loop``)."""
    return off_the_event_loop(pipeline.run, cfg, *([stages] if stages else []))


def write_recipe(folder: str | Path, name: str, *, description: str, output_schema: dict[str, Any],
                 teacher_prompt: str, student_prompt: str, inputs: list[dict] | str | Path,
                 few_shot: list[dict] | None = None, id_field: str = "id", text_field: str = "text",
                 gold_field: str | None = "gold") -> Path:
    """Write ``folder/NAME.yaml`` and ``folder/NAME/`` (inputs, prompts, few-shot) and check the recipe loads.

    Args:
        inputs: rows ({id_field, text_field, optional gold_field}) or a JSONL / CSV / Parquet file to copy in.
        few_shot: labelled examples shown to the teacher: [{"text": ..., "label": {...}}, ...].
    Returns:
        The recipe's YAML file.
    Raises:
        DistillError: naming the problem when the recipe does not validate (schema, few-shot labels, inputs).
    """
    if not name.isidentifier():
        raise DistillError(f"recipe name {name!r} must be a Python-style identifier (letters, digits, _)")
    folder = Path(folder).expanduser().resolve()
    files = folder / name
    files.mkdir(parents=True, exist_ok=True)
    if isinstance(inputs, (str, Path)):
        source = Path(inputs)
        if not source.exists():
            raise DistillError(f"inputs file {source} does not exist")
        inputs_name = f"inputs{source.suffix}"
        shutil.copyfile(source, files / inputs_name)
    else:
        inputs_name = "inputs.jsonl"
        runio.write_jsonl(files / inputs_name, inputs)
    runio.atomic_write_text(files / "teacher_prompt.md", teacher_prompt.strip() + "\n")
    runio.atomic_write_text(files / "student_prompt.md", student_prompt.strip() + "\n")
    spec: dict[str, Any] = {"name": name, "description": description, "inputs": inputs_name, "id_field": id_field,
                            "text_field": text_field, "gold_field": gold_field}
    if few_shot:
        runio.write_jsonl(files / "few_shot.jsonl", few_shot)
        spec["few_shot"] = "few_shot.jsonl"
    spec.update({"teacher_prompt": "teacher_prompt.md", "student_prompt": "student_prompt.md",
                 "output_schema": output_schema})
    yaml_file = folder / f"{name}.yaml"
    header = f"# python -m distill run recipe={name} recipe_dir={folder}\n"
    runio.atomic_write_text(yaml_file, header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    check_recipe([f"recipe={name}", f"recipe_dir={folder}"])
    return yaml_file


def check_recipe(overrides: list[str]) -> dict:
    """Load a recipe the way a run does and read its inputs. Returns counts; raises DistillError on a problem."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*overrides, f"run_dir={tmp}"])
        task = Task(cfg)  # validates the schema and every few-shot label against it
        report = task.load_inputs()
    return {"inputs": len(report.examples), "skipped": report.skipped, "bad_gold": report.bad_gold,
            "with_gold": sum(ex.gold is not None for ex in report.examples), "few_shot": len(task.few_shot),
            "fields": task.schema.fields, "enum_fields": list(task.schema.enums)}


def preview_teacher(overrides: list[str], n: int = 5, run_dir: str | Path | None = None):
    """Have the teacher label the first ``n`` inputs exactly as the generate stage would, and show its answers.

    The calls go through the ledger: with ``generate.shared_ledger=FILE`` in ``overrides`` (and in the later
    run), the run does not pay for these ``n`` again.

    Returns:
        A DataFrame indexed by id: input, teacher.<field> and gold.<field> for every field, and the reason when
        the teacher's answer was rejected.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*overrides, f"generate.limit={n}", f"run_dir={run_dir or tmp}"])
        failure = None
        try:
            result = off_the_event_loop(pipeline.run_stage, cfg, "generate")
        except DistillError as exc:  # e.g. no valid answer at all: show the rejections, then say why
            failure = exc
        else:
            if isinstance(result, pricing.DryRun):  # generate.dry_run=true in overrides: nothing to show, say so
                raise DistillError(f"{result}; preview_teacher shows real answers, so leave generate.dry_run "
                                   f"out (estimate() gives the cost without sending anything)")
        out_dir = paths.stage_dir(cfg.run_dir, "generate")
        rows = [r for s in paths.SPLITS if paths.split_path(cfg.run_dir, s).exists()
                for r in runio.read_jsonl(paths.split_path(cfg.run_dir, s))]
        rejected = runio.read_jsonl(out_dir / paths.REJECTED) if (out_dir / paths.REJECTED).exists() else []
    if failure is not None and not rows and not rejected:
        raise failure
    table = [{"id": r["id"], "input": r["input"], "answer": r["teacher"], "reason": None, "gold": r.get("gold")}
             for r in rows]
    table += [{"id": r["id"], "input": r["input"], "answer": None, "reason": r["reason"], "gold": None}
              for r in rejected]
    order = {ex_id: i for i, ex_id in enumerate(_input_ids(cfg))}
    table.sort(key=lambda row: order.get(row["id"], len(order)))
    fields = list(cfg.recipe.output_schema["properties"])
    flat = []
    for row in table:  # one column per field, teacher beside gold, so disagreements are easy to spot
        item = {"id": row["id"], "input": row["input"]}
        for field in fields:
            item[f"teacher.{field}"] = row["answer"].get(field) if row["answer"] else None
            if any(r["gold"] for r in table):
                item[f"gold.{field}"] = row["gold"].get(field) if row["gold"] else None
        item["rejected"] = row["reason"]
        flat.append(item)
    return pd.DataFrame(flat).set_index("id")


def _input_ids(cfg) -> list[str]:
    return [ex.id for ex in Task(cfg).load_inputs(cfg.generate.limit).examples]


def estimate(overrides: list[str]) -> dict:
    """Estimated teacher requests, tokens and dollars for labelling every input (``generate.limit`` respected) at
    the configured teacher's price list; nothing is sent. For the exact figure of a planned run, including what
    its ledger already holds, use ``python -m distill generate ... generate.dry_run=true``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*overrides, f"run_dir={tmp}"])
        task = Task(cfg)
        examples = task.load_inputs(cfg.generate.limit).examples
        requests = [{"messages": task.teacher_messages(ex.text), "max_tokens": cfg.teacher.max_tokens}
                    for ex in examples]
        result = pricing.estimate_run(cfg, requests)
    price = cfg.teacher.price
    return {**result, "teacher": cfg.teacher.model, "usd_per_1m_input": price.input_per_1m,
            "usd_per_1m_output": price.output_per_1m}

