"""Cross-field checks: every rule that needs more than one field, run before the first stage.

    problems = cross_group_problems(cfg)               # pure: config + recipe (validate runs these)
    check_startup(cfg, stages=("train", "evaluate"))   # the machine and the files the stages will read

Each rule lives here once and the stage that depends on it calls it (``resolve_method`` for generate,
``synthesis_spec`` for synthesize), so a misspelt gate field or a missing baseline fails in a second, not after
the teacher was paid or the student trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill import DistillError, contracts, paths

if TYPE_CHECKING:
    from distill.config.models import Config


def schema_fields(cfg: Config) -> list[str]:
    return list(cfg.recipe.output_schema.get("properties", {}))


def free_fields(cfg: Config) -> list[str]:
    """The answer's fields without a fixed set of values (no ``enum``)."""
    props = cfg.recipe.output_schema.get("properties", {})
    return [name for name, spec in props.items() if not (isinstance(spec, dict) and "enum" in spec)]


def score_ties(cfg: Config) -> dict[str, list[tuple[str, str]]]:
    """Per enum field, the pairs of its values that first-token scoring cannot tell apart (scoring.first_token_ties)."""
    from distill.teacher.scoring import first_token_ties

    props = cfg.recipe.output_schema.get("properties", {})
    found = {name: first_token_ties(spec["enum"]) for name, spec in props.items()
             if isinstance(spec, dict) and isinstance(spec.get("enum"), list)}
    return {name: ties for name, ties in found.items() if ties}


def score_ties_problem(cfg: Config) -> str | None:
    """Why an explicit ``teacher.method=score`` cannot label this recipe (values that begin alike), or None.

    Checked where generate is about to label, not when a config is read: a run labelled that way earlier still
    evaluates, publishes and serves."""
    ties = score_ties(cfg) if cfg.teacher.method == "score" else {}
    if not ties:
        return None
    pairs = "; ".join(f"{field}: " + ", ".join(f"{a} / {b}" for a, b in found[:3])
                      + (f" and {len(found) - 3} more pairs" if len(found) > 3 else "") for field, found in ties.items())
    return (f"teacher.method=score ranks each value by the answer's first token, and these values begin alike, so it "
            f"cannot tell them apart ({pairs}): use teacher.method=generate (auto chooses it for this recipe), or give "
            f"the values distinct first words")


def _method(cfg: Config) -> tuple[str, str | None]:
    method = cfg.teacher.method
    free = free_fields(cfg)
    if method == "auto":
        method = "generate" if free or score_ties(cfg) else "score"
    if method == "score" and free:
        return method, (f"teacher.method=score needs a fixed set of values (enum) for every field; "
                        f"{', '.join(free)} have none. Use teacher.method=generate (or auto) for this recipe")

    if method == "score" and cfg.generate.self_consistency > 1:
        return method, ("generate.self_consistency > 1 needs teacher.method=generate (score already gives a "
                        "confidence per field)")
    if cfg.generate.mode == "batch" and (method != "generate" or cfg.teacher.kind != "openai"
                                         or cfg.generate.self_consistency > 1):
        return method, ("generate.mode=batch needs an OpenAI-compatible Batch API (teacher=openai), "
                        "teacher.method=generate and generate.self_consistency=1")
    return method, None


def resolve_method(cfg: Config, task: Any = None) -> str:
    """``teacher.method`` as generate runs it (``auto``: score when every field has a fixed value set, generate
    otherwise). Raises DistillError for a method the recipe or the generate settings rule out. (``task`` is
    accepted for the old call signature; the rule reads only the config.)"""
    method, problem = _method(cfg)
    if problem or (problem := score_ties_problem(cfg)):
        raise DistillError(problem)
    return method


