"""Names of everything in a run directory. Every module imports these; nobody spells a file name twice.

<run_dir>/
  config.yaml                      resolved config of the last invocation (no secrets: only env-var *names*)
  generate/DONE.json  generate/data/{train,val,test}.jsonl  generate/ledger.sqlite  generate/rejected.jsonl
  train/DONE.json     train/adapter/   train/checkpoints/   train/metrics.jsonl
  evaluate/DONE.json  evaluate/results.json  evaluate/report.md  evaluate/predictions.jsonl
  publish/DONE.json   publish/routing.yaml  publish/MODEL_CARD.md  publish/model/
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("generate", "train", "evaluate", "publish")

CONFIG_YAML = "config.yaml"
DONE = "DONE.json"

# generate
DATA_DIR = "data"
SPLITS = ("train", "val", "test")
LEDGER = "ledger.sqlite"
REJECTED = "rejected.jsonl"

# train
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_METRICS = "metrics.jsonl"

# evaluate
RESULTS = "results.json"
REPORT = "report.md"
PREDICTIONS = "predictions.jsonl"

# publish
ROUTING = "routing.yaml"
MODEL_CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
HF_DIR = "hf"


def stage_dir(run_dir: Path, stage: str) -> Path:
    """The folder of one stage inside a run directory."""
    return Path(run_dir) / stage


def split_path(run_dir: Path, split: str) -> Path:
    """``generate/data/<split>.jsonl``."""
    return stage_dir(run_dir, "generate") / DATA_DIR / f"{split}.jsonl"


def ledger_path(run_dir: Path) -> Path:
    return stage_dir(run_dir, "generate") / LEDGER


def adapter_path(run_dir: Path) -> Path:
    return stage_dir(run_dir, "train") / ADAPTER_DIR
