"""train: LoRA SFT of the student on the teacher's labels (TRL SFTTrainer + peft) -> train/adapter/.

    python -m distill train recipe=support_tickets run_dir=DIR [train.max_steps=100] [student=phi3_mini train=qlora]

Loss is on the answer tokens and the end-of-turn token only (see distill.template). Checkpoints go to
train/checkpoints/ every train.save_steps; re-running the stage resumes from the last complete one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from distill import DistillError, paths, runio
from distill.config import Config
from distill.task import Task, dump_answer, load_split
from distill.template import encode_example, end_of_turn

log = logging.getLogger("distill")


def build_dataset(rows: list[dict], task: Task, tokenizer, max_len: int):
    from datasets import Dataset

    eot = end_of_turn(tokenizer)
    encoded = [encode_example(tokenizer, task.student_messages(r["input"]), dump_answer(r["teacher"]), max_len, eot)
               for r in rows]
    return Dataset.from_list(encoded)


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint-N folder that holds everything a resume needs; half-written ones are skipped."""
    needed = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
    candidates = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                        if p.name.split("-")[-1].isdigit() else -1, reverse=True)
    for cand in candidates:
        if all((cand / f).exists() and (cand / f).stat().st_size > 0 for f in needed):
            try:
                json.loads((cand / "trainer_state.json").read_text())
            except json.JSONDecodeError:
                log.warning("skipping checkpoint %s: trainer_state.json is corrupt", cand.name)
                continue
            return cand
        log.warning("skipping incomplete checkpoint %s", cand.name)
    return None


def run(cfg: Config, run_dir: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distill.models import load_base

    out_dir = paths.stage_dir(run_dir, "train")
    tcfg, scfg = cfg.train, cfg.student
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    task = Task(cfg)
    train_rows = load_split(run_dir, "train")
    val_rows = load_split(run_dir, "val")
    if not train_rows:
        raise DistillError(f"the train split in {paths.split_path(run_dir, 'train')} is empty; label more inputs "
                           f"(generate.limit) or lower generate.split.test")

    model, tokenizer = load_base(cfg)
    if tcfg.method == "qlora" and not scfg.load_in_4bit:
        raise DistillError("train=qlora needs a 4-bit base: set student.load_in_4bit=true (CUDA only)")
    if scfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=scfg.gradient_checkpointing)
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
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.batch_size,
        per_device_eval_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(tcfg.warmup_ratio * tcfg.max_steps),
        weight_decay=tcfg.weight_decay,
        logging_steps=1,
        save_steps=tcfg.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if (tcfg.eval_steps and val_ds is not None) else "no",
        eval_steps=tcfg.eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # SFTConfig defaults to bf16 + activation checkpointing; bf16 matmuls are emulated on most CPUs (~20x
        # slower), so both are set explicitly from our config.
        bf16=tcfg.bf16 and on_cuda,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding on CPU
        use_cpu=not on_cuda,
        activation_checkpointing=scfg.gradient_checkpointing,
        max_length=scfg.max_seq_len,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )

    class MetricsLog(TrainerCallback):
        """Append every logged step (loss, lr, tokens/s) to train/metrics.jsonl."""

        def __init__(self):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {"step": state.global_step, **(logs or {})}
            row["elapsed_s"] = round(time.perf_counter() - self.started, 3)
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, callbacks=[MetricsLog()])
    resume = last_complete_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume:
        log.info("resuming training from %s", resume.name)
    else:
        metrics_file.unlink(missing_ok=True)
    tokens = sum(len(x) for x in train_ds["input_ids"])
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    elapsed = time.perf_counter() - started
    val_loss = trainer.evaluate()["eval_loss"] if val_ds is not None else None

    adapter_dir = paths.adapter_path(run_dir)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    mean_len = tokens / max(len(train_ds), 1)
    seen_tokens = mean_len * tcfg.batch_size * tcfg.grad_accum * tcfg.max_steps
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume.name if resume else None,
        "train_examples": len(train_ds),
        "val_examples": len(val_ds) if val_ds is not None else 0,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "val_loss": val_loss,
        "trainable_params": trainable,
        "total_params": total,
        "tokens_per_s": round(seen_tokens / elapsed, 1) if elapsed > 0 else None,
        "device": "cuda" if on_cuda else "cpu",
        "threads": torch.get_num_threads(),
        "adapter_sha256": runio.sha256_tree(adapter_dir),
        "end_of_turn": end_of_turn(tokenizer),
    }
