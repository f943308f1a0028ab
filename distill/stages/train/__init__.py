"""train: LoRA SFT of the student on the teacher's labels (TRL SFTTrainer + peft) -> train/adapter/.

    python -m distill train recipe=support_tickets run_dir=DIR [train.max_steps=100] [student=phi3_mini train=qlora]
    accelerate launch --num_processes 2 -m distill train recipe=support_tickets run_dir=DIR     # data-parallel

Loss is on the answer tokens and the end-of-turn token only (see distill.template). Every train.save_steps a
checkpoint (adapter safetensors, optimizer, scheduler, RNG, data position) goes to train/checkpoints/ and is sealed
last by a record of its files and sizes; re-running the stage resumes from the newest sealed checkpoint of the same
training config, and a half-written or corrupt one is skipped with a warning, never loaded. train/metrics.jsonl
gets one row per step (loss, lr, tokens/s) and one per validation (eval_loss).

Memory and FLOPs: a batch runs as micro-batches of at most train.micro_batch_size examples (one optimizer step per
batch, the same gradient), each padding-free (its examples end to end in one row, kept apart by their position ids),
and the loss projects only the labelled positions through the vocabulary.

student=embed_classifier trains no LM: a frozen encoder + a linear head per enum field -> train/head/
(distill.student.embed_classifier).
student=auto climbs the student ladder (distill.student.ladder) -> train/ladder.json and the chosen rung's files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from distill import DistillError, paths, runio
from distill.config import Config
from distill.student import embed_classifier, ladder
from distill.task import Task, dump_answer, load_split
from distill.student.template import encode_example, end_of_turn
# checkpoint_problem, CHECKPOINT_SEAL and the head are re-exported: the tests and benchmarks reach them here
from distill.stages.train.checkpoints import (CHECKPOINT_SEAL, _prepare_resume, checkpoint_problem,
                                               last_complete_checkpoint, resume_key, seal_checkpoint)  # noqa: F401
from distill.stages.train.trainer import _score_labelled_positions_only, _trainer_class  # noqa: F401

log = logging.getLogger("distill")

# Keys of train/metrics.jsonl rows that depend on wall time, not on the training itself.
TIMING_KEYS = ("elapsed_s", "tokens_per_s", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "train_tokens_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
_DROPPED_KEYS = ("num_input_tokens_seen", "num_tokens", "eval_num_tokens")


def build_dataset(rows: list[dict], task: Task, tokenizer, max_len: int):
    from datasets import Dataset

    eot = end_of_turn(tokenizer)
    encoded = [encode_example(tokenizer, task.student_messages(r["input"]), dump_answer(r["teacher"]), max_len, eot)
               for r in rows]
    return Dataset.from_list(encoded)


def _check_report_to(report_to: str) -> None:
    """A tracker named in train.report_to must be installed; say how, before any model is loaded."""
    from transformers.integrations import get_available_reporting_integrations

    if report_to in ("none", "", "all"):
        return
    installed = get_available_reporting_integrations()
    if report_to not in installed:
        raise DistillError(f"train.report_to={report_to} is not an installed tracker (installed: "
                           f"{', '.join(installed) or 'none'}); pip install {report_to}, or train.report_to=none")


def _barrier() -> None:
    """Wait for every training process (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _callbacks(metrics_file: Path, key: str):
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Append every logged step to train/metrics.jsonl: step, loss, lr, grad_norm, tokens/s (eval rows too)."""

        def __init__(self):
            self.started = self.last_time = time.perf_counter()
            self.last_tokens = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            logs = dict(logs or {})
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            row = {"step": state.global_step}
            if "learning_rate" in logs:
                row["lr"] = logs.pop("learning_rate")
            # TRL's own token counters restart from zero on a resume; tokens_seen (transformers' state) does not.
            row.update({k: v for k, v in logs.items() if k not in _DROPPED_KEYS})
            if "train_loss" in logs:  # transformers averages over this session's steps only; use the whole run
                losses = [h["loss"] for h in state.log_history if "loss" in h]
                row["train_loss"] = sum(losses) / len(losses) if losses else None
            if "loss" in logs:
                if self.last_tokens is not None and now > self.last_time:
                    row["tokens_per_s"] = round((seen - self.last_tokens) / (now - self.last_time), 1)
                row["tokens_seen"] = seen
                self.last_tokens, self.last_time = seen, now
            row["elapsed_s"] = round(now - self.started, 3)
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_tokens, self.last_time = state.num_input_tokens_seen, time.perf_counter()

    class SealCheckpoints(TrainerCallback):
        """Seal each checkpoint once every process has finished writing it."""

        def on_save(self, args, state, control, **kwargs):
            _barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seal_checkpoint(folder, state.global_step, key)

    return [MetricsLog(), SealCheckpoints()]


def run(cfg: Config, run_dir: Path) -> dict:
    if cfg.student.kind == "embed_classifier":  # the rung below the LMs: no LoRA, no steps, no checkpoints
        return embed_classifier.train(cfg, run_dir)
    if cfg.student.kind == "auto":  # the student ladder (distill.student.ladder): each LM rung comes back here
        return ladder.train(cfg, run_dir, run)
    from peft import LoraConfig, get_peft_model
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTConfig

    from distill.student.models import load_base

    out_dir = paths.stage_dir(run_dir, "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg, scfg = cfg.train, cfg.student
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    task = Task(cfg)
    train_rows = load_split(run_dir, "train")
    val_rows = load_split(run_dir, "val")
    if not train_rows:
        raise DistillError(f"the train split in {paths.split_path(run_dir, 'train')} is empty; label more inputs "
                           f"(generate.limit) or lower generate.split.test")
    if tcfg.method == "qlora" and not scfg.load_in_4bit:
        raise DistillError("train=qlora needs a 4-bit base: set student.load_in_4bit=true (CUDA only)")
    if tcfg.early_stopping_patience and not val_rows:
        raise DistillError("train.early_stopping_patience needs a val split, and it is empty; raise "
                           "generate.split.val or set train.early_stopping_patience=null")

    _check_report_to(tcfg.report_to)

    model, tokenizer = load_base(cfg)
    if scfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=scfg.gradient_checkpointing)
    set_seed(cfg.seed)  # the adapter's initial weights
    lora = LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                      target_modules=list(scfg.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()

    train_ds = build_dataset(train_rows, task, tokenizer, scfg.max_seq_len)
    val_ds = build_dataset(val_rows, task, tokenizer, scfg.max_seq_len) if val_rows else None
    ckpt_dir = out_dir / paths.CHECKPOINTS_DIR
    metrics_file = out_dir / paths.TRAIN_METRICS
    on_cuda = torch.cuda.is_available()
    if tcfg.bf16 and not on_cuda:
        log.warning("train.bf16 ignored: no CUDA device (bf16 matmuls are emulated on CPU and far slower)")
    evaluating = bool(tcfg.eval_steps) and val_ds is not None
    early_stopping = bool(tcfg.early_stopping_patience) and evaluating
    micro = max(d for d in range(1, min(tcfg.micro_batch_size or tcfg.batch_size, tcfg.batch_size) + 1)
                if tcfg.batch_size % d == 0)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=tcfg.max_steps,
        # A batch of batch_size examples runs as equal micro-batches and the optimizer steps once per batch: the
        # same gradient (the loss is summed over the batch's labelled tokens), the activations of a micro-batch.
        # Validation keeps no activations, so it runs whole batches (eval_loss is the same mean as before).
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum * (tcfg.batch_size // micro),
        learning_rate=tcfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(tcfg.warmup_ratio * tcfg.max_steps),
        weight_decay=tcfg.weight_decay,
        logging_steps=1,
        save_steps=tcfg.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=tcfg.eval_steps,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # SFTConfig defaults to bf16 + activation checkpointing; bf16 matmuls are emulated on most CPUs (~20x
        # slower), so both are set explicitly from our config.
        bf16=tcfg.bf16 and on_cuda,
        use_cpu=not on_cuda,
        activation_checkpointing=scfg.gradient_checkpointing,
        # Padding-free: a micro-batch is its examples end to end in one row with their own position ids, and the
        # attention (SDPA/eager: a block-diagonal mask built from the position ids) keeps them apart; no pad token
        # is computed. The examples are already cut to student.max_seq_len (encode_example), which TRL requires.
        padding_free=True,
        max_length=None,
        include_num_input_tokens_seen="all",  # a padding-free row has no padding (and SmolLM2 pads with <|im_end|>)
        report_to=[] if tcfg.report_to in ("none", "") else [tcfg.report_to],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        save_only_model=False,
    )
    key = resume_key(cfg, run_dir)
    if args.process_index == 0:
        resume = _prepare_resume(ckpt_dir, metrics_file, key)
    _barrier()
    if args.process_index != 0:
        resume = last_complete_checkpoint(ckpt_dir, key)
    callbacks = _callbacks(metrics_file, key)
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tcfg.early_stopping_patience,
                                               early_stopping_threshold=tcfg.early_stopping_threshold))
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                   processing_class=tokenizer, callbacks=callbacks)
    if resume:
        log.info("resuming training from %s", resume.name)
    log.info("training %s: %d examples, %d trainable of %d parameters, %d process(es)", scfg.name, len(train_ds),
             trainable, total, args.world_size)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    elapsed = time.perf_counter() - started
    session_tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    if val_ds is None:
        val_loss = None
    elif evals and evals[-1]["step"] == trainer.state.global_step and not early_stopping:
        val_loss = evals[-1]["eval_loss"]  # just measured at the last step
    else:
        val_loss = trainer.evaluate()["eval_loss"]  # the final (or, with early stopping, the best) adapter

    # Evaluation, publishing and DONE.json belong to one process: the others stop here once the adapter is saved.
    adapter_dir = paths.adapter_path(run_dir)
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    _barrier()
    if not trainer.is_world_process_zero():
        raise SystemExit(0)

    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume.name if resume else None,
        "stopped_early": trainer.state.global_step < tcfg.max_steps,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if early_stopping
        and trainer.state.best_model_checkpoint else None,
        "train_examples": len(train_ds),
        "val_examples": len(val_ds) if val_ds is not None else 0,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "val_loss": val_loss,
        "val_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in evals],
        "trainable_params": trainable,
        "total_params": total,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(session_tokens / elapsed, 1) if elapsed > 0 else None,
        "processes": args.world_size,
        "device": "cuda" if on_cuda else "cpu",
        "threads": torch.get_num_threads(),
        "adapter_sha256": runio.sha256_tree(adapter_dir),
        "end_of_turn": end_of_turn(tokenizer),
    }
