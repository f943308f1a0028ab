"""Each benchmarks/ command at a tiny size: it still runs and prints its table (nothing is recorded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.benchmark


def run(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--no-record"],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_teacher_throughput_tiny():
    out = run("teacher_throughput.py", "--requests", "60", "--concurrency", "8", "--latency", "0.01", "--runs", "1")
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert rows["distill"][6].strip() == "60" and rows["rerun"][6].strip() == "0"  # paid calls


@pytest.mark.e2e
@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "bitext_customer_support").is_dir(),
                    reason="the Bitext sample is read from ../shared/data, which this checkout does not have")
def test_teacher_quality_tiny():
    out = run("teacher_quality.py", "--items", "3", "--options", "fixed")
    assert "| fixed |" in out


@pytest.mark.e2e
def test_end_to_end_tiny():
    out = run("end_to_end.py", "--profile", "smoke", "--runs", "1", "generate.limit=16", "train.max_steps=1",
              "eval.limit=3", "publish.verify_load=false")
    assert "| whole command |" in out and "stages skipped: 4 of 4" in out
