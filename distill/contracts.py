"""What the stages hand each other through the run directory, as typed models.

Stages never import one another; they read what an earlier stage wrote. These models are that contract:

    results = contracts.load_results(run_dir / "evaluate/results.json")   # validated, or a DistillError saying why
    contracts.write_results(out_dir / "results.json", results)             # written from the model
    contracts.write_schemas(publish_dir)                                   # results.schema.json, parity.schema.json

``results.json`` keys are only ever added (``schema_version`` 2): every model here accepts keys it does not name, so
an older reader keeps working on a newer file, while a file that lacks a named key, or holds the wrong type, is
refused with the key's path. The README's key table is tested against :class:`Results`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from distill import DistillError, runio

SCHEMA_VERSION = 2
RESULTS_SCHEMA = "results.schema.json"
PARITY_SCHEMA = "parity.schema.json"


class _Open(BaseModel):
    """Named keys are checked; keys added by a newer writer are kept."""

    model_config = ConfigDict(extra="allow")


class Interval(_Open):
    """A rate with its interval: a percentile bootstrap over items at ``eval.confidence_level``."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int | None = None


class Predictor(_Open):
    kind: Literal["in_process", "endpoint"]
    student: str | None = None
    decode: str | None = None
    base_url: str | None = None
    model: str | None = None


class Metrics(_Open):
    n: int
    n_gold: int = 0
    invalid_rate: float
    invalid: Interval
    agreement: dict[str, float | None]
    agreement_ci: dict[str, Interval]
    student_vs_gold: dict[str, float | None] = Field(default_factory=dict)
    teacher_vs_gold: dict[str, float | None] = Field(default_factory=dict)
    student_vs_gold_ci: dict[str, Interval] = Field(default_factory=dict)
    teacher_vs_gold_ci: dict[str, Interval] = Field(default_factory=dict)
    fields: dict[str, dict[str, Any]] = Field(default_factory=dict)
    invalid_by_reason: dict[str, int] = Field(default_factory=dict)
    failures: dict[str, int] = Field(default_factory=dict)


class Confusion(_Open):
    labels: list[str]
    matrix: list[list[int]]
    rows: str = "teacher"
    columns: str = "student"


class CurvePoint(_Open):
    threshold: float
    coverage: float
    agreement: float | None
    n: int


class Val(_Open):
    n: int
    agreement: float | None = None


class Reliability(_Open):
    bins: list[dict[str, Any]]
    ece: float | None
    n: int = 0


class Calibration(_Open):
    whole: Reliability
    fields: dict[str, Reliability] = Field(default_factory=dict)


class Throughput(_Open):
    """The throughput a cost case priced the student at, and what was timed: which artifact, in which runtime, at
    what concurrency, measured by which stage on which machine."""

    items_per_s: float | None
    measured_by: str
    artifact: str
    runtime: str
    concurrency: int | None = None
    where: str | None = None


class CostStudent(_Open):
    """The student's side of the cost case (every key optional: files written before a key was recorded lack it)."""

    name: str | None = None
    usd_per_hour: float | None = None
    items_per_s: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    throughput: Throughput | None = None


class Cost(_Open):
    teacher: dict[str, Any]
    student: CostStudent
    teacher_usd_per_1k: float | None
    teacher_cached_usd_per_1k: float | None = None
    teacher_batch_usd_per_1k: float | None = None
    student_usd_per_1k: float | None
    one_off: dict[str, Any]
    break_even_requests: dict[str, int | None]
    table: list[dict[str, Any]] = Field(default_factory=list)


class Speed(_Open):
    items: int
    wall_s: float
    items_per_s: float | None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    batch_size: int | None = None
    device: str | None = None


class Decontamination(_Open):
    n_checked: int = 0
    n_excluded: int = 0
    exact: int = 0
    near: int = 0
    threshold: float | None = None
    items: list[dict[str, Any]] = Field(default_factory=list)
    agreement_all_items: Interval | None = None


class GateCheck(_Open):
    name: str
    value: Any = None
    op: str
    threshold: Any = None
    passed: bool


class Gate(_Open):
    passed: bool
    reasons: list[str]
    checks: list[GateCheck] = Field(default_factory=list)
    baseline: dict[str, Any] | None = None
    thresholds: dict[str, Any] = Field(default_factory=dict)


class PerItem(_Open):
    id: str
    agree: bool
    valid: bool
    confidence: float | None = None
    contaminated: bool = False


class LadderRung(_Open):
    """One rung student=auto tried (train/ladder.json ``rungs``): measured on the val split when ``trained``."""

    rung: str
    kind: str
    trained: bool
    outcome: str
    val_agreement: Interval | None = None
    invalid_rate: float | None = None
    usd_per_1k: float | None = None
    items_per_s: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    train_s: float | None = None
    met_target: bool | None = None


class Ladder(_Open):
    """train/ladder.json, copied into results.json: the student ladder of student=auto and the rung it chose."""

    target_agreement: float
    chosen: str
    met_target: bool
    why: str
    rungs: list[LadderRung]
    decided_on: dict[str, Any] = Field(default_factory=dict)


