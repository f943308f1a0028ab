"""The ``serve`` group's models: ``python -m distill serve`` and its store, caches, traffic log and drift alarms."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from distill.config.base import Strict as _Strict
from distill.config.inputs import EnvName


class ExactCacheConfig(_Strict):
    """``serve.exact_cache``: answers keyed on the whole request fingerprint (distill/serve/cache.py)."""

    enabled: bool = False
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
    """``serve.drift``: alarms on the shadow agreement (ADWIN), the student's answer distribution (chi-square)
    and the inputs' distance to the training set (Kolmogorov-Smirnov, opt-in)."""

    margin: float = Field(0.05, ge=0, lt=1)     # alarm when live agreement is below the rule's target by this much
    delta: float = Field(0.002, gt=0, lt=1)     # ADWIN's confidence parameter (smaller: fewer, later cuts)
    confidence: float = Field(0.99, gt=0.5, lt=1)  # level of the bound the alarm and its clearing test
    min_samples: int = Field(30, ge=5)          # shadow comparisons in ADWIN's window before it can alarm
    answer_window: int = Field(500, ge=20)      # student answers per chi-square test against the val split
    answer_p_value: float = Field(1e-4, gt=0, lt=1)  # chi-square alarm level (per field, Bonferroni-corrected)
    min_val_items: int = Field(20, ge=1)        # fewer val items: no answer-distribution test (the log says so)
    inputs: bool = False                        # input drift: each input's MiniLM distance to the training set
    # (loads the packaged MiniLM into the gateway; embedded in a thread, never on the request path)
    input_window: int = Field(200, ge=10)       # inputs per Kolmogorov-Smirnov test against the val split's
    input_p_value: float = Field(1e-4, gt=0, lt=1)  # KS alarm level (one-sided: inputs farther from training)


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
    # the longest Retry-After a fallback waits out while its client waits (generate's teacher.max_wait_s is 600 s);
    # a teacher asking for more: the client gets 503 with that Retry-After at once (or the student's answer with
    # on_teacher_down=student)
    teacher_max_wait_s: float = Field(5.0, ge=0)
    on_teacher_down: Literal["error", "student"] = "error"
    teacher_budget_usd_per_day: float | None = Field(None, ge=0)  # the gateway's teacher spend per UTC day (every
    # replica on the store); spent: 503 (or the student's answer with on_teacher_down=student); null: no cap
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
    watch_interval_s: float | None = Field(2.0, gt=0)  # poll publish/DONE.json + routing.yaml; a republish
    # reloads the gateway (distill/serve/reload.py); null: reload only by POST /admin/reload
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
