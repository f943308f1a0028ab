"""Compose the raw config for a command line with Hydra, and find recipes.

    raw = compose(["recipe=support_tickets", "profile=smoke", "train.max_steps=3"])

Hydra composes (config groups, defaults, overrides); what it refuses becomes one line that names the override, the
valid names and, for a typo, the closest one ("did you mean train.max_steps?").
"""

from __future__ import annotations

import difflib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from distill import DistillError
from distill.config.inputs import _hides_value, is_secret_setting, load_yaml, looks_like_key, read_text

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PACKAGE_RECIPES = CONF_DIR / "recipe"
GROUPS = ("recipe", "teacher", "student", "train", "eval", "publish", "generate", "serve", "profile")


def did_you_mean(word: str, choices, what: str = "") -> str:
    """``" (did you mean X?)"`` for the closest of ``choices`` to a mistyped ``word`` (empty when none is close)."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {what}{close[0]}?)" if close else ""


def key_problem(key: str) -> str:
    """Why ``key`` (dotted) is no setting: the closest setting and the valid names beside it."""
    from distill.config.base import key_paths, model_of
    from distill.config.models import Config

    parts = key.split(".")
    model, prefix = Config, ""
    for part in parts[:-1]:  # walk down while the path names config models
        field = model.model_fields.get(part)
        sub = model_of(field.annotation) if field is not None else None
        if sub is None:
            break
        model, prefix = sub, prefix + part + "."
    valid = sorted(model.model_fields)
    hint = did_you_mean(key, key_paths(Config))
    where = f"keys of {prefix.rstrip('.')}" if prefix else "top-level keys and groups"
    return f"unknown config key {key!r}{hint}: no such setting; {where}: {', '.join(valid)}"


def recipe_search_dirs(recipe_dir: str | None) -> list[Path]:
    """Folders searched for ``NAME.yaml`` + ``NAME/``, first match wins: recipe_dir, ./recipes, the package's."""
    dirs = []
    if recipe_dir:
        folder = Path(recipe_dir).expanduser().resolve()
        if not folder.is_dir():
            raise DistillError(f"recipe_dir={recipe_dir}: no such folder ({folder}); point it at a folder holding "
                               f"NAME.yaml + NAME/ for each recipe of yours")
        dirs.append(folder)
    local = Path.cwd() / "recipes"
    if local.is_dir():
        dirs.append(local.resolve())
    dirs.append(PACKAGE_RECIPES)
    return dirs


def list_recipes(recipe_dir: str | None = None) -> dict[str, Path]:
    """Known recipes by name -> their YAML file (earlier folders shadow later ones)."""
    found: dict[str, Path] = {}
    for folder in recipe_search_dirs(recipe_dir):
        for yaml_file in sorted(folder.glob("*.yaml")):
            found.setdefault(yaml_file.stem, yaml_file)
    return found