class SynthesisSpec(BaseModel):
    """``recipe.synthesis`` for ``generate.source=synthesize`` (see distill/stages/synthesize.py)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    per_cell: int = Field(1, ge=1)
    seeds: int = Field(3, ge=0)
    grid: dict[str, list[str]]


def _synthesis(cfg: Config) -> tuple[SynthesisSpec | None, str | None]:
    if not cfg.recipe.synthesis:
        return None, (f"generate.source=synthesize needs a synthesis section in recipe {cfg.recipe.name!r} "
                      f"(prompt, grid, per_cell); see distill/stages/synthesize.py")
    try:
        out = SynthesisSpec(**cfg.recipe.synthesis)
    except ValidationError as exc:
        err = exc.errors()[0]
        return None, f"recipe {cfg.recipe.name!r} synthesis.{'.'.join(map(str, err['loc']))}: {err['msg']}"
    if not out.grid or any(not v for v in out.grid.values()):
        return None, f"recipe {cfg.recipe.name!r}: synthesis.grid needs at least one axis, each with values"
    return out, None


def synthesis_spec(cfg: Config) -> SynthesisSpec:
    """The recipe's synthesis section, checked; DistillError naming the bad part."""
    spec, problem = _synthesis(cfg)
    if problem:
        raise DistillError(problem)
    return spec


def gate_problems(cfg: Config) -> list[str]:
    """``eval.gate.*`` settings the recipe's task rules out (a per-field floor for a field it does not have)."""
    fields = schema_fields(cfg)
    unknown = sorted(set(cfg.eval.gate.min_field_agreement) - set(fields))
    if not unknown:
        return []
    return [f"eval.gate.min_field_agreement names {', '.join(unknown)}, which recipe {cfg.recipe.name!r} does not "
            f"have; its fields: {', '.join(fields)} (e.g. +eval.gate.min_field_agreement.{fields[0]}=0.9)"]


def cross_group_problems(cfg: Config) -> list[str]:
    """Problems no single group can see: settings of one group that the recipe's task or another group rules out.
    Pure functions of the config and the recipe: no file beyond the recipe is read, no machine is asked."""
    problems = []
    if cfg.student.kind == "embed_classifier" and (free := free_fields(cfg)):
        problems.append(f"student={cfg.student.name} (an embedding classifier) answers only fields with a fixed "
                        f"set of values, and recipe {cfg.recipe.name!r} has free-text fields "
                        f"{', '.join(free)}; pick a causal-LM student (e.g. student=smollm2_135m)")
    problems += gate_problems(cfg)
    if cfg.eval.endpoint.base_url and not cfg.eval.endpoint.model:
        problems.append("eval.endpoint.model is required with eval.endpoint.base_url (the model name the server "
                        "serves; llama.cpp accepts any)")
    if problem := _method(cfg)[1]:
        problems.append(problem)
    if cfg.generate.source == "synthesize" and (problem := _synthesis(cfg)[1]):
        problems.append(problem)
    if cfg.generate.source == "traffic" and cfg.generate.split.train + cfg.generate.split.val <= 0:
        problems.append("generate.source=traffic keeps the served run's test split and puts new inputs in train "
                        "and val: generate.split.train + generate.split.val must be > 0")
    return problems