class EmbeddingBaseline(_Open):
    """The embedding classifier fit on the student's train split, scored on the student's items (enum tasks)."""

    status: Literal["measured", "is_student", "off", "not_applicable"]
    reason: str | None = None
    model: str | None = None
    n: int | None = None
    agreement_ci: dict[str, Interval] = Field(default_factory=dict)
    vs_gold_ci: dict[str, Interval] = Field(default_factory=dict)
    student_minus_baseline: Interval | None = None
    items_per_s: float | None = None
    usd_per_1k: float | None = None


class Results(_Open):
    """``evaluate/results.json``: what evaluate measured; the gate, publish, explore and ``eval.baseline`` read it."""

    schema_version: int = SCHEMA_VERSION
    recipe: str
    split: str
    student: str
    teacher: str
    predictor: Predictor
    metrics: Metrics
    confusion: dict[str, Confusion] = Field(default_factory=dict)
    coverage_curve: list[CurvePoint] = Field(default_factory=list)
    val_coverage_curve: list[CurvePoint] = Field(default_factory=list)
    val: Val
    calibration: Calibration
    cost: Cost
    speed: Speed
    decontamination: Decontamination
    gate: Gate
    per_item: list[PerItem]
    generate: dict[str, Any] | None = None
    ladder: Ladder | None = None
    embedding_baseline: EmbeddingBaseline | None = None
    training: dict[str, Any] | None = None  # how the LM student's training ended (train's stopped_by, ...)


class ParityEntry(_Open):
    """One published artifact against its reference (parity.json, keyed by the artifact's path in publish/)."""

    n: int
    parity: float | None
    agreement_with_reference: float | None = None
    agreement_with_teacher: float | None = None
    invalid_rate: float | None = None
    failures: dict[str, int] = Field(default_factory=dict)
    latency_p50_s: float | None = None
    reference: str
    published: bool


class Parity(RootModel[dict[str, ParityEntry]]):
    """``publish/parity.json``."""


class StageDone(_Open):
    """A stage's ``DONE.json``: written last; a stage without it did not finish."""

    stage: Literal["generate", "train", "evaluate", "publish"]
    fingerprint: str
    summary: dict[str, Any]
    outputs: dict[str, str] = Field(default_factory=dict)


def _problems(exc: ValidationError) -> str:
    shown = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()[:5]]
    more = len(exc.errors()) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def validate_results(results: dict, where: str = "results.json") -> Results:
    try:
        return Results.model_validate(results)
    except ValidationError as exc:
        raise DistillError(f"{where} does not hold distill evaluate results: {_problems(exc)}") from None


def write_results(path: Path, results: dict | Results) -> Results:
    """Check ``results`` against the contract and write it (atomically); a writer bug fails here, not in a reader."""
    model = results if isinstance(results, Results) else validate_results(results, f"evaluate's results for {path}")
    runio.write_json(path, model.model_dump(mode="json"))
    return model


def load_results(path: Path) -> dict:
    """``results.json`` as a dict, validated against :class:`Results` (DistillError naming the bad key)."""
    raw = _read(path, "distill evaluate results")
    validate_results(raw, str(path))
    return raw


class _BaselineMetrics(_Open):
    agreement: dict[str, float | None]


class _BaselineItem(_Open):
    id: str
    agree: bool
    contaminated: bool = False


class Baseline(_Open):
    """What ``eval.baseline`` needs of an earlier results.json: its whole-answer agreement and the items it scored
    (McNemar pairs on their ids). Any results.json of schema version 1 or later holds these."""

    metrics: _BaselineMetrics
    per_item: list[_BaselineItem] = Field(default_factory=list)


def _read(path: Path, what: str) -> dict:
    path = Path(path)
    try:
        raw = runio.read_json(path)
    except FileNotFoundError:
        raise DistillError(f"{path} is missing; run `python -m distill evaluate run_dir=RUN` to write it") from None
    except (OSError, ValueError) as exc:
        raise DistillError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); re-run evaluate") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path} holds {type(raw).__name__}, not {what}; re-run evaluate")
    return raw


def load_baseline(path: Path) -> dict:
    """An earlier run's results.json for the gate's comparison, checked for the keys the comparison reads."""
    raw = _read(path, "distill evaluate results")
    try:
        Baseline.model_validate(raw)
    except ValidationError as exc:
        raise DistillError(f"{path} lacks what a baseline needs: {_problems(exc)}") from None
    if raw["metrics"]["agreement"].get("exact") is None:
        raise DistillError(f"{path} has no metrics.agreement.exact (the whole-answer agreement) to compare with")
    return raw


def write_parity(path: Path, parity: dict) -> None:
    try:
        model = Parity.model_validate(parity)
    except ValidationError as exc:
        raise DistillError(f"publish's parity for {path} breaks the contract: {_problems(exc)}") from None
    runio.write_json(path, model.model_dump(mode="json"))


def schemas() -> dict[str, dict]:
    return {RESULTS_SCHEMA: Results.model_json_schema(), PARITY_SCHEMA: Parity.model_json_schema()}


def write_schemas(directory: Path) -> list[Path]:
    """The JSON schemas of results.json and parity.json, published beside routing.schema.json."""
    written = []
    for name, schema in schemas().items():
        runio.atomic_write_text(Path(directory) / name, json.dumps(schema, indent=2) + "\n")
        written.append(Path(directory) / name)
    return written
