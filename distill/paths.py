"""Names of everything in a run directory. Every module imports these; nobody spells a file name twice.

<run_dir>/
  config.yaml                      resolved config of the last invocation (no secrets: only env-var *names*)
  overrides.yaml                   the command line's overrides that composed it; a later command on the run
                                   starts from them (its own overrides win key by key)
  generate/DONE.json  generate/data/{train,val,test}.jsonl  generate/ledger.sqlite  generate/rejected.jsonl
  train/DONE.json     train/adapter/   train/checkpoints/   train/metrics.jsonl
                      train/head/{head.safetensors, head.json}   (student=embed_classifier instead of adapter/)
                      train/ladder.json   (student=auto: the rungs tried and the one chosen)
  evaluate/DONE.json  evaluate/results.json  evaluate/report.md  evaluate/predictions.jsonl
                      evaluate/{junit.xml, summary.md, coverage.png, cost.png, confusion_<field>.png}
  publish/DONE.json   publish/routing.yaml  publish/routing.schema.json  publish/litellm.yaml  publish/Modelfile
                      publish/SERVING.md  publish/parity.json  publish/MODEL_CARD.md  publish/model/{hf,nf4,*.gguf}
                      publish/model/{encoder,head}/   (student=embed_classifier)
  serve/student_runtime.log  serve/teacher_server.log   (python -m distill serve)
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("generate", "train", "evaluate", "publish")

CONFIG_YAML = "config.yaml"
OVERRIDES_YAML = "overrides.yaml"  # the command-line overrides that made the run, the next command's base
DONE = "DONE.json"

# generate
DATA_DIR = "data"
SPLITS = ("train", "val", "test")
LEDGER = "ledger.sqlite"
REJECTED = "rejected.jsonl"
QA = "qa.json"                   # PII redaction counts, removed duplicates, label distribution

# train
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_METRICS = "metrics.jsonl"
HEAD_DIR = "head"                # student=embed_classifier: its linear heads (the encoder stays frozen, not copied)
HEAD_WEIGHTS = "head.safetensors"  # "<field>.weight" [classes x dim], "<field>.bias" [classes], float32
HEAD_META = "head.json"          # label order per field, encoder name and sha256, pooling; never pickle
LADDER = "ladder.json"           # student=auto: every rung tried, its val agreement, cost and why the ladder stopped

# evaluate
RESULTS = "results.json"
REPORT = "report.md"
PREDICTIONS = "predictions.jsonl"
JUNIT_XML = "junit.xml"          # the gate as JUnit test cases, for CI job pages
SUMMARY_MD = "summary.md"        # the gate as a short Markdown block ($GITHUB_STEP_SUMMARY)
COVERAGE_PNG = "coverage.png"
COST_PNG = "cost.png"

# publish
ROUTING = "routing.yaml"
ROUTING_SCHEMA = "routing.schema.json"
LITELLM = "litellm.yaml"
MODELFILE = "Modelfile"
SERVING = "SERVING.md"
GRAFANA = "grafana.json"        # a Grafana dashboard over the gateway's /metrics
PARITY = "parity.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
ENCODER_DIR = "encoder"          # publish/model/encoder: the embedding classifier's encoder (safetensors)
HF_DIR = "hf"
NF4_DIR = "nf4"

# serve (python -m distill serve): logs of the child servers it starts
SERVE_DIR = "serve"
STUDENT_RUNTIME_LOG = "student_runtime.log"


def confusion_png(field: str) -> str:
    """``evaluate/confusion_<field>.png``: student vs teacher for one field with a fixed set of values."""
    return f"confusion_{field}.png"


def stage_dir(run_dir: Path, stage: str) -> Path:
    """The folder of one stage inside a run directory."""
    return Path(run_dir) / stage


def split_path(run_dir: Path, split: str) -> Path:
    """``generate/data/<split>.jsonl``."""
    return stage_dir(run_dir, "generate") / DATA_DIR / f"{split}.jsonl"


def ledger_path(run_dir: Path, shared: str | Path | None = None) -> Path:
    """The teacher ledger a run uses: ``shared`` (``generate.shared_ledger``) when set, else
    ``generate/ledger.sqlite``. The one place this rule is written: generate, evaluate, serve, the ``ledger``
    command and the notebooks all ask here."""
    return Path(shared).expanduser() if shared else stage_dir(run_dir, "generate") / LEDGER


def adapter_path(run_dir: Path) -> Path:
    return stage_dir(run_dir, "train") / ADAPTER_DIR


def head_path(run_dir: Path) -> Path:
    """``train/head/``: the embedding classifier's heads."""
    return stage_dir(run_dir, "train") / HEAD_DIR
