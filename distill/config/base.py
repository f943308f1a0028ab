"""The base of every config model, and the speed-only marker.

A field marked ``Field(..., json_schema_extra=SPEED_ONLY)`` changes how fast a stage runs, never what it writes
(concurrency, timeouts, threads, where copies of a report go): the pipeline's fingerprints and train's resume key
leave such fields out, so turning them never invalidates finished work.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

SPEED_ONLY = {"speed_only": True}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def is_speed_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("speed_only"))


def speed_only_fields(model: type[BaseModel]) -> set[str]:
    """Names of the model's own fields marked speed-only."""
    return {name for name, field in model.model_fields.items() if is_speed_only(field)}


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (``X`` or ``X | None``), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def without_speed_only(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dump of ``model``) without its speed-only fields, at every depth."""
    out = {}
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is not None and is_speed_only(field):
            continue
        sub = model_of(field.annotation) if field is not None else None
        out[key] = without_speed_only(sub, value) if sub is not None and isinstance(value, dict) else value
    return out


def key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of ``model`` (``train.max_steps``, ``eval.gate.min_agreement``, ...)."""
    out = []
    for name, field in model.model_fields.items():
        sub = model_of(field.annotation)
        out.append(prefix + name)
        if sub is not None:
            out += key_paths(sub, f"{prefix}{name}.")
    return out
