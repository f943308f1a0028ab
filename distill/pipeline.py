"""The pipeline: for each stage, skip it if its DONE.json fingerprint still matches, else run it and write DONE.json.

    python -m distill run recipe=support_tickets                       # all four stages
    python -m distill run recipe=support_tickets run_dir=runs/x        # again: finished stages are skipped
    python -m distill evaluate recipe=support_tickets run_dir=runs/x   # one stage alone

A stage's fingerprint is the hash of the config it reads plus the fingerprints and recorded output digests of the
stages it reads from, so editing the training config re-runs train, evaluate and publish but never pays the teacher
again, and a stage re-run that produced different files re-runs what was built on them.

A DONE.json is trusted only while the outputs it records still match the files (runio.done_problem), and it is
deleted before a stage starts rewriting its files: a crash mid-way leaves no DONE.json, never an old one over new data
(publish writes nothing in place, it swaps a finished folder in whole, so it keeps the old one's until the swap).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from distill import DistillError, GateFailed, __version__, paths, runio
from distill.config import Config, check_startup, public_dict, without_speed_only
from distill.metrics.gate import failure_reasons
from distill.serve.traffic import source_digest
from distill.teacher.pricing import DryRun

log = logging.getLogger("distill")

UPSTREAM = {"generate": (), "train": ("generate",), "evaluate": ("generate", "train"),
            "publish": ("generate", "train", "evaluate")}

# Config each stage reads. Knobs that change how fast, not what (concurrency, timeouts, threads, where copies of a
# report go) are marked SPEED_ONLY on their config fields and left out, so turning them never invalidates finished
# work; so is the loopback URL of a server distill starts itself.
_SLICES = {"generate": ("recipe", "teacher", "generate", "seed"), "train": ("student", "train", "seed"),
           "evaluate": ("eval",), "publish": ("publish",)}


def _slice(cfg: Config, stage: str) -> dict:
    out = without_speed_only(Config, {k: v for k, v in public_dict(cfg).items() if k in _SLICES[stage]})
    if stage == "generate":
        out["recipe"] = {k: v for k, v in out["recipe"].items() if k != "dir"}
        out["recipe_files"] = runio.sha256_tree(Path(cfg.recipe.dir))
        if cfg.generate.source == "traffic":  # the log's content, not its path: new traffic re-runs generate
            out["traffic_log"] = source_digest(cfg)
        if cfg.teacher.kind == "llama_cpp":
            out["teacher"] = {k: v for k, v in out["teacher"].items() if k != "base_url"}
    return out


def fingerprint(cfg: Config, stage: str) -> str:
    """Hash of the stage's config slice + its upstream stages' fingerprints and output digests (from their
    DONE.json, checked against the files first: an upstream DONE.json whose files changed is a DistillError)."""
    upstream = {}
    for up in UPSTREAM[stage]:
        done = runio.require_done(cfg.run_dir, up, needed_by=stage)
        problem = runio.done_problem(cfg.run_dir, up, done)
        if problem:
            raise DistillError(f"{stage} needs a finished {up} stage in {cfg.run_dir}, and {problem}; re-run "
                               f"`python -m distill {up} run_dir={cfg.run_dir} ...` or `python -m distill run`")
        # The upstream outputs are part of it, not only the upstream fingerprint: an upstream re-run with the same
        # fingerprint (forced, interrupted then resumed, or after its files were found changed) that writes other
        # files (a teacher or a GPU that is not deterministic) must re-run this stage too.
        upstream[up] = {"fingerprint": done["fingerprint"], "outputs": done.get("outputs") or {}}
    # The package version is part of it: a release that labels, trains or scores differently redoes the work.
    return runio.sha256_obj({"stage": stage, "version": __version__, "config": _slice(cfg, stage),
                             "upstream": upstream})


# Stages that never write into their own folder while they run: publish builds a staging folder and swaps it in
# whole (runio.swap_into_place), and the new folder has no DONE.json until the pipeline writes it. Their DONE.json
# is left in place while they run, so a failure or a kill keeps the old, complete, still-trusted folder.
_SWAPPED_IN = ("publish",)


def _rerun_reason(cfg: Config, stage: str, done: dict | None, fp: str, force: bool) -> str | None:
    """Why the stage must run, or None when its DONE.json matches the fingerprint and the files it records."""
    if force:
        return "forced"
    if done is None:
        return f"no {stage}/{paths.DONE} (not run yet, or interrupted)"
    if done.get("fingerprint") != fp:
        return "its config or an upstream stage changed"
    problem = runio.done_problem(cfg.run_dir, stage, done)
    if problem:
        return f"{problem}, so {stage}/{paths.DONE} is not trusted"
    return None


def run_stage(cfg: Config, stage: str, *, force: bool = False) -> dict:
    """Run one stage unless its DONE.json matches; returns the stage summary."""
    if stage not in paths.STAGES:
        raise DistillError(f"unknown stage {stage!r}; stages: {', '.join(paths.STAGES)}")
    fp = fingerprint(cfg, stage)
    done = runio.read_done(cfg.run_dir, stage, verify=False)
    reason = _rerun_reason(cfg, stage, done, fp, force)
    if reason is None:
        log.info("%-8s skipped: finished earlier with the same fingerprint %s", stage, fp[:12])
        return done["summary"]
    module = importlib.import_module(f"distill.stages.{stage}")
    if stage not in _SWAPPED_IN:
        # Before the first write: from here until the new DONE.json the stage counts as unfinished, whatever
        # config runs next. (Every process of a multi-process train does this; all do it before train's first
        # barrier, so none can delete the DONE.json that rank 0 writes at the end.)
        runio.remove_done(cfg.run_dir, stage)
    # Downstream DONE.json files are left alone: their fingerprints include this stage's fingerprint and recorded
    # output digests, so they match again only if this run ends with the same config and byte-identical outputs
    # (then what they built on is unchanged and reusing them is right), and while this stage has no DONE.json
    # they cannot be used at all (fingerprint() needs it).
    log.info("%-8s running (fingerprint %s): %s", stage, fp[:12], reason)
    started = time.perf_counter()
    summary = module.run(cfg, cfg.run_dir)
    if isinstance(summary, DryRun):  # generate.dry_run=true: an estimate, nothing sent, so no DONE.json
        log.info("%-8s stopped after the dry run", stage)
        return summary
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    runio.write_done(cfg.run_dir, stage, fp, summary)
    log.info("%-8s done in %.1f s", stage, summary["wall_s"])
    return summary


def save_config(cfg: Config, overrides: list[str] | None = None) -> None:
    """Write the resolved config to config.yaml and, from the command line, the overrides that composed it to
    overrides.yaml (Hydra's own name for that record), which the next command on this run starts from."""
    import yaml

    runio.atomic_write_text(Path(cfg.run_dir) / paths.CONFIG_YAML,
                            yaml.safe_dump(public_dict(cfg), sort_keys=False, allow_unicode=True))
    if overrides is not None:
        kept = [_portable(o) for o in overrides if _key(o) not in _NOT_RECORDED]
        runio.atomic_write_text(Path(cfg.run_dir) / paths.OVERRIDES_YAML,
                                yaml.safe_dump(kept, sort_keys=False, allow_unicode=True))


# Not carried to the next command: the run dir itself, and what one invocation asks for once (an estimate instead of
# a run; publishing past a failed gate).
_NOT_RECORDED = ("run_dir", "generate.dry_run", "publish.force")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _portable(override: str) -> str:
    """``recipe_dir=`` as an absolute path, so a later command from another folder finds the same recipe."""
    key, eq, value = override.partition("=")
    if _key(override) == "recipe_dir" and eq and value:
        return f"{key}={Path(value).expanduser().resolve()}"
    return override


def run_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The overrides a command on ``run_dir=DIR`` composes: the run's own (its overrides.yaml), then the given
    ones, which win key by key; returns (all of them, the run's own that were kept).

    A run made on the command line records its overrides, so ``evaluate run_dir=DIR eval.gate.min_agreement=0.8``
    evaluates the run that is there (its recipe, profile, student) with one setting changed, instead of composing
    the defaults afresh. A given ``recipe=`` other than the run's is refused: its stages hold another task's work.
    Without a run_dir, a new folder, or a run made from Python (no overrides.yaml), the given overrides are all."""
    import yaml

    given = [o.split("=", 1)[1] for o in overrides if _key(o) == "run_dir" and "=" in o]
    if not given or not given[-1]:
        return list(overrides), []
    run_dir = Path(given[-1]).expanduser()
    recipe, recipe_dir = _saved_recipe(run_dir)
    asked = [o.split("=", 1)[1] for o in overrides if _key(o) == "recipe" and "=" in o]
    if recipe and asked and asked[-1] != recipe:
        raise DistillError(f"run_dir={given[-1]} holds a run of recipe {recipe!r}, not {asked[-1]!r}: a run dir "
                           f"holds one task; give recipe={recipe} (or none) to work on it, or a new run_dir for "
                           f"{asked[-1]}")
    record = run_dir / paths.OVERRIDES_YAML
    if not record.is_file():
        # A run made from Python: its config.yaml still says which recipe it is, and where that recipe lives.
        mine = {_key(o) for o in overrides}
        kept = [] if not recipe or "recipe" in mine else [f"recipe={recipe}"]
        if kept and recipe_dir and "recipe_dir" not in mine:
            kept.append(f"recipe_dir={recipe_dir}")
        return kept + list(overrides), kept
    try:
        saved = yaml.safe_load(record.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DistillError(f"{record} is not readable YAML ({' '.join(str(exc).split())[:200]}); it records the "
                           f"overrides that made this run: fix it, or delete it and give every override again") from None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise DistillError(f"{record} must be a YAML list of override strings (key=value); fix it, or delete it and "
                           f"give every override again")
    mine = {_key(o) for o in overrides}
    kept = [o for o in saved if _key(o) not in mine and _key(o) not in _NOT_RECORDED]
    return kept + list(overrides), kept


def _saved_recipe(run_dir: Path) -> tuple[str | None, str | None]:
    """The recipe a run's config.yaml names, and the recipe_dir it came from (None for a packaged recipe)."""
    import yaml

    from distill.config import PACKAGE_RECIPES

    try:
        recipe = (yaml.safe_load((run_dir / paths.CONFIG_YAML).read_text(encoding="utf-8")) or {}).get("recipe")
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None, None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str):
        return None, None
    folder = Path(str(recipe.get("dir") or "")).parent
    packaged = not recipe.get("dir") or folder.resolve() == Path(PACKAGE_RECIPES).resolve()
    return recipe["name"], None if packaged or not folder.is_dir() else str(folder)


# The settings of an upstream stage that the stages after it read as well: the recipe (schema, prompts) that generate
# labelled under, and the student that train trained (evaluate and publish load it). The rest of an upstream slice
# (the teacher, generate.*, train.*) is read by that stage alone, so a stage run alone may differ there: train alone
# with a teacher.base_url that no longer answers trains on the same data.
_READ_DOWNSTREAM = ("recipe.", "student.")


def check_upstream(cfg: Config, stage: str, *, recorded: bool = True) -> None:
    """One stage run alone: every stage it reads from finished, under the recipe and student settings it ran with.

    ``run`` re-runs an upstream stage whose settings changed; a stage run alone cannot, so building on it would mix
    two configs (an evaluate whose student differs from the one train trained loads another model under the adapter).
    The reference is the run's config.yaml, which a command rewrites only after this check. Raises DistillError
    before anything is written, naming the settings that differ. ``recorded``: the run has an overrides.yaml the
    command started from (else the hint asks for the run's overrides again)."""
    saved = _saved_config(cfg.run_dir)  # read once for every upstream stage
    for up in UPSTREAM[stage]:
        runio.require_done(cfg.run_dir, up, needed_by=stage)
        changed = _changed_settings(cfg, saved, up, _READ_DOWNSTREAM)
        if not changed:
            continue
        fix = ("leave out the overrides that change it" if recorded else
               f"give the overrides the run was made with again (it has no {paths.OVERRIDES_YAML}: made from Python "
               f"or by an older distill; its {paths.CONFIG_YAML} holds every setting)")
        raise DistillError(f"{stage} alone would build on a {up} stage made otherwise: these settings differ from the "
                           f"ones it ran with: {changed}. Run `python -m distill run run_dir={cfg.run_dir} ...` to "
                           f"redo {up} and what follows from it, or {fix}")


def _saved_config(run_dir) -> Config | None:
    """The run's config.yaml, validated; None when it is missing or unreadable."""
    import yaml

    from distill.config import validate

    try:
        return validate(yaml.safe_load((Path(run_dir) / paths.CONFIG_YAML).read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, DistillError, TypeError, ValueError):
        return None


def _changed_settings(cfg: Config, saved: Config | None, stage: str, prefixes: tuple[str, ...],
                      limit: int = 6) -> str:
    """``key: saved -> now`` for the settings of ``stage`` under ``prefixes`` that differ from ``saved`` (the run's
    config.yaml; '' if none differ, or without one)."""
    if saved is None:
        return ""
    before, now = _flat(_slice(saved, stage)), _flat(_slice(cfg, stage))
    keys = sorted(set(before) | set(now), key=lambda k: (k.count("."), k))  # a group's name before its details
    diffs = [f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in keys
             if k.startswith(prefixes) and before.get(k) != now.get(k)]
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def run(cfg: Config, stages: tuple[str, ...] = paths.STAGES, *, overrides: list[str] | None = None) -> dict[str, dict]:
    """Run stages in order; stops with GateFailed before publish when the evaluate gate fails. Every start-up
    check of every stage (config.check_startup) runs before the first one starts. ``overrides``: the command line
    that composed ``cfg``, recorded for the next command on this run (save_config)."""
    check_startup(cfg, stages)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, overrides)
    summaries = {}
    for stage in stages:
        summaries[stage] = run_stage(cfg, stage)
        if isinstance(summaries[stage], DryRun):  # nothing downstream can run on an estimate
            break
        if stage == "evaluate" and not cfg.publish.force:
            check_gate(summaries[stage])
    return summaries


def check_gate(summary: dict) -> None:
    """Raise GateFailed when the gate evaluate recorded in ``summary`` failed (metrics.gate.failure_reasons)."""
    reasons = failure_reasons(summary)
    if reasons is not None:
        raise GateFailed("evaluate gate failed: " + "; ".join(reasons))
