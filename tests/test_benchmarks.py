"""Each benchmarks/ command at a tiny size: it still runs and prints its table (nothing is recorded)."""

from __future__ import annotations

import importlib.util
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
    lines = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    paid = [c.strip() for c in lines[0]].index("paid calls")  # the header row names the column
    rows = {cells[0].strip(): cells for cells in lines[1:]}
    assert rows["distill"][paid].strip() == "60" and rows["rerun"][paid].strip() == "0"


needs_bitext = pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "bitext_customer_support").is_dir(),
    reason="the Bitext sample is read from ../shared/data, which this checkout does not have")


@pytest.mark.e2e
@needs_bitext
def test_teacher_quality_tiny():
    out = run("teacher_quality.py", "--items", "3", "--options", "fixed", "score", "score-raw")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells if len(row) == 7}  # the main table (the diagnostics table has 6)
    assert {"fixed", "score", "score-raw"} <= set(rows)
    assert "[" in rows["fixed"][0]  # accuracy with its bootstrap interval
    assert rows["score-raw"][3] == "0"  # the same requests as score: answered from the shared ledger


@pytest.mark.e2e
def test_end_to_end_tiny():
    out = run("end_to_end.py", "--profile", "smoke", "--runs", "1", "generate.limit=16", "train.max_steps=1",
              "eval.limit=3", "publish.verify_load=false")
    assert "| whole command |" in out and "stages skipped: 4 of 4, teacher calls paid: 0" in out


@pytest.mark.e2e
@pytest.mark.timeout(2400)
def test_inference_tiny(tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "distill", "run", "recipe=support_tickets", "profile=smoke",
                    f"run_dir={run_dir}", "generate.limit=16", "train.max_steps=1", "eval.limit=3",
                    "publish.verify_load=false"], check=True, capture_output=True, cwd=REPO, timeout=600)
    # every predictor of the benchmark (transformers, two llama.cpp servers, the runtime at three concurrencies)
    # loads and answers in turn: minutes on an idle machine, over 10 minutes on loaded cores
    out = run("inference.py", "--run-dir", str(run_dir), "--items", "2", "--runs", "1", timeout=1800)
    rows = [line for line in out.splitlines() if line.startswith("| student") or line.startswith("| teacher")]
    runtimes = [r.split("|")[1].split(",")[1].strip() for r in rows[:3]]
    assert runtimes == ["transformers", "transformers", "llama.cpp server"]
    assert rows[-1].split("|")[-2].strip() == "1.0x"  # the teacher is the reference line
    # the shipped runtime at concurrency 1, 4, 8, each answer and confidence compared with concurrency 1
    served = [r for r in rows if "distill runtime (scored, 1 request at a time)" in r]
    assert [r.split("concurrency ")[1].split(" ")[0] for r in served] == ["1", "4", "8"]
    assert all("concurrency 1: 2/2)" in r for r in served)
    assert "in distill's runtime: best" in out and "on the tokens evaluated after the cached prefix" in out


@pytest.mark.e2e
def test_train_throughput_tiny():
    out = run("train_throughput.py", "--runs", "1", "--steps", "2", "--batch", "2", "--examples", "12")
    (row,) = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "tokens" not in line]
    assert row[1].strip().startswith("SmolLM2-135M") and float(row[4]) > 0 and float(row[8]) > 0  # tokens/s, MiB


@pytest.mark.e2e
@needs_bitext
def test_quality_at_budget_tiny(tmp_path):
    out = run("quality_at_budget.py", "--budgets", "8", "--test", "3", "--batch", "4", "--work", str(tmp_path))
    assert "| 8 |" in out and (tmp_path / "quality_at_budget.png").stat().st_size > 0


@needs_bitext
def test_student_ladder_tiny():
    out = run("student_ladder.py", "--per-intent", "2", "--test-per-intent", "2", "--val-per-intent", "1")
    (row,) = [line.split("|") for line in out.splitlines() if line.startswith("| 2 |")]
    assert row[2].strip() == "54" and float(row[3].split("%")[0]) > 100 / 27  # 27 intents: above chance


