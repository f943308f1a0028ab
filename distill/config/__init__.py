"""Compose the Hydra config for a command line, validate all of it at once, and find recipes.

    cfg = load_config(["recipe=support_tickets", "profile=smoke", "run_dir=runs/x"])
    cfg.train.max_steps, cfg.recipe.dir, cfg.teacher.base_url ...

Hydra composes (config groups, defaults, overrides: ``compose``); pydantic checks types and values (``models``) and
the cross-field rules run next (``checks``); every problem is reported in one message. Stages receive the
validated ``Config``. The parts:

    inputs.py   settings that name environment variables (never a key), the user's UTF-8 / YAML files
    base.py     the models' base and the SPEED_ONLY marker (fields that change how fast, not what)
    models.py   one model per config group; serve.py: the serve group's
    compose.py  Hydra composition, recipe search, one-line messages with "did you mean"
    checks.py   cross-field rules (pure) and start-up checks (files, CUDA) for the stages about to run
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distill import DistillError
from distill.config.base import SPEED_ONLY, key_paths, speed_only_fields, without_speed_only
from distill.config.checks import (SynthesisSpec, check_startup, cross_group_problems, resolve_method,
                                   score_ties, startup_problems, synthesis_spec)
from distill.config.compose import (CONF_DIR, GROUPS, PACKAGE_RECIPES, USER_RECIPE, check_recipe_yaml, compose,
                                    did_you_mean, group_options, key_problem, list_recipes, recipe_search_dirs)
from distill.config.inputs import (ENV_NAME_MAX, KEY_PREFIXES, SECRET_SUFFIXES, EnvName, clean_secret,
                                   env_name_problem, is_secret_setting, load_yaml, looks_like_key, read_secret_env,
                                   read_text, utf8_problem)
from distill.config.inputs import _hides_value
from distill.config.models import (GGUF_QUANTIZER_TYPES, BatchConfig, Config, CostConfig, DecontamConfig,
                                   DedupConfig, EndpointConfig, EvalConfig, GateConfig, GenerateConfig, HeadConfig,
                                   Price, PublishConfig, RecipeConfig, SplitConfig, StudentConfig, TeacherConfig,
                                   TrainConfig)
from distill.config.serve import ServeConfig

__all__ = [
    "SPEED_ONLY", "key_paths", "speed_only_fields", "without_speed_only", "SynthesisSpec", "check_startup",
    "cross_group_problems", "resolve_method", "score_ties", "startup_problems", "synthesis_spec", "CONF_DIR", "GROUPS",
    "PACKAGE_RECIPES", "USER_RECIPE", "check_recipe_yaml", "compose", "did_you_mean", "group_options",
    "key_problem", "list_recipes", "recipe_search_dirs", "ENV_NAME_MAX", "KEY_PREFIXES", "SECRET_SUFFIXES",
    "EnvName", "clean_secret", "env_name_problem", "is_secret_setting", "load_yaml", "looks_like_key",
    "read_secret_env", "read_text", "utf8_problem", "GGUF_QUANTIZER_TYPES", "BatchConfig", "Config", "CostConfig",
    "DecontamConfig", "DedupConfig", "EndpointConfig", "EvalConfig", "GateConfig", "GenerateConfig", "HeadConfig",
    "Price", "PublishConfig", "RecipeConfig", "SplitConfig", "StudentConfig", "TeacherConfig", "TrainConfig",
    "ServeConfig", "validate", "load_config", "public_dict",
]


def _problem(err: dict) -> str:
    """One pydantic error as ``key: what is wrong (got value)``; a value that may be a secret is not shown."""
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":  # a key given with + that no model has
        return key_problem(where)
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if "input" in err and not isinstance(value, dict):
        if _hides_value(where, value if isinstance(value, str) else repr(value)):
            msg += "" if "not shown" in msg else " (the value is not shown)"
        else:
            msg += f" (got {value!r})"
    return f"{where}: {msg}"


def validate(raw: dict[str, Any]) -> Config:
    """Validate a composed config: the models' field checks, then the cross-field rules (checks.py); every
    problem is reported at once."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise DistillError("invalid configuration: " + "; ".join(_problem(e) for e in exc.errors())) from None
    if problems := cross_group_problems(cfg):
        raise DistillError("invalid configuration: " + "; ".join(problems))
    if cfg.cache_dir is None:
        cfg.cache_dir = Path(os.environ.get("DISTILL_CACHE", "~/.cache/distill")).expanduser()
    return cfg


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose + validate + fill in the run directory. The entry point for the CLI, notebooks and tests."""
    cfg = validate(compose(list(overrides or [])))
    if cfg.run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run_dir = Path("runs") / cfg.recipe.name / stamp
    cfg.run_dir = Path(cfg.run_dir).expanduser()
    inputs = cfg.recipe_file("inputs")
    if not inputs.exists() and cfg.generate.source == "label":
        raise DistillError(f"recipe {cfg.recipe.name!r}: input file {inputs} does not exist "
                           f"(set recipe.inputs=PATH to a JSONL file)")
    return cfg


def public_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as written to the run dir: JSON-safe, and it holds env-var *names*, never keys."""
    return cfg.model_dump(mode="json")
