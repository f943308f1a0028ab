"""The student answering in this process: scored or free decoding for the LoRA students, heads for the classifier.

    preds = predict_in_process(cfg, task, rows, model, tokenizer)   # eval.decode: scored | free
    preds = predict_classifier(cfg, task, rows, EmbedClassifier.from_run(cfg, run_dir))

evaluate scores the trained student with these; publish reloads each safetensors artifact and asks it the same way
to measure its parity. Both return distill.student.predictions.Predictions and never raise on a bad answer.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from distill.config import Config
from distill.student.predictions import Predictions, count_reasons
from distill.student.scored import encode_left, scored_batch, token_ids
from distill.student.template import end_of_turn, render_prompt
from distill.task import OutputSchema, Task, dump_answer


def predict_classifier(cfg: Config, task: Task, rows: list[dict], clf) -> Predictions:
    """Answers of the embedding classifier (student=embed_classifier, distill.student.embed_classifier) for
    ``rows`` in batches of ``eval.batch_size``: each field's most probable value under its head; confidence = the
    product of the fields' top probabilities (each in field_confidence), like the scored LM's chain-rule
    probability, so coverage curves, calibration and the routing threshold read it the same way. An answer that
    breaks the schema is counted like any student's."""
    answers, raw, reasons, conf, fconf, lat = [], [], [], [], [], []
    bs = cfg.eval.batch_size
    started = time.perf_counter()
    for start in tqdm(range(0, len(rows), bs), desc="student (classifier)", unit="batch", leave=False):
        t0 = time.perf_counter()
        out = clf.predict([r["input"] for r in rows[start:start + bs]], bs)
        took = time.perf_counter() - t0
        for answer, c, fc in out:
            why = "schema_violation" if task.schema.errors(answer) else None
            answers.append(None if why else answer), raw.append(dump_answer(answer)), reasons.append(why)
            conf.append(None if why else c), fconf.append(fc), lat.append(round(took, 4))
    return Predictions(answers, raw, reasons, conf, lat, count_reasons(reasons), fconf,
                       wall_s=time.perf_counter() - started)


def predict_in_process(cfg: Config, task: Task, rows: list[dict], model, tokenizer) -> Predictions:
    """Student answers for ``rows`` in batches of ``eval.batch_size``.

    ``eval.decode=scored``: fields are filled in schema order; an enum field's allowed values are each scored by
    their teacher-forced log-likelihood after the answer so far (prompt KV cache shared by all candidates), and the
    softmax over allowed values gives the value and its probability. A free-text field is generated greedily
    after the answer so far, its confidence the mean token probability. Whole-answer confidence = the *product*
    of the field confidences (the chain-rule probability of the answer). ``free``: greedy free-form generation,
    confidence = the probability of the generated sequence. Never raises on a bad answer: it is counted.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eot = end_of_turn(tokenizer)
    prompts = [render_prompt(tokenizer, task.student_messages(r["input"])) for r in rows]
    answers, raw, reasons, conf, fconf, lat = [], [], [], [], [], []
    bs = cfg.eval.batch_size
    started = time.perf_counter()
    model.eval()
    for start in tqdm(range(0, len(prompts), bs), desc=f"student ({cfg.eval.decode})", unit="batch", leave=False):
        batch = prompts[start:start + bs]
        t0 = time.perf_counter()
        if cfg.eval.decode == "scored":
            out = scored_batch(model, tokenizer, batch, task.schema, eot, cfg.eval.max_new_tokens)
        else:
            out = _free_batch(model, tokenizer, batch, task.schema, eot, cfg.eval.max_new_tokens)
        took = time.perf_counter() - t0
        for ans, text, why, c, fc in out:
            answers.append(ans), raw.append(text), reasons.append(why), conf.append(c), fconf.append(fc)
            lat.append(round(took, 4))
    return Predictions(answers, raw, reasons, conf, lat, count_reasons(reasons), fconf,
                       wall_s=time.perf_counter() - started)


@torch.inference_mode()
def _free_batch(model, tokenizer, prompts: list[str], schema: OutputSchema, eot: str, max_new_tokens: int):
    """Greedy free-form answers up to the end-of-turn token; confidence = the generated sequence's probability."""
    stop_id = tokenizer.convert_tokens_to_ids(eot)
    ids, mask = encode_left(tokenizer, [token_ids(tokenizer, p) for p in prompts])
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, output_scores=True,
                         return_dict_in_generate=True)
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
    results = []
    for row, scores in zip(out.sequences[:, ids.shape[1]:].cpu(), steps):
        toks = row.tolist()
        end = toks.index(stop_id) + 1 if stop_id in toks else len(toks)
        text = tokenizer.decode(toks[:end], skip_special_tokens=True)
        answer, why = schema.parse(text)
        confidence = float(math.exp(scores[:end].sum())) if answer is not None else None
        results.append((answer, text, why, confidence, None))
    return results

