"""The routing rule: which requests a gateway sends to the distilled student, and when it falls back to the teacher.

    from distill.routing import load_rule, decide
    rule = load_rule("runs/x/publish/routing.yaml")
    decision = decide(rule, {"metadata": {"distill_task": "support_tickets"}}, answer, confidence)
    decision.use_student   # False -> send the request to rule.fallback (the teacher)

publish writes ``routing.yaml`` (schema version 2, below) and its JSON schema ``routing.schema.json``; version 1
files (no ``prompt`` section) still load. The
confidence threshold is chosen on a validation coverage/agreement curve: the threshold with the most coverage whose
agreement with the teacher meets ``publish.target_agreement``; when none does, the route is disabled and every
request goes to the teacher. The curve is the served artifact's (``evidence.artifact``: the GGUF the gateway serves,
scored by the gateway's own code), or evaluate's in-process one (``evidence.artifact`` null: the embedding
classifier, which the gateway runs with the same code, or a publish that did not load its artifacts).

``decide`` fails safe: anything it cannot trust sends the request to the teacher, with the reason why
(``Decision.reason``): ``not_this_task``, ``route_disabled``, ``invalid_answer`` (an answer evaluate would not
have accepted either: it is parsed with the same ``OutputSchema.parse``), ``no_confidence``, ``bad_confidence``
(not a finite number in [0, 1]) or ``below_threshold``; only ``confident`` keeps the student's answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from distill import DistillError, RoutingRuleError
from distill.config import EnvName
from distill.task import OutputSchema

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 2 added ``prompt``: the prompt contract a server of the student must keep


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Strict):
    """How a gateway recognises a request of this task: a metadata tag, or a model name the client asks for."""

    metadata: dict[str, str] = Field(default_factory=dict, description="request metadata that marks the task")
    model_aliases: list[str] = Field(default_factory=list, description="client-facing model names of the task")

    @model_validator(mode="after")
    def _something_to_match(self) -> "Match":
        if not self.metadata and not self.model_aliases:
            raise ValueError("give at least one metadata tag or model alias, or no request can match the task")
        return self


class TaskSpec(_Strict):
    id: str = Field(min_length=1, description="the recipe name")
    description: str = ""
    match: Match
    output_schema: dict[str, Any] = Field(description="JSON schema of a valid answer (type: object, with properties)")
    _answer_schema: OutputSchema = PrivateAttr()

    @field_validator("output_schema")
    @classmethod
    def _a_valid_object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        # The recipe's own checks (config.RecipeConfig, task.Task): a rule that passed them at publish passes here.
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise ValueError("not a valid JSON schema" + (f" at {where}" if where else "") + ": "
                             + re.sub(r"\s+", " ", exc.message)) from None
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
            raise ValueError("must be a JSON schema with type: object and properties")
        return schema

    def model_post_init(self, context: Any) -> None:
        self._answer_schema = OutputSchema(self.output_schema)  # built once: decide runs per request

    @property
    def answer_schema(self) -> OutputSchema:
        """The output schema as evaluate applies it: ``parse`` for raw text, ``errors`` for a parsed answer."""
        return self._answer_schema


class StudentSpec(_Strict):
    model: str = Field(min_length=1, description="model name the student is served under")
    kind: Literal["causal_lm", "embed_classifier"] = Field(
        "causal_lm", description="causal_lm: a generating model served over the OpenAI protocol; embed_classifier: "
                                 "loaded in process from its artifacts (distill.student.embed_classifier), no "
                                 "stop strings or token limit")
    endpoint: str = Field(min_length=1, description="OpenAI-compatible base URL of the student")
    artifacts: dict[str, str] = Field(description="artifact name -> path relative to the publish folder")
    # validate_default: an omitted stop / max_tokens is checked too (a causal_lm must have them)
    stop: list[str] = Field(default_factory=list, validate_default=True,
                            description="end-of-turn strings the server must stop at (at least one for a causal_lm)")
    max_tokens: int | None = Field(None, ge=1, validate_default=True,
                                   description="answer token limit (required for a causal_lm)")
    temperature: float = Field(0.0, ge=0)

    @field_validator("stop", "max_tokens")
    @classmethod
    def _generating_student_needs_it(cls, value: Any, info: ValidationInfo) -> Any:
        # `kind` is declared before these fields, so it is validated first and present in info.data.
        if info.data.get("kind", "causal_lm") == "causal_lm" and not value:
            what = {"stop": "at least one end-of-turn string", "max_tokens": "an answer token limit"}[info.field_name]
            raise ValueError(f"a causal_lm student needs {what}")
        return value


class FallbackSpec(_Strict):
    model: str = Field(min_length=1, description="the teacher model requests fall back to")
    endpoint: str | None = Field(None, description="its base URL (null: the gateway's default for the model)")
    api_key_env: EnvName = Field(None, description="NAME of the environment variable holding its key")


class PromptSpec(_Strict):
    """The prompt contract: what the student was trained on and what a client sends (schema version 2)."""

    system: str = Field(description="the system prompt the student was trained with; a server of the student must "
                                    "send it (without it a chat template may inject a default system message)")
    user: Literal["input"] = Field("input", description="the user message is the task input, verbatim")
    teacher_few_shot: int = Field(ge=0, description="few-shot turns in the teacher's prompt (the recipe's, as "
                                                    "generate labelled): a fallback gets that prompt, not the "
                                                    "student's")
    response_format: dict[str, Any] = Field(description="chat-completions response_format constraining an answer "
                                                        "to task.output_schema")
    example_request: dict[str, Any] = Field(description="a task request as a client sends it to the gateway")


class RouteSpec(_Strict):
    enabled: bool
    confidence_threshold: float | None = Field(None, ge=0, le=1,
                                               description="keep the student's answer when confidence >= this")
    target_agreement: float = Field(ge=0, le=1)
    expected_coverage: float | None = Field(None, ge=0, le=1, description="share of requests the student keeps")
    expected_agreement: float | None = Field(None, ge=0, le=1, description="agreement on the kept share")
    on_invalid_answer: Literal["fallback"] = "fallback"
    reason: str = Field(min_length=1, description="why the route is enabled or disabled")

    @model_validator(mode="after")
    def _enabled_needs_threshold(self) -> "RouteSpec":
        if self.enabled and (self.confidence_threshold is None or self.expected_coverage is None):
            raise ValueError("an enabled route needs confidence_threshold and expected_coverage")
        return self


class CostSpec(_Strict):
    teacher_usd_per_1k: float | None = Field(None, ge=0)
    student_usd_per_1k: float | None = Field(None, ge=0)
    blended_usd_per_1k: float | None = Field(None, ge=0,
                                             description="student on every request + teacher on the fallbacks")
    saving_vs_teacher: float | None = Field(None, le=1, description="1 - blended / teacher")


class CurvePoint(_Strict):
    threshold: float = Field(ge=0, le=1)
    coverage: float = Field(ge=0, le=1)
    agreement: float | None = Field(None, ge=0, le=1)
    n: int = Field(ge=0)


class Evidence(_Strict):
    results_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of evaluate/results.json")
    curve: str = Field(description="the curve the threshold was chosen on: results.json's val_coverage_curve "
                                   "(evaluate's in-process student) or the served artifact's in parity.json")
    artifact: str | None = Field(None, description="the published artifact (path in publish/) whose confidence, "
                                                   "computed by the gateway's scoring code, the curve and the test "
                                                   "figures hold; null: evaluate's in-process student")
    n_val: int | None = Field(None, ge=0, description="validation items behind the curve")
    test_coverage: float | None = Field(None, ge=0, le=1, description="coverage at the threshold on the test split")
    test_agreement: float | None = Field(None, ge=0, le=1, description="agreement at the threshold on the test split")


class RoutingRule(_Strict):
    """Schema of ``publish/routing.yaml``."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    task: TaskSpec
    student: StudentSpec
    fallback: FallbackSpec
    route: RouteSpec
    cost: CostSpec
    evidence: Evidence
    prompt: PromptSpec | None = Field(None, description="the prompt contract (schema version 2; absent in 1)")

    def answer_errors(self, answer: Any) -> list[str]:
        """Why a parsed answer breaks the task's output schema ([] when it is valid)."""
        return self.task.answer_schema.errors(answer)

    def parse_answer(self, answer: Any) -> dict | None:
        """The student's answer as evaluate would have scored it, or None when evaluate would have rejected it.

        Args:
            answer: raw text (parsed by ``OutputSchema.parse``, as evaluate does: a code fence or text around the
                JSON is accepted), an already parsed answer, or None.
        Returns:
            The schema-valid answer (a dict), or None.
        """
        if answer is None:
            return None
        if isinstance(answer, str):
            return self.task.answer_schema.parse(answer)[0]
        return None if self.answer_errors(answer) else answer


