"""A recipe's task: its answer schema, its inputs and the prompts built from them.

The schema is declared once in the recipe. The teacher is constrained to it (in the dialect its server speaks),
every answer is validated against it locally, and the student is scored field by field against it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema

from distill import DistillError, runio
from distill.config import Config, read_text, utf8_problem

log = logging.getLogger("distill")


class OutputSchema:
    """The JSON schema of the task's answer, with parsing and validation that never raise on bad answers."""

    def __init__(self, schema: dict[str, Any]):
        jsonschema.Draft202012Validator.check_schema(schema)
        self.schema = schema
        self._validator = jsonschema.Draft202012Validator(schema)

    @property
    def fields(self) -> list[str]:
        return list(self.schema["properties"])

    @cached_property
    def enums(self) -> dict[str, list[Any]]:
        """Fields with a fixed set of values (classification fields), as the schema types them (``[1, 2, 3]`` stays
        integers; prompts and scoring use each value's ``value_text``)."""
        return {k: v["enum"] for k, v in self.schema["properties"].items() if "enum" in v}

    def enum_problem(self) -> str | None:
        """Why a fixed value set cannot be labelled, scored and compared (None when every one can)."""
        for name, values in self.enums.items():
            if not values:
                return f"output_schema field {name!r} has an empty enum; list its allowed values"
            if bad := [v for v in values if isinstance(v, (dict, list))]:
                return (f"output_schema field {name!r}: enum value {bad[0]!r} is not a string, number, boolean or "
                        f"null; use scalar values")
            texts = [value_text(v) for v in values]
            if dup := next((t for t in texts if texts.count(t) > 1), None):
                return (f"output_schema field {name!r}: enum values {[v for v in values if value_text(v) == dup]} "
                        f"read the same ({dup!r}); keep one")
        return None

    @cached_property
    def sha256(self) -> str:
        """Hash of the answer contract: part of every teacher request's ledger key."""
        return runio.sha256_obj(self.schema)

    def errors(self, obj: Any) -> list[str]:
        return [e.message for e in self._validator.iter_errors(obj)]

    def parse(self, text: str | None) -> tuple[dict | None, str | None]:
        """Parse a model's text answer. Returns (object, None) or (None, reason) with reason in
        {"empty", "invalid_json", "schema_violation"}."""
        if text is None or not text.strip():
            return None, "empty"
        candidate = text.strip()
        # Models sometimes wrap JSON in a code fence or trail text after it: take the first {...} block.
        match = re.search(r"\{.*\}", candidate, flags=re.S)
        if match:
            candidate = match.group(0)
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            return None, "invalid_json"
        if self.errors(obj):
            return None, "schema_violation"
        return obj, None

    def response_format(self, dialect: str, name: str = "answer") -> dict | None:
        """``response_format`` for a chat-completions request in the server's structured-output dialect."""
        if dialect == "json_schema":  # OpenAI, vLLM
            return {"type": "json_schema", "json_schema": {"name": name, "schema": self.schema, "strict": True}}
        if dialect == "llama_cpp":  # llama-cpp-python's server rejects json_schema, accepts this
            return {"type": "json_object", "schema": self.schema}
        if dialect in ("guided_json", "none"):
            return None
        raise DistillError(f"unknown structured_output dialect {dialect!r}; use json_schema, llama_cpp, "
                           f"guided_json or none")

    def extra_body(self, dialect: str) -> dict | None:
        return {"guided_json": self.schema} if dialect == "guided_json" else None


def value_text(value: Any) -> str:
    """An enum value as the teacher writes it: a string as is, anything else as JSON (``1``, ``true``, ``null``)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def dump_answer(obj: dict) -> str:
    """The canonical text of an answer: what the student is trained to write."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def answer_head(answer: dict, field: str) -> str:
    """The canonical answer text up to the value of ``field``: ``{"a": "x", "field": `` (scored decoding fills the
    fields in schema order after this head, in evaluate and in the gateway alike)."""
    head = dump_answer(answer)[:-1] + ", " if answer else "{"
    return head + json.dumps(field, ensure_ascii=False) + ": "


def literal_options(schema: "OutputSchema", field: str) -> list[str]:
    """JSON literals scored for a free field (``true``/``false``/``null`` as its type allows, ``"`` = a string):
    scoring decides the JSON type, and only a string's content is generated."""
    kind = schema.schema["properties"].get(field, {}).get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    options = (["true", "false"] if "boolean" in kinds else []) + (["null"] if "null" in kinds else [])
    if "string" in kinds and options:
        options.append('"')
    elif "string" in kinds:
        return ['"']  # only a string: no choice to score, just open it
    return options


