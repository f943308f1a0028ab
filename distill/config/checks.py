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

from distill import DistillError, contracts

if TYPE_CHECKING:
    from distill.config.models import Config


def schema_fields(cfg: Config) -> list[str]:
    return list(cfg.recipe.output_schema.get("properties", {}))


def free_fields(cfg: Config) -> list[str]:
    """The answer's fields without a fixed set of values (no ``enum``)."""
    props = cfg.recipe.output_schema.get("properties", {})
    return [name for name, spec in props.items() if not (isinstance(spec, dict) and "enum" in spec)]


def _method(cfg: Config) -> tuple[str, str | None]:
    method = cfg.teacher.method
    free = free_fields(cfg)
    if method == "auto":
        method = "generate" if free else "score"
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
    if problem:
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
    return problems


def startup_problems(cfg: Config, stages: tuple[str, ...]) -> list[str]:
    """What would stop ``stages`` later for want of a file or a device: a missing ``eval.baseline``, QLoRA
    without a 4-bit base or without CUDA."""
    problems = []
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
