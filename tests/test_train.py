"""The train stage: sealed checkpoints, resume after kill -9, validation + early stopping, two processes (gloo)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from distill import DistillError, paths, pipeline, runio
from distill.config import load_config
from distill.stages import train
from distill.testing.fake_teacher import FakeTeacher

FAKE_URL = "http://127.0.0.1:9/v1"  # the train stage never calls the teacher; the config only needs a URL


# ---------------------------------------------------------------------------------------------------------------
# checkpoint selection: a fast unit test per way a checkpoint can be broken


def _fake_checkpoint(ckpt_dir: Path, step: int, key: str = "k") -> Path:
    folder = ckpt_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(os.urandom(64))
    runio.write_json(folder / "trainer_state.json", {"global_step": step, "log_history": []})
    train.seal_checkpoint(folder, step, key)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


BREAKAGES = {
    "no seal (interrupted save)": lambda f: (f / train.CHECKPOINT_SEAL).unlink(),
    "missing optimizer": lambda f: (f / "optimizer.pt").unlink(),
    "empty adapter": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
    "truncated optimizer": lambda f: _truncate(f / "optimizer.pt"),
    "corrupt trainer state": lambda f: (f / "trainer_state.json").write_text('{"global_step": 4, "log_hi'),
    "corrupt seal": lambda f: (f / train.CHECKPOINT_SEAL).write_text("{not json"),
    "another training config": lambda f: train.seal_checkpoint(f, 4, "other"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, breakage):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    assert train.last_complete_checkpoint(tmp_path, "k") == newest
    BREAKAGES[breakage](newest)
    with caplog.at_level("WARNING", logger="distill"):
        chosen = train.last_complete_checkpoint(tmp_path, "k")
    assert chosen == tmp_path / "checkpoint-2"
    assert any("skipping checkpoint checkpoint-4" in r.getMessage() for r in caplog.records)


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path, caplog):
    (tmp_path / "checkpoint-3").mkdir()  # a save that died before writing anything
    with caplog.at_level("WARNING", logger="distill"):
        assert train.last_complete_checkpoint(tmp_path, "k") is None
    assert "checkpoint-3" in caplog.text
    assert train.last_complete_checkpoint(tmp_path / "absent", "k") is None


def test_resume_deletes_broken_and_newer_checkpoints_and_cuts_their_metrics(tmp_path):
    ckpt_dir, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    for step in (2, 4, 6, 8):
        _fake_checkpoint(ckpt_dir, step)
    _truncate(ckpt_dir / "checkpoint-6" / "optimizer.pt")    # half-written when the process died
    train.seal_checkpoint(ckpt_dir / "checkpoint-8", 8, "other")  # sealed by another training config
    (ckpt_dir / "checkpoint-3").mkdir()                      # a save that died before writing anything
    runio.write_jsonl(metrics, [{"step": s, "loss": 1.0 / s} for s in range(1, 9)])
    assert train._prepare_resume(ckpt_dir, metrics, "k") == ckpt_dir / "checkpoint-4"
    assert sorted(f.name for f in ckpt_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in runio.read_jsonl(metrics)] == [1, 2, 3, 4]
    # nothing intact: every checkpoint goes, and so do the metrics rows (the run starts again from step 0)
    _truncate(ckpt_dir / "checkpoint-2" / "optimizer.pt")
    (ckpt_dir / "checkpoint-4" / train.CHECKPOINT_SEAL).unlink()
    assert train._prepare_resume(ckpt_dir, metrics, "k") is None
    assert list(ckpt_dir.iterdir()) == [] and not metrics.exists()


def test_length_grouped_order_is_fixed_per_epoch_and_groups_lengths():
    from datasets import Dataset

    lengths = [5, 50, 6, 48, 7, 52, 8, 49] * 4
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    sampler = train._trainer_class()._get_train_sampler(
        type("T", (), {"train_dataset": ds, "args": type("A", (), {"train_batch_size": 4,
                                                                   "gradient_accumulation_steps": 1,
                                                                   "data_seed": 3, "seed": 0})()})())
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths))) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first

    def padding(order):
        batches = [[lengths[i] for i in order[b:b + 4]] for b in range(0, len(order), 4)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    assert padding(first) < padding(list(range(len(lengths)))) / 2  # the dataset order mixes short and long


def test_early_stopping_needs_validation_steps(tmp_path):
    # epochs null: no epoch to validate at, so eval_steps is needed
    with pytest.raises(DistillError, match="early_stopping_patience needs train.eval_steps"):
        load_config([f"run_dir={tmp_path}", "train.early_stopping_patience=2", "train.epochs=null"])
    with pytest.raises(DistillError, match="multiple of train.eval_steps"):
        load_config([f"run_dir={tmp_path}", "train.early_stopping_patience=2", "train.eval_steps=3",
                     "train.save_steps=4"])
    with pytest.raises(DistillError, match="set train.epochs .* or train.max_steps"):
        load_config([f"run_dir={tmp_path}", "train.epochs=null", "train.max_steps=null"])
    load_config([f"run_dir={tmp_path}", "train.early_stopping_patience=2"])  # epochs: validation once per epoch


def test_epochs_capped_by_max_steps_say_which_decided():
    from distill.config.models import TrainConfig

    def cfg(**kw):
        return TrainConfig(batch_size=4, lr=1e-3, save_steps=5, **kw)

    plan = train.plan_steps(cfg(epochs=3, max_steps=None), 10)   # 3 steps per epoch (10 examples, batch 4)
    assert plan == {"steps_per_epoch": 3, "planned_steps": 9, "epoch_steps": 9, "decided_by": "epochs"}
    capped = train.plan_steps(cfg(epochs=3, max_steps=6), 10)
    assert capped["planned_steps"] == 6 and capped["decided_by"] == "max_steps"
    assert train.plan_steps(cfg(max_steps=7), 10)["planned_steps"] == 7
    assert train.plan_steps(cfg(epochs=0.5), 10)["planned_steps"] == 2
    assert train.plan_steps(cfg(epochs=1, grad_accum=2), 10, world_size=2)["steps_per_epoch"] == 1
    by, why = train.stop_reason(cfg(epochs=3, max_steps=6), capped, 6, patience_used=False)
    assert by == "max_steps" and "stopped early by train.max_steps=6" in why and "2.00 epochs" in why
    by, why = train.stop_reason(cfg(epochs=3, early_stopping_patience=1), plan, 6, patience_used=True)
    assert by == "early_stopping" and "1 validation(s) without a higher val agreement" in why
    assert train.stop_reason(cfg(epochs=3), plan, 9, patience_used=True)[0] == "epochs"


def test_balanced_batches_on_skewed_labels():
    from distill.task import Task

    task = Task(load_config(["run_dir=/tmp/unused"]))   # support_tickets: category x priority
    rows = ([{"teacher": {"category": "billing", "priority": "low"}}] * 40
            + [{"teacher": {"category": "bug", "priority": "high"}}] * 4
            + [{"teacher": {"category": "account", "priority": "medium"}}] * 4)
    classes, info = train.balance_classes(rows, task, "auto", 3.0)
    assert info["balanced"] and info["classes"] == 3 and info["most_to_least"] == 10.0
    sampler = train._trainer_class()._get_train_sampler(
        type("T", (), {"train_dataset": None, "balance_classes": classes,
                       "args": type("A", (), {"train_batch_size": 6, "gradient_accumulation_steps": 1,
                                              "data_seed": 3, "seed": 0})()})())
    order = list(sampler)
    assert len(order) == len(rows)
    for start in range(0, len(order), 6):  # every batch of 6: two of each label
        assert sorted(Counter(classes[i] for i in order[start:start + 6]).values()) == [2, 2, 2]
    # unbalanced order (the data as it comes) would put 40/48 of the draws on one label; here each gets 16
    assert Counter(classes[i] for i in order) == {0: 16, 1: 16, 2: 16}
    assert len({order[i] for i in range(len(order)) if classes[order[i]] == classes[0]}) == 16  # no repeats of
    # the common label within an epoch, the rare ones repeat; the order is fixed per (seed, epoch)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert train.balance_classes(rows[:44], task, "auto", 20.0)[0] is None   # 10x < ratio 20: left as it comes
    assert train.balance_classes(rows, task, "none", 3.0)[0] is None


# ---------------------------------------------------------------------------------------------------------------
# real training runs on the tiny random student


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, fake_answer):
    """A run dir whose generate stage is done (fake teacher), copied by each test that trains."""
    run_dir = tmp_path_factory.mktemp("labelled") / "run"

    with FakeTeacher(fake_answer) as teacher:
        pipeline.run(load_config(tiny_overrides(run_dir, teacher.base_url, "generate.limit=20")), ("generate",))
    return run_dir


def _copy(labelled_run: Path, dest: Path) -> Path:
    shutil.copytree(labelled_run, dest)
    return dest


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(run_dir, FAKE_URL, "generate.limit=20", "train.threads=1", *extra)
    return ["train", "recipe=support_tickets", *overrides]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "distill", *args]


HELD = "held.marker"  # written by _held_after_save's process once it holds still


def _held_after_save(step: int, args: list[str]) -> list[str]:
    """The CLI, but the process stops (sleeps) once the checkpoint of ``step`` is saved and sealed."""
    code = (
        "import pathlib, runpy, sys, time\n"
        "from transformers.trainer_callback import CallbackHandler\n"
        "save = CallbackHandler.on_save\n"
        "def on_save(self, args, state, control):\n"
        "    out = save(self, args, state, control)\n"
        f"    if state.global_step == {step}:\n"
        f"        (pathlib.Path(args.output_dir) / {HELD!r}).write_text('held')\n"
        "        time.sleep(3600)\n"
        "    return out\n"
        "CallbackHandler.on_save = on_save\n"
        "sys.argv = ['distill', *sys.argv[1:]]\n"
        "runpy.run_module('distill', run_name='__main__')\n")
    return [sys.executable, "-c", code, *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(paths.adapter_path(run_dir) / "adapter_model.safetensors")


def _history(run_dir: Path) -> list[dict]:
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS)
    return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in rows]


@pytest.mark.integration
def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(labelled_run, tmp_path):
    # 10 train examples at batch 4: 3 steps per epoch, so the resume from checkpoint 4 starts mid-way through the
    # second epoch (data order, RNG and dropout must all be restored, not only the weights).
    steps, kill_after = 8, 4
    extra = (f"train.max_steps={steps}", "train.save_steps=2", "train.eval_steps=4", "train.lora_dropout=0.1",
             "train.early_stopping_patience=null")  # the full 8 steps, whatever the val agreement does
    whole = _copy(labelled_run, tmp_path / "whole")
    subprocess.run(_cli(_train_args(whole, *extra)), env=_env(), check=True, capture_output=True, timeout=600)

    killed = _copy(labelled_run, tmp_path / "killed")
    seal = paths.stage_dir(killed, "train") / paths.CHECKPOINTS_DIR / f"checkpoint-{kill_after}" / train.CHECKPOINT_SEAL
    # The process holds still once checkpoint 4 is saved and sealed, so the kill lands there however slow the
    # machine is (no race between the test's polling and the next steps).
    proc = subprocess.Popen(_held_after_save(kill_after, _train_args(killed, *extra)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (seal.exists() and (seal.parent.parent / HELD).exists()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before checkpoint 4 was sealed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert sorted(p.name for p in seal.parent.parent.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (seal.parent.parent / HELD).unlink()
    assert runio.read_done(killed, "train") is None

    # A newer checkpoint that was being written when the process died: present, but never loaded.
    ckpt_dir = paths.stage_dir(killed, "train") / paths.CHECKPOINTS_DIR
    half = ckpt_dir / f"checkpoint-{kill_after + 2}"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(ckpt_dir / f"checkpoint-{kill_after}", half)
    _truncate(half / "optimizer.pt")

    rerun = subprocess.run(_cli(_train_args(killed, *extra)), env=_env(), capture_output=True, text=True, check=False,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"skipping checkpoint checkpoint-{kill_after + 2}" in rerun.stderr
    summary = runio.read_done(killed, "train")["summary"]
    assert summary["resumed_from"] == f"checkpoint-{kill_after}" and summary["steps"] == steps

    a, b = _adapter(whole), _adapter(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert any(t.abs().sum() > 0 for n, t in a.items() if "lora_B" in n)  # it trained: B starts at zero
    history = _history(whole)
    assert [r["step"] for r in history if "loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in history if "eval_loss" in r][:2] == [4, 8]
    assert _history(killed) == history


@pytest.mark.integration
def test_early_stopping_on_val_agreement_keeps_the_best_checkpoint(labelled_run, tmp_path, monkeypatch):
    from distill.student.models import load_student
    from distill.student.predict import predict_in_process
    from distill.task import Task

    run_dir = _copy(labelled_run, tmp_path / "run")
    # The validation measures the real val agreement by scored decoding; so that the best adapter is not simply
    # the last one whatever a random model does, the second validation reports it 0.5 lower than measured.
    probe, measured = train._agreement_probe, []

    def second_validation_worse(*args):
        real = probe(*args)

        def agreement():
            measured.append(real())
            return measured[-1] - (0.5 if len(measured) == 2 else 0.0)
        return agreement

    monkeypatch.setattr(train, "_agreement_probe", second_validation_worse)
    cfg = load_config(_train_args(run_dir, "train.max_steps=8", "train.epochs=null", "train.eval_steps=2",
                                  "train.save_steps=2", "train.early_stopping_patience=1",
                                  "train.warmup_ratio=0")[1:])
    summary = pipeline.run_stage(cfg, "train")
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS)
    step_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_agreement" in r]
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["stopped_by"] == "early_stopping"
    assert "1 validation(s) without a higher val agreement" in summary["stop_reason"]
    assert [r["step"] for r in step_rows] == list(range(1, summary["steps"] + 1))
    assert all({"lr", "loss", "tokens_seen"} <= r.keys() for r in step_rows)
    assert all(r["tokens_per_s"] > 0 for r in step_rows[1:])
    # the agreement curve: in the metrics file and the summary, one point per validation during training
    assert len(measured) == 2 and [r["step"] for r in eval_rows] == [2, 4]
    assert summary["val_agreements"] == [{"step": r["step"], "eval_agreement": r["eval_agreement"]}
                                         for r in eval_rows]
    assert summary["val_agreements"][1]["eval_agreement"] == pytest.approx(measured[1] - 0.5)
    assert summary["best_checkpoint"] == "checkpoint-2" and summary["kept_val_agreement"] == measured[0]
    # The adapter kept on disk is the best checkpoint's, weight for weight (and not the other one's).
    from safetensors.torch import load_file

    ckpt_dir = paths.stage_dir(run_dir, "train") / paths.CHECKPOINTS_DIR
    kept = _adapter(run_dir)
    best = load_file(ckpt_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert kept.keys() == best.keys()
    for name, tensor in best.items():
        torch.testing.assert_close(kept[name], tensor, atol=0, rtol=0)
    second = load_file(ckpt_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(kept[name], second[name]) for name in kept if "lora_B" in name)
    # what training measured is what evaluate's scored decoding gives for the kept adapter
    val_rows = runio.read_jsonl(paths.split_path(run_dir, "val"))
    model, tokenizer = load_student(cfg, paths.adapter_path(run_dir))
    preds = predict_in_process(cfg, Task(cfg), val_rows, model, tokenizer)
    assert cfg.eval.decode == "scored"
    assert sum(a == r["teacher"] for a, r in zip(preds.answers, val_rows)) / len(val_rows) == \
        pytest.approx(measured[0], abs=1e-6)


@pytest.mark.integration
def test_epochs_decide_and_the_summary_says_so(labelled_run, tmp_path):
    run_dir = _copy(labelled_run, tmp_path / "run")
    # 10 train examples at batch 4: 3 steps per epoch; 2 epochs = 6 steps, capped by max_steps=100 (not reached)
    cfg = load_config(_train_args(run_dir, "train.epochs=2", "train.max_steps=100", "train.save_steps=3",
                                  "train.early_stopping_patience=null", "train.targets=soft")[1:])
    summary = pipeline.run_stage(cfg, "train")
    n = summary["train_examples"]
    assert summary["steps_per_epoch"] == -(-n // 4) and summary["steps"] == 2 * summary["steps_per_epoch"]
    assert summary["stopped_by"] == "epochs" and not summary["stopped_early"] and summary["epochs_trained"] == 2
    # soft targets on the fake teacher's trusted-free generate answers: no distribution stored, so one-hot
    assert summary["targets"] == "soft" and summary["soft_targets"]["fields_by_source"] == {"one_hot": 2 * n}
    assert any(t.abs().sum() > 0 for name, t in _adapter(run_dir).items() if "lora_B" in name)


def test_lr_schedule_reaches_the_optimizer_steps(labelled_run, tmp_path):
    lrs = {}
    for schedule in ("linear", "cosine", "constant"):
        run_dir = _copy(labelled_run, tmp_path / schedule)
        cfg = load_config(_train_args(run_dir, "train.max_steps=6", "train.epochs=null", "train.save_steps=6",
                                      "train.warmup_ratio=0", "train.lr=1e-3", "train.early_stopping_patience=null",
                                      f"train.lr_schedule={schedule}")[1:])
        pipeline.run_stage(cfg, "train")
        rows = runio.read_jsonl(paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS)
        lrs[schedule] = [r["lr"] for r in rows if "loss" in r]
    assert lrs["constant"] == pytest.approx([1e-3] * 6)
    # both decay to 0 over the 6 planned steps; cosine stays above linear for the first half and below it after
    for decaying in (lrs["linear"], lrs["cosine"]):
        assert decaying[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(decaying, decaying[1:]))
    assert lrs["cosine"][1] > lrs["linear"][1] and lrs["cosine"][5] < lrs["linear"][5]
    with pytest.raises(DistillError, match="train.lr_schedule: Input should be"):
        load_config(_train_args(tmp_path / "x", "train.lr_schedule=warm_restarts")[1:])


@pytest.mark.integration
def test_two_processes_with_gloo_train_one_adapter(labelled_run, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    from distill.student.models import load_base

    run_dir = _copy(labelled_run, tmp_path / "run")
    args = _train_args(run_dir, "train.max_steps=2", "train.save_steps=2")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", *args]
    env = {**_env(), "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = runio.read_done(run_dir, "train")["summary"]
    assert summary["processes"] == 2 and summary["steps"] == 2
    rows = runio.read_jsonl(paths.stage_dir(run_dir, "train") / paths.TRAIN_METRICS)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # one writer: rank 0
    ckpt = paths.stage_dir(run_dir, "train") / paths.CHECKPOINTS_DIR / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(runio.read_json(ckpt / train.CHECKPOINT_SEAL)["files"])

    cfg = load_config(args[1:])
    base, _ = load_base(cfg)
    set_seed(cfg.seed)
    initial = get_peft_model(base, LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha,
                                              target_modules=list(cfg.student.target_modules),
                                              task_type="CAUSAL_LM"))
    init_state = {k: v.clone() for k, v in initial.state_dict().items() if "lora_" in k}
    trained = PeftModel.from_pretrained(load_base(cfg)[0], paths.adapter_path(run_dir))
    trained_state = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert trained_state.keys() == init_state.keys() and init_state
    assert any(not torch.equal(trained_state[k], init_state[k]) for k in init_state)


def test_offline_hub_student_is_one_clear_error(tmp_path):
    from distill.student.models import load_base

    # A hub id that no cache holds: offline (conftest), loading it must fail with what to do, not a traceback.
    cfg = load_config([f"run_dir={tmp_path}", "student=phi3_mini", "student.load_in_4bit=false",
                       "student.hub_id=distill-tests/not-downloaded"])
    with pytest.raises(DistillError, match=r"cannot load student 'phi3_mini' from distill-tests/not-downloaded"
                                           r".*set student.path=DIR"):
        load_base(cfg)


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    from transformers import integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    train._check_report_to("none")
    train._check_report_to("tensorboard")
    with pytest.raises(DistillError, match=r"train.report_to=wandb is not an installed tracker \(installed: "
                                           r"tensorboard\); pip install wandb"):
        train._check_report_to("wandb")


# ---------------------------------------------------------------------------------------------------------------
# the loss's LM head and padding-free batches


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_fused_head_scores_only_labelled_positions_with_trls_values(monkeypatch):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import add_fused_lm_head

    outputs = ("log_probs", "entropy", "is_top1")
    trl_model, ours = _tiny_llama(), _tiny_llama()
    add_fused_lm_head(trl_model, outputs=outputs)
    add_fused_lm_head(ours, outputs=outputs)
    train._score_labelled_positions_only(ours)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :7] = -100        # the prompt
    labels[1, 10:] = -100       # padding of the shorter row
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    rows_scored = []
    apply = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda hidden, *a: rows_scored.append(len(hidden))
                        or apply(hidden, *a))

    results = {}
    for name, model in (("trl", trl_model), ("ours", ours)):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results[name] = out, model.model.layers[0].mlp.down_proj.weight.grad
    # TRL scores all 2 x 11 shifted positions on CPU; ours only the 5 + 3 that have a label
    assert rows_scored == [22, 8]
    (ref, ref_grad), (got, got_grad) = results["trl"], results["ours"]
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.log_probs, ref.log_probs)
    torch.testing.assert_close(got.entropy, ref.entropy)
    assert torch.equal(got.is_top1, ref.is_top1) and torch.equal(got.label_mask, ref.label_mask)
    torch.testing.assert_close(got_grad, ref_grad)
    assert got_grad.abs().sum() > 0


def test_padding_free_row_gives_the_padded_batchs_loss():
    """Examples packed end to end with their own position ids (SDPA, no flash-attn) do not attend to each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_llama()
    add_fused_lm_head(model, outputs=("log_probs",))
    train._score_labelled_positions_only(model)
    gen = torch.Generator().manual_seed(2)
    examples = []
    for length in (9, 14, 6):
        ids = torch.randint(0, 300, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length - 3) + ids[-3:]})
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, 29) and "attention_mask" not in packed
    out = {name: model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")
                          if k in batch}, fused_lm_head=True)
           for name, batch in (("padded", padded), ("packed", packed))}
    torch.testing.assert_close(out["packed"].loss, out["padded"].loss)
    packed_lp = out["packed"].log_probs[out["packed"].label_mask]
    torch.testing.assert_close(packed_lp, out["padded"].log_probs[out["padded"].label_mask])
    # the same row without position ids is one long sequence, whose later examples see the earlier ones: their
    # log-probabilities move by far more than the tolerance above, so the check has teeth
    leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], fused_lm_head=True)
    assert (leaky.log_probs[leaky.label_mask] - packed_lp).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# soft targets


