"""train: LoRA SFT of the student on the teacher's labels (TRL SFTTrainer + peft) -> train/adapter/.

    python -m distill train recipe=support_tickets run_dir=DIR [train.epochs=3] [train.max_steps=100]
    accelerate launch --num_processes 2 -m distill train recipe=support_tickets run_dir=DIR     # data-parallel

How long: train.epochs passes over the train split, capped by train.max_steps (a profile's time budget); with
train.early_stopping_patience, the val split is decoded at every validation (once per epoch unless train.eval_steps
says otherwise) by scored decoding, the same decoder evaluate uses, and training stops after that many validations
without a higher agreement with the teacher, keeping the best checkpoint's adapter. The summary's stopped_by says
what ended it (epochs, max_steps, early_stopping) and stop_reason says it in words.

Loss is on the answer tokens and the end-of-turn token only (see distill.template); train.targets=soft trains each
enum value's first token on the teacher's distribution (distill.stages.train.soft); train.balance=classes (or auto
on skewed labels) draws batches round-robin over the teacher's labels. Every train.save_steps a checkpoint (adapter
safetensors, optimizer, scheduler, RNG, data position) goes to train/checkpoints/ and is sealed last by a record of
its files and sizes; re-running the stage resumes from the newest sealed checkpoint of the same training config,
and a half-written or corrupt one is skipped with a warning, never loaded. train/metrics.jsonl gets one row per
step (loss, lr, tokens/s) and one per validation (eval_loss, eval_agreement).

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
import math
import os
import time
from collections import Counter
from pathlib import Path

import torch

from distill import DistillError, paths, runio
from distill.config import Config
from distill.student import embed_classifier, ladder
from distill.task import Task, dump_answer, load_split, value_text
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


def build_dataset(rows: list[dict], task: Task, tokenizer, max_len: int, soft: bool = False,
                  sources: Counter | None = None):
    """The tokenized examples; ``soft``: with the soft_* columns (distill.stages.train.soft), counting the fields by
    the source of their distribution into ``sources``."""
    from datasets import Dataset

    from distill.stages.train.soft import soft_columns

    eot = end_of_turn(tokenizer)
    encoded = []
    for r in rows:
        ex = encode_example(tokenizer, task.student_messages(r["input"]), dump_answer(r["teacher"]), max_len, eot)
        if soft:
            cols, seen = soft_columns(r, task, tokenizer, ex, eot)
            ex.update(cols)
            if sources is not None:
                sources.update(seen)
        encoded.append(ex)
    return Dataset.from_list(encoded)


def balance_classes(rows: list[dict], task: Task, mode: str, ratio: float) -> tuple[list[int] | None, dict]:
    """(class id per train row for round-robin batches, or None; what was decided). A row's class is the tuple of
    the teacher's enum values; ``auto`` balances when the most common class is at least ``ratio`` times as frequent
    as the rarest."""
    enums = list(task.schema.enums)
    if mode == "none" or not enums or not rows:
        return None, {"mode": mode, "balanced": False, "why": "train.balance=none" if mode == "none"
                      else "no enum field to balance"}
    keys = [tuple(value_text(r["teacher"].get(f)) for f in enums) for r in rows]
    counts = Counter(keys)
    skew = max(counts.values()) / min(counts.values())
    info = {"mode": mode, "classes": len(counts), "most_to_least": round(skew, 2)}
    if mode == "auto" and skew < ratio:
        return None, {**info, "balanced": False,
                      "why": f"labels not skewed: the most common is {skew:.2f}x the rarest (< {ratio})"}
    index = {k: i for i, k in enumerate(sorted(counts))}
    why = ("train.balance=classes" if mode == "classes"
           else f"the most common label is {skew:.2f}x the rarest (>= train.balance_ratio={ratio})")
    return [index[k] for k in keys], {**info, "balanced": True, "why": why}


def plan_steps(tcfg, train_examples: int, world_size: int = 1) -> dict:
    """How many optimizer steps train.epochs and train.max_steps allow, and which of them decides."""
    per_step = tcfg.batch_size * tcfg.grad_accum * max(world_size, 1)
    steps_per_epoch = max(1, math.ceil(train_examples / per_step))
    epoch_steps = math.ceil(tcfg.epochs * steps_per_epoch) if tcfg.epochs is not None else None
    if epoch_steps is not None and (tcfg.max_steps is None or epoch_steps <= tcfg.max_steps):
        steps, decided_by = epoch_steps, "epochs"
    else:
        steps, decided_by = tcfg.max_steps, "max_steps"
    return {"steps_per_epoch": steps_per_epoch, "planned_steps": steps, "epoch_steps": epoch_steps,
            "decided_by": decided_by}


def stop_reason(tcfg, plan: dict, steps: int, patience_used: bool) -> tuple[str, str]:
    """(stopped_by: epochs | max_steps | early_stopping, the same in words) for a run that ended at ``steps``."""
    per = plan["steps_per_epoch"]
    done = f"{steps} steps ({steps / per:.2f} epochs of {per} steps)"
    if patience_used and steps < plan["planned_steps"]:
        return "early_stopping", (f"early stopping after {done}: {tcfg.early_stopping_patience} validation(s) "
                                  f"without a higher val agreement with the teacher; the best checkpoint is kept")
    if plan["decided_by"] == "max_steps" and tcfg.epochs is not None:
        return "max_steps", (f"stopped early by train.max_steps={tcfg.max_steps} (the time budget) after {done}, "
                             f"short of train.epochs={tcfg.epochs:g}")
    if plan["decided_by"] == "max_steps":
        return "max_steps", f"train.max_steps={tcfg.max_steps} reached: {done}"
    return "epochs", f"train.epochs={tcfg.epochs:g} completed: {done}"


def _agreement_probe(cfg: Config, task: Task, val_rows: list[dict], model, tokenizer):
    """The val agreement with the teacher of the model as it is now: scored decoding (evaluate's decoder,
    distill.student.predict) of the val split, whole answers compared with the teacher's."""
    from distill.student.predict import predict_in_process

    scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"decode": "scored"})})

    def agreement() -> float:
        side, was_training = tokenizer.padding_side, model.training
        try:
            preds = predict_in_process(scored, task, val_rows, model, tokenizer)
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        return round(sum(a is not None and a == r["teacher"] for a, r in zip(preds.answers, val_rows))
                     / len(val_rows), 6)

    return agreement


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
        log.warning("train.early_stopping_patience: the val split is empty, so training runs its full length "
                    "without early stopping (raise generate.split.val to stop on val agreement)")

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

    soft = tcfg.targets == "soft"
    if soft and not task.schema.enums:
        raise DistillError(f"train.targets=soft trains enum fields on the teacher's distribution, and recipe "
                           f"{cfg.recipe.name!r} has none; set train.targets=hard")
    sources: Counter = Counter()
    train_ds = build_dataset(train_rows, task, tokenizer, scfg.max_seq_len, soft, sources)
    val_ds = build_dataset(val_rows, task, tokenizer, scfg.max_seq_len, soft) if val_rows else None
    if soft and not getattr(model.get_base_model(), "_distill_labelled_head", True):
        raise DistillError(f"train.targets=soft needs the labelled-positions LM head, which student {scfg.name} "
                           f"(a head that scales or caps its logits) does not use; set train.targets=hard")
    classes, balance = balance_classes(train_rows, task, tcfg.balance, tcfg.balance_ratio)
    ckpt_dir = out_dir / paths.CHECKPOINTS_DIR
    metrics_file = out_dir / paths.TRAIN_METRICS
    on_cuda = torch.cuda.is_available()
    if tcfg.bf16 and not on_cuda:
        log.warning("train.bf16 ignored: no CUDA device (bf16 matmuls are emulated on CPU and far slower)")
    plan = plan_steps(tcfg, len(train_ds), int(os.environ.get("WORLD_SIZE", "1")))
    early_stopping = bool(tcfg.early_stopping_patience) and val_ds is not None
    # with early stopping and no train.eval_steps: a validation once per epoch
    eval_every = tcfg.eval_steps or (plan["steps_per_epoch"] if early_stopping else None)
    if early_stopping and eval_every >= plan["planned_steps"]:
        # a budget no longer than one validation period (profile=smoke, demo): nothing to stop on (the ladder and
        # evaluate measure the end), and the checkpoints stay every train.save_steps
        early_stopping, eval_every = False, tcfg.eval_steps
    evaluating = bool(eval_every) and val_ds is not None
    # the best checkpoint must exist when a validation finds it: with early stopping, a save at every validation
    save_every = eval_every if early_stopping and tcfg.save_steps % eval_every else tcfg.save_steps
    micro = max(d for d in range(1, min(tcfg.micro_batch_size or tcfg.batch_size, tcfg.batch_size) + 1)
                if tcfg.batch_size % d == 0)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=plan["planned_steps"],
        # A batch of batch_size examples runs as equal micro-batches and the optimizer steps once per batch: the
        # same gradient (the loss is summed over the batch's labelled tokens), the activations of a micro-batch.
        # Validation keeps no activations, so it runs whole batches (eval_loss is the same mean as before).
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum * (tcfg.batch_size // micro),
        learning_rate=tcfg.lr,
        # transformers' names; constant keeps the warm-up
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(tcfg.lr_schedule, tcfg.lr_schedule),
        warmup_steps=int(tcfg.warmup_ratio * plan["planned_steps"]),
        weight_decay=tcfg.weight_decay,
        logging_steps=1,
        save_steps=save_every,
        save_total_limit=2,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=eval_every if evaluating else None,
        load_best_model_at_end=early_stopping,
        # the quantity the routing rule gates on, not the val loss
        metric_for_best_model="eval_agreement" if early_stopping else None,
        greater_is_better=True if early_stopping else None,
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
    probe = _agreement_probe(cfg, task, val_rows, model, tokenizer) if evaluating else None
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                               processing_class=tokenizer, callbacks=callbacks, balance_classes=classes, soft=soft,
                               agreement=probe)
    if resume:
        log.info("resuming training from %s", resume.name)
    log.info("training %s: %d examples, %d trainable of %d parameters, %d process(es); %d steps (%s decides: "
             "%d steps per epoch)%s%s", scfg.name, len(train_ds), trainable, total, args.world_size,
             plan["planned_steps"], plan["decided_by"], plan["steps_per_epoch"],
             f", validation every {eval_every} steps" if evaluating else "",
             f", balanced batches ({balance['why']})" if balance["balanced"] else "")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    elapsed = time.perf_counter() - started
    session_tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    trainer.measure_agreement = False  # the curve is measured; the kept adapter's agreement is on it
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
    steps = trainer.state.global_step
    stopped_by, why = stop_reason(tcfg, plan, steps, early_stopping)
    log.info("train: %s", why)
    curve = [{"step": h["step"], "eval_agreement": h["eval_agreement"]} for h in evals if "eval_agreement" in h]
    best = trainer.state.best_model_checkpoint if early_stopping else None
    best_step = int(Path(best).name.rsplit("-", 1)[-1]) if best else None
    return {
        "steps": steps,
        "resumed_from": resume.name if resume else None,
        "epochs": tcfg.epochs,
        "max_steps": tcfg.max_steps,
        "steps_per_epoch": plan["steps_per_epoch"],
        "planned_steps": plan["planned_steps"],
        "epochs_trained": round(steps / plan["steps_per_epoch"], 3),
        "stopped_by": stopped_by,
        "stop_reason": why,
        "stopped_early": stopped_by == "early_stopping" or (stopped_by == "max_steps" and tcfg.epochs is not None),
        "best_checkpoint": Path(best).name if best else None,
        "val_agreements": curve,
        # the kept adapter's: the best checkpoint's with early stopping, else the last validation's if at the end
        "kept_val_agreement": next((c["eval_agreement"] for c in curve if c["step"] == best_step), None) if best
        else (curve[-1]["eval_agreement"] if curve and curve[-1]["step"] == steps else None),
        "balance": balance,
        "targets": tcfg.targets,
        "soft_targets": {"fields_by_source": dict(sources)} if soft else None,
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