def json_schema() -> dict[str, Any]:
    """The JSON schema of routing.yaml (published beside it as routing.schema.json)."""
    schema = RoutingRule.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"distill routing rule, schema version {SCHEMA_VERSION}"
    return schema


def validate_rule(data: Any, source: str = "routing rule") -> RoutingRule:
    """A RoutingRule from parsed YAML/JSON; raises RoutingRuleError naming every bad field at once.

    Besides the fields' types and ranges, ``task.output_schema`` must be a valid JSON schema (draft 2020-12) of an
    object with properties, so a bad schema fails here and not on every later ``decide``.
    """
    if not isinstance(data, dict):
        raise RoutingRuleError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    version = data.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise RoutingRuleError(f"{source}: schema_version {version!r} is not supported (this distill reads "
                               f"versions {', '.join(map(str, SUPPORTED_VERSIONS))}); re-run `python -m distill "
                               f"publish`")
    if version == 1 and data.get("prompt") is not None:  # a null prompt is what a version 1 rule dumps
        raise RoutingRuleError(f"{source}: 'prompt' is a schema_version 2 key; set schema_version: 2")
    try:
        return RoutingRule.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "rule"
            problems.append(f"{where}: {err['msg']}")
        raise RoutingRuleError(f"{source} is invalid: " + "; ".join(problems)) from None