def served_ledger(traffic: str) -> str | None:
    """The ledger the served run behind ``generate.traffic=PATH`` used (its ``generate.shared_ledger``, else its
    ``generate/ledger.sqlite``), as an absolute path; None when PATH is not a run dir or a log inside one."""
    from distill.serve.traffic import locate

    run, _ = locate(traffic)
    if run is None or not paths.stage_dir(run, "generate").is_dir():
        return None
    shared = None
    if (saved := run / paths.CONFIG_YAML).is_file():
        import yaml

        shared = ((yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("generate") or {}).get("shared_ledger")
    return str(paths.ledger_path(run, shared).resolve())


def traffic_problems(cfg: Config) -> list[str]:
    """``generate.source=traffic``: the path holds a traffic log with records for this recipe, inside a served run
    whose generate stage finished (its test split is kept) and which is not this run."""
    from distill.serve.store import StoreError
    from distill.serve.traffic import in_shared_store, locate, source_counts, source_name

    given = cfg.generate.traffic
    run, log_file = locate(given)
    hint = "point generate.traffic at the served run's directory (or its serve/traffic.sqlite)"
    if not Path(given).expanduser().exists():
        return [f"generate.traffic={given} does not exist; {hint}"]
    if run is None:
        return [f"generate.traffic={given} is not inside a served run's serve/ folder: the re-distilled run keeps "
                f"that run's test split and reads its ledger; {hint}"]
    if not in_shared_store(cfg) and not log_file.is_file():
        return [f"generate.traffic={given} holds no traffic log ({log_file} is missing): serve the run first "
                f"(`python -m distill serve run_dir={run}`, serve.traffic.enabled=true), or pass the serve.store=redis "
                f"settings the gateway ran with"]
    try:
        counts, log_file = source_counts(cfg), source_name(cfg)
    except StoreError as exc:
        return [f"generate.traffic={given} with serve.store=redis: {exc}"]
    namespace = cfg.serve.store_namespace or cfg.recipe.name
    problems = []
    if not counts.get(namespace):
        found = ", ".join(f"{ns or '(none)'}: {n}" for ns, n in sorted(counts.items())) or "none"
        problems.append(f"{log_file} holds no traffic records for {namespace!r} (records by namespace: {found}); "
                        f"send the gateway requests first, or set serve.store_namespace to the one it used")
    if not (paths.stage_dir(run, "generate") / paths.DONE).is_file() or not paths.split_path(run, "test").is_file():
        problems.append(f"{run} has no finished generate stage: a re-distilled run keeps the served run's test "
                        f"split, so {paths.split_path(run, 'test')} must exist")
    if cfg.run_dir is not None and Path(cfg.run_dir).expanduser().resolve() == run.resolve():
        problems.append(f"generate.traffic names this run ({run}); re-distil into a new run_dir=NEW")
    if not cfg.recipe_file("inputs").is_file():
        problems.append(f"recipe {cfg.recipe.name!r}: input file {cfg.recipe_file('inputs')} does not exist; "
                        f"re-distillation adds the traffic to the recipe's own data")
    return problems


def startup_problems(cfg: Config, stages: tuple[str, ...]) -> list[str]:
    """What would stop ``stages`` later for want of a file or a device: a missing ``eval.baseline``, QLoRA
    without a 4-bit base or without CUDA."""
    problems = []
    if "generate" in stages and cfg.generate.source == "traffic":
        problems += traffic_problems(cfg)
    if "generate" in stages and (problem := score_ties_problem(cfg)):
        problems.append(problem)
    in_process = "evaluate" in stages and not cfg.eval.endpoint.base_url
    if "evaluate" in stages and cfg.eval.baseline:
        baseline = Path(cfg.eval.baseline).expanduser()
        if not baseline.is_file():
            problems.append(f"eval.baseline={cfg.eval.baseline} does not exist; point it at evaluate/results.json of "
                            f"an earlier run (or drop eval.baseline)")
        else:
            try:
                contracts.load_baseline(baseline)
            except DistillError as exc:
                problems.append(f"eval.baseline is not usable: {exc}")
    if "train" in stages and cfg.train.method == "qlora" and not cfg.student.load_in_4bit:
        problems.append("train=qlora needs a 4-bit base: set student.load_in_4bit=true (CUDA only)")
    loads_4bit = cfg.student.load_in_4bit and cfg.student.kind == "causal_lm"
    if loads_4bit and ("train" in stages or in_process or "publish" in stages) and not _has_cuda():
        what = "train=qlora" if cfg.train.method == "qlora" else f"student={cfg.student.name}"
        problems.append(f"{what} loads the student in 4 bits (student.load_in_4bit=true, bitsandbytes), which needs "
                        f"a CUDA GPU, and none is visible; on CPU use train=lora student.load_in_4bit=false")
    return problems


def _has_cuda() -> bool:
    import torch  # only asked when a 4-bit student would be loaded: importing torch costs seconds

    return torch.cuda.is_available()


def check_startup(cfg: Config, stages: tuple[str, ...]) -> None:
    """Raise one DistillError listing every start-up problem of ``stages`` (see startup_problems)."""
    if problems := startup_problems(cfg, stages):
        raise DistillError("cannot start: " + "; ".join(problems))