def _soft_forward(model, ids, labels, soft):
    batch = {"input_ids": ids, "labels": labels, "fused_lm_head": True}
    if soft is not None:
        batch.update(soft_index=soft[0], soft_tokens=soft[1], soft_probs=soft[2])
    return model(**batch)


def _tiny_fused():
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_llama()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    train._score_labelled_positions_only(model)
    return model


def test_one_hot_soft_targets_are_the_hard_loss_exactly():
    model = _tiny_fused()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :6] = -100
    hard = _soft_forward(model, ids, labels, None)
    # the token at input position 8 trained on a one-hot distribution over it and two other candidates
    soft = (torch.tensor([8]), torch.tensor([[int(ids[0, 8]), 5, 7]]), torch.tensor([[1.0, 0.0, 0.0]]))
    out = _soft_forward(model, ids, labels, soft)
    torch.testing.assert_close(out.loss, hard.loss)
    torch.testing.assert_close(out.log_probs, hard.log_probs)
    spread = _soft_forward(model, ids, labels, (soft[0], soft[1], torch.tensor([[0.5, 0.25, 0.25]])))
    assert not torch.allclose(spread.loss, hard.loss)
    # only the soft position's term changed
    differs = (spread.log_probs - hard.log_probs).abs() > 1e-6
    assert differs.sum() == 1 and differs[0, 7]


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_soft_targets_move_the_students_value_distribution_to_the_teachers(targets):
    model = _tiny_fused()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 300, (4, 10), generator=gen)
    a, b = 3, 4  # two values' first tokens, at input position 7 of every example
    ids[:, 7] = a  # the teacher's top value, as the hard answer writes it
    labels = ids.clone()
    labels[:, :7] = -100
    teacher = torch.tensor([0.7, 0.3])
    flat = torch.arange(4) * 10 + 7
    soft = (flat, torch.tensor([[a, b]] * 4), teacher.repeat(4, 1)) if targets == "soft" else None

    def share_of_a():
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, 6, [a, b]]
        return float(torch.softmax(logits, -1)[:, 0].mean())

    before = share_of_a()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        _soft_forward(model, ids, labels, soft).loss.backward()
        opt.step()
    after = share_of_a()
    assert abs(before - 0.5) < 0.2  # a random model: no preference yet
    if targets == "soft":  # measured: the student's split between the two values is the teacher's
        assert abs(after - 0.7) < 0.05
    else:  # hard targets push all the mass onto the teacher's top value
        assert after > 0.95