def _override_value(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        if item.split("=", 1)[0].lstrip("+~") == key and "=" in item:
            return item.split("=", 1)[1]
    return None


USER_RECIPE = "user_recipe__"


def _searchpath_dir(recipe_yaml: Path, base: Path) -> str:
    """Hydra finds group options under ``<searchpath>/recipe/``; expose a user's recipe there under an alias, so it
    wins over a packaged recipe of the same name (Hydra searches the package first). ``base`` is a temporary
    folder the caller removes once Hydra has composed. The alias is the recipe's text as UTF-8 without a BOM."""
    (base / "recipe").mkdir()
    (base / "recipe" / f"{USER_RECIPE}.yaml").write_text(read_text(recipe_yaml), encoding="utf-8")
    return f"file://{base}"


def _refuse_secret_overrides(overrides: list[str]) -> None:
    """A key, token or password given on the command line is refused by its setting's name, never echoed."""
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if value and is_secret_setting(key):
            raise DistillError(
                f"{key}: distill never takes a secret as a setting (the value is not shown, and it is now in your "
                f"shell history: consider rotating it). Put it in an environment variable and name that variable: "
                f"export OPENAI_API_KEY=... then teacher.api_key_env=OPENAI_API_KEY (eval.endpoint.api_key_env for "
                f"an endpoint)")


def _redact(text: str, overrides: list[str]) -> str:
    """``text`` with every override value that must not be echoed (and anything key-shaped) replaced by ***."""
    for item in overrides:
        key, _, value = item.partition("=")
        if value.strip() and _hides_value(key.lstrip("+~"), value):
            text = text.replace(value, "***")
    return re.sub(r"[A-Za-z0-9_\-]{20,}", lambda m: "***" if looks_like_key(m.group()) else m.group(), text)


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose the raw config (a plain dict) for Hydra-style overrides. Raises DistillError on bad input."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _refuse_secret_overrides(overrides)
    recipe_dir = _override_value(overrides, "recipe_dir")
    name = _override_value(overrides, "recipe") or "support_tickets"
    known = list_recipes(recipe_dir)
    if name not in known:
        raise DistillError(
            f"unknown recipe {name!r}{did_you_mean(name, known, 'recipe=')}; known recipes: "
            f"{', '.join(sorted(known)) or '(none)'} "
            f"(a recipe of your own is NAME.yaml + NAME/ in recipe_dir=DIR or ./recipes)")
    recipe_yaml = known[name]
    tmp: Path | None = None
    if recipe_yaml.parent != PACKAGE_RECIPES:
        check_recipe_yaml(recipe_yaml)
        tmp = Path(tempfile.mkdtemp(prefix="distill-recipes-"))
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "recipe"]
        overrides += [f"recipe={USER_RECIPE}", f"hydra.searchpath=[{_searchpath_dir(recipe_yaml, tmp)}]"]

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
            raw = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise DistillError(_hydra_message(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    raw["recipe"]["dir"] = str(recipe_yaml.parent / name)
    if raw["recipe"].get("name") != name:  # a copied recipe whose name: line was not updated
        raise DistillError(f"recipe file {recipe_yaml} says name: {raw['recipe'].get('name')!r}; set it to {name!r} "
                           f"(a recipe's name is its file name)")
    return raw


def check_recipe_yaml(path: Path) -> dict[str, Any]:
    """A user's recipe file parsed strictly (before Hydra reads it): one line naming the file and line when it is
    not UTF-8, not YAML, has a key twice, or is not a mapping of settings."""
    data = load_yaml(path, "recipe file")
    if not isinstance(data, dict):
        raise DistillError(f"recipe file {path} must be a mapping of settings (name:, inputs:, teacher_prompt:, "
                           f"output_schema: ...), not a {type(data).__name__}; see distill/conf/recipe/*.yaml")
    return data


def _hydra_message(exc: Exception, overrides: list[str]) -> str:
    text = _redact(" ".join(str(exc).split()), overrides)
    bad = getattr(exc, "override", None)
    if isinstance(bad, str) or "override_grammar" in text:  # an override Hydra's grammar cannot parse
        fix = ("quote a value that holds spaces, quotes, a newline or any of []{}(),=$ as key='value'; see "
               "https://hydra.cc/docs/advanced/override_grammar/basic/")
        if isinstance(bad, str):
            key, _, value = bad.partition("=")
            if _hides_value(key.lstrip("+~"), value):
                return f"cannot parse the override for {key.lstrip('+~')} (the value is not shown): {fix}"
            return f"cannot parse the override {bad!r}: {fix}"
        return f"cannot parse an override ({text.split(' See https://')[0]}): {fix}"
    key = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if key:
        return key_problem(key.group(1)) + " (`python -m distill config --resolved` prints every key)"
    if "Could not find" in text:
        text = text.split(" Config search path")[0].replace("In 'config': ", "")
        hint = ""
        if missing := re.search(r"Could not find '(\w+)/([^']+)'", text):
            group, option = missing.groups()
            hint = did_you_mean(option, group_options().get(group, []), f"{group}=")
        return f"{text}{hint} (list the options of every group with `python -m distill config`)"
    return f"bad configuration: {text}"



def group_options() -> dict[str, list[str]]:
    """Every option of every config group, for `python -m distill config` and the compose-everything test."""
    options = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in GROUPS}
    options["recipe"] = sorted(list_recipes())
    return options