def test_student_ladder_lm_on_the_full_split_needs_an_epoch_bound():  # refused before any data is read
    args = [sys.executable, str(REPO / "benchmarks" / "student_ladder.py"), "--rungs", "lm", "--per-intent", "0",
            "--no-record"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "--lm-set train.epochs=N" in proc.stderr, proc.stderr[-2000:]


def test_setfit_pairs_pair_each_message_with_its_own_label_and_another():
    sys.path.insert(0, str(REPO))
    from benchmarks.student_ladder import contrastive_pairs

    train = [(f"{label}{k}", label) for label in "abc" for k in range(3)]
    label_of = dict(train)
    pairs = contrastive_pairs(train, iterations=4, seed=0)
    assert len(pairs) == 2 * 4 * len(train)
    assert all((label_of[a] == label_of[b]) == (y == 1.0) for a, b, y in pairs)
    assert {label_of[b] for a, b, y in pairs if y == 0.0 and label_of[a] == "a"} == {"b", "c"}  # every other label
    assert pairs == contrastive_pairs(train, iterations=4, seed=0)


@needs_bitext
def test_student_ladder_setfit_tiny(tmp_path):
    from distill.data import embed
    from safetensors.numpy import load_file

    out = run("student_ladder.py", "--rungs", "embed", "setfit", "--per-intent", "2", "--test-per-intent", "2",
              "--val-per-intent", "1", "--setfit-iterations", "1", "--work", str(tmp_path))
    (row,) = [line.split("|") for line in out.splitlines() if "SetFit-tuned" in line and line.startswith("| 2 |")]
    assert float(row[3].split("%")[0]) > 100 / 27
    tuned = load_file(str(tmp_path / "setfit-n2" / "model.safetensors"))
    base = load_file(str(embed.model_dir() / "model.safetensors"))
    changed = [k for k in base if k in tuned and not (tuned[k] == base[k]).all()]
    assert len(changed) > len(base) // 2, "the contrastive epoch left most encoder weights as packaged"


def test_student_ladder_fastfit_without_its_package_says_how_to_install():
    code = ("import sys; sys.modules['fastfit'] = None; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.student_ladder import _fastfit; _fastfit()")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "pip install fast-fit --no-deps" in proc.stderr, proc.stderr[-2000:]


@needs_bitext
@pytest.mark.skipif(importlib.util.find_spec("fastfit") is None, reason="fast-fit is installed by make setup")
def test_student_ladder_fastfit_tiny(tmp_path):
    out = run("student_ladder.py", "--rungs", "fastfit", "--per-intent", "2", "--test-per-intent", "2",
              "--val-per-intent", "1", "--fastfit-epochs", "1", "--work", str(tmp_path))
    (row,) = [line.split("|") for line in out.splitlines() if "FastFit" in line and line.startswith("| 2 |")]
    # the run itself fails unless the bridge saw one result per test item (27 intents x 2)
    assert row[2].strip() == "54" and "[" in row[3] and float(row[6]) > 0 and "val accuracy" in out


@pytest.mark.e2e
@needs_bitext
def test_student_ladder_embedded_teacher_soft_vs_hard_tiny(tmp_path):
    out = run("student_ladder.py", "--teacher", "embedded", "--per-intent", "2", "--test-per-intent", "1",
              "--targets", "hard", "soft", "soft_confidence", "--work", str(tmp_path))
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| embed_classifier |")]
    assert [c[1] for c in cells] == ["hard", "soft", "soft_confidence"]
    assert all("[" in c[2] and "[" in c[3] for c in cells)  # accuracy vs gold and agreement, with intervals
    assert cells[0][4] == "-" and "McNemar p=" in cells[1][4]  # soft paired against hard on the same items
    assert "distribution source ['distribution']" in out and "distribution source ['confidence']" in out
    assert "teacher: paid calls 33, ledger hits 0" in out and "splits {'train': 20, 'val': 2, 'test': 11}" in out
    again = run("student_ladder.py", "--teacher", "embedded", "--per-intent", "2", "--test-per-intent", "1",
                "--work", str(tmp_path))
    assert "teacher: paid calls 0, ledger hits 33" in again  # the shared ledger: a rerun pays nothing