def test_soft_columns_point_at_each_enum_values_first_token(tmp_path):
    from distill.stages.train.soft import soft_columns, teacher_distribution
    from distill.student.models import load_tokenizer
    from distill.student.template import encode_example, end_of_turn
    from distill.task import Task, dump_answer

    cfg = load_config([f"run_dir={tmp_path}", "student=tiny_random"])
    task, tok = Task(cfg), load_tokenizer(cfg)
    eot = end_of_turn(tok)
    cats = task.schema.enums["category"]
    row = {"input": "I was charged twice", "teacher": {"category": cats[1], "priority": "high"},
           "provenance": {"confidence": {"category": 0.6}}}
    enc = encode_example(tok, task.student_messages(row["input"]), dump_answer(row["teacher"]), 512, eot)
    cols, sources = soft_columns(row, task, tok, enc, eot)
    assert sources == {"confidence": 1, "one_hot": 1} and len(cols["soft_pos"]) == 2
    for pos, toks, probs, field in zip(cols["soft_pos"], cols["soft_tokens"], cols["soft_probs"], ["category",
                                                                                                  "priority"]):
        assert enc["labels"][pos] == enc["input_ids"][pos] != -100  # a labelled answer token
        assert enc["input_ids"][pos] in toks and len(set(toks)) == len(toks) and sum(probs) == pytest.approx(1)
        # the value's text starts at that token: the text before it is the answer up to the field's value
        before = tok.decode(enc["input_ids"][len(enc["input_ids"]) - len(tok(dump_answer(row["teacher"]) + eot,
                            add_special_tokens=False)["input_ids"]):pos])
        assert before.rstrip(' "').endswith(f'"{field}":')
    cat_probs = dict(zip(cols["soft_tokens"][0], cols["soft_probs"][0]))
    assert cat_probs[enc["input_ids"][cols["soft_pos"][0]]] >= 0.6
    dist, source = teacher_distribution({**row, "provenance": {"distribution": {"category": {cats[0]: 3, cats[1]: 1}}}},
                                        "category", cats)
    assert source == "distribution" and dist[:2] == [0.75, 0.25] and sum(dist) == 1


def test_soft_collator_indexes_the_packed_row():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from distill.stages.train.soft import SoftTargetCollator

    collate = SoftTargetCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    examples = [{"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14], "soft_pos": [2],
                 "soft_tokens": [[13, 20]], "soft_probs": [[0.9, 0.1]]},
                {"input_ids": [21, 22, 23], "labels": [-100, 22, 23], "soft_pos": [1, 2],
                 "soft_tokens": [[22, 30, 31], [23, 40]], "soft_probs": [[0.5, 0.25, 0.25], [1.0, 0.0]]}]
    out = collate(examples)
    assert out["input_ids"].shape == (1, 7)
    assert out["input_ids"][0, out["soft_index"]].tolist() == [13, 22, 23]
    assert out["soft_tokens"].tolist() == [[13, 20, 0], [22, 30, 31], [23, 40, 0]]
    torch.testing.assert_close(out["soft_probs"].sum(-1), torch.ones(3))