def common_prefix(a: list, b: list) -> int:
    """Length of the common prefix of two token id lists (where a candidate's own tokens start)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Example:
    id: str
    text: str
    gold: dict | None = None
    trusted: dict | None = None  # a label supplied with the input: used as is, the teacher is not asked
    split: str | None = None     # a split fixed by the input file (recipe.split_field); else assigned by hash


@dataclass
class InputReport:
    examples: list[Example] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    bad_gold: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped input %s: %s", where, reason)


class Task:
    """Everything recipe-specific the stages need."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.recipe = cfg.recipe
        try:
            self.schema = OutputSchema(cfg.recipe.output_schema)
        except jsonschema.SchemaError as exc:
            raise DistillError(f"recipe {cfg.recipe.name!r}: output_schema is not a valid JSON schema: "
                               f"{exc.message}") from None
        if problem := self.schema.enum_problem():
            raise DistillError(f"recipe {cfg.recipe.name!r}: {problem}")
        self.teacher_system = self._read("teacher_prompt").strip()
        self.student_system = self._read("student_prompt").strip()
        self.few_shot = self._load_few_shot()

    def _read(self, key: str) -> str:
        path = self.cfg.recipe_file(key)
        if not path.exists():
            raise DistillError(f"recipe {self.recipe.name!r}: {key} file {path} does not exist")
        return read_text(path)

    def _load_few_shot(self) -> list[tuple[str, dict]]:
        if not self.recipe.few_shot:
            return []
        path = self.cfg.recipe_file("few_shot")
        if not path.exists():
            raise DistillError(f"recipe {self.recipe.name!r}: few_shot file {path} does not exist")
        shots = []
        for no, obj, err in runio.iter_jsonl_lenient(path):
            if err or "text" not in obj or "label" not in obj:
                raise DistillError(f"{path}:{no}: a few-shot line needs JSON with 'text' and 'label'")
            if problems := self.schema.errors(obj["label"]):
                raise DistillError(f"{path}:{no}: few-shot label breaks the output schema: {problems[0]}")
            shots.append((obj["text"], obj["label"]))
        return shots

    def load_inputs(self, limit: int | None = None) -> InputReport:
        """Read the recipe's inputs (JSONL, CSV, Parquet, or a ``datasets`` folder saved with ``save_to_disk``).

        Bad rows are skipped and counted; the run goes on. A row carrying a valid trusted label in
        ``recipe.label_field`` keeps it and never goes to the teacher.
        """
        report = InputReport()
        path = self.cfg.recipe_file("inputs")
        if not path.exists():
            raise DistillError(f"input file {path} does not exist (recipe {self.recipe.name!r}, key recipe.inputs)")
        seen: set[str] = set()
        r = self.recipe
        for no, obj, err in iter_records(path):
            where = f"{path.name}:{no}"
            if err:
                report.skip(err, where)
                continue
            text = obj.get(r.text_field)
            if not isinstance(text, str) or not text.strip():
                report.skip(f"no text in field {r.text_field!r}", where)
                continue
            ex_id = str(obj.get(r.id_field) if obj.get(r.id_field) is not None else f"line{no}")
            if ex_id in seen:
                report.skip("duplicate id", where)
                continue
            gold = _maybe_json(obj.get(r.gold_field)) if r.gold_field else None
            if gold is not None and self.schema.errors(gold):
                log.warning("input %s: gold label breaks the output schema; kept without gold", where)
                report.bad_gold += 1
                gold = None
            trusted = _maybe_json(obj.get(r.label_field)) if r.label_field else None
            if trusted is not None and self.schema.errors(trusted):
                report.skip(f"trusted label in {r.label_field!r} breaks the output schema", where)
                continue
            split = obj.get(r.split_field) if r.split_field else None
            if split is not None and split not in ("train", "val", "test"):
                report.skip(f"{r.split_field}={split!r} is not train, val or test", where)
                continue
            seen.add(ex_id)
            report.examples.append(Example(ex_id, text, gold, trusted, split))
        if not report.examples:
            raise DistillError(f"no usable inputs in {path} (skipped: {report.skipped or 'file is empty'})")
        if limit is not None:
            report.examples = report.examples[:limit]
        return report

    def teacher_messages(self, text: str, shots: list[tuple[str, dict]] | None = None) -> list[dict]:
        """Instructions, then the few-shot turns, then the input: static text first so servers reuse the prefix.

        ``shots`` replaces the recipe's fixed few-shot set (``generate.few_shot=nearest`` picks them per input).
        """
        messages = [{"role": "system", "content": self.teacher_system}]
        for shot_text, label in self.few_shot if shots is None else shots:
            messages.append({"role": "user", "content": shot_text})
            messages.append({"role": "assistant", "content": dump_answer(label)})
        messages.append({"role": "user", "content": text})
        return messages

    def student_messages(self, text: str) -> list[dict]:
        return [{"role": "system", "content": self.student_system}, {"role": "user", "content": text}]


def _maybe_json(value: Any) -> Any:
    """Label columns in CSV / Parquet often hold the JSON object as text."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if value is not None and not isinstance(value, dict):
        try:  # pandas / pyarrow NaN for a missing cell
            if value != value:
                return None
        except Exception:
            pass
    return value


def iter_records(path: Path):
    """(row number, record, error) for every row of a JSONL, CSV or Parquet file or a ``datasets`` folder."""
    suffix = path.suffix.lower()
    if path.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk

            data = load_from_disk(str(path))
        except Exception as exc:
            raise DistillError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk "
                               f"({type(exc).__name__}); point recipe.inputs at a JSONL, CSV or Parquet file") from None
        if isinstance(data, DatasetDict):
            splits = list(data.keys())
            raise DistillError(f"{path} holds a DatasetDict with splits {splits}; save one split "
                               f"(dataset['{splits[0]}'].save_to_disk(...)) and point recipe.inputs at it")
        for no, row in enumerate(data, 1):
            yield no, dict(row), None
        return
    if suffix in (".csv", ".tsv"):
        import csv

        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM must not rename the first column
            try:
                for no, row in enumerate(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","), 2):
                    yield no, {k: (v if v != "" else None) for k, v in row.items()}, None
            except UnicodeDecodeError:
                raise DistillError(utf8_problem(path)) from None
            except csv.Error as exc:
                raise DistillError(f"{path}: not a readable {suffix[1:].upper()} file ({exc}); check its quoting "
                                   f"or convert it to JSONL") from None
        return
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for no, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield no, row, None
        return
    yield from runio.iter_jsonl_lenient(path)


def load_split(run_dir: Path, split: str) -> list[dict]:
    from distill import paths

    return runio.read_jsonl(paths.split_path(run_dir, split))