def load_rule(path: str | Path) -> RoutingRule:
    """Load and validate a routing.yaml (see validate_rule). Raises RoutingRuleError with the file and the bad
    fields, ``task.output_schema`` among them."""
    path = Path(path)
    if not path.is_file():
        raise RoutingRuleError(f"routing file {path} does not exist (publish writes publish/routing.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RoutingRuleError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return validate_rule(data, str(path))


# ---------------------------------------------------------------------------------------------------------------
# choosing the threshold


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    coverage: float
    agreement: float
    n: int


def choose_threshold(curve: list[dict], target: float, min_items: int = 1) -> ThresholdChoice | None:
    """The confidence threshold with the most coverage whose agreement meets ``target``.

    Args:
        curve: points ``{"threshold", "coverage", "agreement", "n"}`` (evaluate's val_coverage_curve).
        target: the agreement the kept share must reach (publish.target_agreement).
        min_items: points resting on fewer kept items than this are not trusted.
    Returns:
        The choice, or None when no point qualifies (route the task to the teacher). Among points of equal
        coverage the highest threshold wins: the same measured items, the more careful rule.
    Raises:
        DistillError: a malformed curve point.
    """
    points = []
    for i, raw in enumerate(curve):
        try:
            points.append(CurvePoint.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DistillError(f"coverage curve point {i} is malformed ({'.'.join(map(str, first['loc']))}: "
                               f"{first['msg']}); re-run evaluate") from None
    eligible = [p for p in points if p.n >= max(1, min_items) and p.agreement is not None and p.agreement >= target]
    if not eligible:
        return None
    best = max(eligible, key=lambda p: (p.coverage, p.threshold))
    return ThresholdChoice(best.threshold, best.coverage, best.agreement, best.n)


def point_at(curve: list[dict], threshold: float) -> dict | None:
    """The point of a curve that applies a threshold: what a gateway keeps at confidence >= ``threshold``.

    A coverage curve lists every distinct confidence (evaluate's ``coverage_curve``, to 4 decimals), so the items
    kept at a threshold between two listed ones are those kept at the upper one: the lowest listed threshold not
    below it (not the highest one under it, which also counts the items just below the threshold, sent to the
    teacher). Above every listed threshold nothing is kept: coverage 0. None for an empty curve."""
    if not curve:
        return None
    above = [p for p in curve if p["threshold"] >= threshold - 1e-12]
    if not above:
        return {"threshold": threshold, "coverage": 0.0, "agreement": None, "n": 0}
    return min(above, key=lambda p: p["threshold"])


def blended_cost(coverage: float | None, teacher_per_1k: float | None,
                 student_per_1k: float | None) -> tuple[float | None, float | None]:
    """(blended USD per 1,000 requests, saving vs the teacher alone).

    The student answers every request of the task first; the teacher is paid again for the share it falls back on.
    With no route (coverage None) every request goes to the teacher alone.
    """
    if teacher_per_1k is None:
        return None, None
    if coverage is None:
        return teacher_per_1k, 0.0
    if student_per_1k is None:
        return None, None
    blended = student_per_1k + (1.0 - coverage) * teacher_per_1k
    saving = 1.0 - blended / teacher_per_1k if teacher_per_1k > 0 else None
    return round(blended, 6), (round(saving, 4) if saving is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# the decision a gateway makes per request


@dataclass(frozen=True)
class Decision:
    use_student: bool
    reason: Literal["confident", "not_this_task", "route_disabled", "invalid_answer", "no_confidence",
                    "bad_confidence", "below_threshold"]

    @property
    def target(self) -> str:
        return "student" if self.use_student else "teacher"


def matches(rule: RoutingRule, request: Any) -> bool:
    """Whether a request belongs to the rule's task: its metadata carries every tag, or it names a task alias.

    Never raises: a request that is not a dict matches nothing, and metadata that is not a dict counts as none.
    """
    if not isinstance(request, dict):
        return False
    match = rule.task.match
    metadata = request.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    if match.metadata and all(str(metadata.get(k)) == v for k, v in match.metadata.items()):
        return True
    return bool(match.model_aliases) and request.get("model") in match.model_aliases


def _is_probability(value: Any) -> bool:
    # numbers.Real takes numpy floats and ints; bool is an int but no confidence. NaN and +-inf fail the range.
    return isinstance(value, Real) and not isinstance(value, bool) and 0 <= value <= 1


def decide(rule: RoutingRule, request: Any, answer: Any, confidence: Any, *, checked: bool = False) -> Decision:
    """Keep the student's answer or fall back to the teacher. Fails safe: never raises on a bad request, answer
    or confidence; whatever it cannot trust falls back, with the reason.

    Args:
        rule: a validated routing rule (load_rule).
        request: the client's request, at least ``{"metadata": {...}}`` or ``{"model": ...}``; anything else
            (not a dict) is ``not_this_task``.
        answer: the student's answer, parsed (dict) or raw text; None when it produced nothing usable. Text is
            parsed exactly as evaluate parses it (``OutputSchema.parse``), so live coverage matches the measured one.
        confidence: the student's confidence in its whole answer, a finite real number in [0, 1] (numpy floats
            included); None when unknown. Anything else (NaN, inf, out of range, bool, str, ...) is
            ``bad_confidence``.
        checked: the caller already validated ``answer`` against this rule's schema (the gateway's student client
            does, and hands over None for an answer it rejects): a dict is then not validated a second time.
    Returns:
        Decision(use_student, reason), checked in this order: ``not_this_task``, ``route_disabled``,
        ``invalid_answer``, ``no_confidence``, ``bad_confidence``, ``below_threshold``, else ``confident``. Only a
        matching request on an enabled route with a schema-valid answer whose confidence reaches the threshold
        keeps the student's answer.
    """
    if not matches(rule, request):
        return Decision(False, "not_this_task")
    if not rule.route.enabled:
        return Decision(False, "route_disabled")
    if not (checked and isinstance(answer, dict)) and rule.parse_answer(answer) is None:
        return Decision(False, "invalid_answer")
    if confidence is None:
        return Decision(False, "no_confidence")
    if not _is_probability(confidence):
        return Decision(False, "bad_confidence")
    if confidence < rule.route.confidence_threshold:
        return Decision(False, "below_threshold")
    return Decision(True, "confident")
