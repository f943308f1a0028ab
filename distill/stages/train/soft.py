"""Soft targets (``train.targets=soft``): the LM student learns the teacher's distribution over each enum field's
values, not only its top value.

The loss. An answer is trained token by token on the teacher's answer (hard targets). For each enum field, the
position where the allowed values' tokenizations first differ (the value's first token, given the answer so far) is
trained instead on the cross-entropy between the teacher's distribution and the student's full-vocabulary softmax
there: ``-sum_v p_teacher(v) * log q_student(first_token(v))``, values sharing a first token pooling their
probability. Its minimum puts the teacher's probabilities on those tokens and nothing elsewhere, and for a one-hot
teacher it is the hard loss exactly (the test checks this). The value's later tokens keep the hard targets, so the
loss's normalisation (labelled tokens of the batch) is unchanged.

The teacher's distribution of a training row, field by field, in this order:
- ``provenance.distribution[field]``: {value as text: probability}, renormalised over the allowed values (what
  teacher.method=score writes: the calibrated distribution, a value left out read as 0);
- ``provenance.confidence[field]`` alone (data labelled before the score method wrote its distribution): that
  probability on the teacher's value, the rest spread evenly over the other values;
- otherwise (trusted labels, teacher.method=generate) one-hot: the same loss as hard targets.
"""

from __future__ import annotations

from collections import Counter

import torch

from distill.task import Task, common_prefix, dump_answer, value_text

SOFT_COLUMNS = ("soft_pos", "soft_tokens", "soft_probs")


def teacher_distribution(row: dict, field: str, values: list) -> tuple[list[float], str]:
    """(probability per allowed value, in ``values`` order; where it came from: distribution|confidence|one_hot)."""
    prov = row.get("provenance") or {}
    hard = value_text(row["teacher"][field])
    texts = [value_text(v) for v in values]
    dist = (prov.get("distribution") or {}).get(field)
    if isinstance(dist, dict):
        probs = [max(float(dist.get(t, 0.0)), 0.0) for t in texts]
        total = sum(probs)
        if total > 0:
            return [p / total for p in probs], "distribution"
    conf = (prov.get("confidence") or {}).get(field) if isinstance(prov.get("confidence"), dict) else None
    if isinstance(conf, (int, float)) and 0 < conf < 1 and len(values) > 1:
        rest = (1.0 - conf) / (len(values) - 1)
        return [float(conf) if t == hard else rest for t in texts], "confidence"
    return [1.0 if t == hard else 0.0 for t in texts], "one_hot"


def soft_columns(row: dict, task: Task, tokenizer, encoded: dict, eot: str) -> tuple[dict, Counter]:
    """The soft_* columns of one encoded example (distill.student.template.encode_example output) and the count of
    its fields by the source of their distribution.

    soft_pos: index in input_ids of each enum field's first value token; soft_tokens / soft_probs: the distinct
    candidate first tokens there and the teacher's probability of each."""
    answer = row["teacher"]
    answer_ids = tokenizer(dump_answer(answer) + eot, add_special_tokens=False)["input_ids"]
    start = len(encoded["input_ids"]) - len(answer_ids)
    if encoded["input_ids"][start:] != answer_ids:
        raise ValueError("the encoded example does not end with its answer's tokens")
    cols = {"soft_pos": [], "soft_tokens": [], "soft_probs": []}
    sources: Counter = Counter()
    for field, values in task.schema.enums.items():
        if field not in answer:
            continue
        probs, source = teacher_distribution(row, field, values)
        cands = [tokenizer(dump_answer({**answer, field: v}) + eot, add_special_tokens=False)["input_ids"]
                 for v in values]
        others = [c for c, v in zip(cands, values) if value_text(v) != value_text(answer[field])]
        if not others:
            continue
        d = min(common_prefix(c, answer_ids) for c in others)
        pooled: dict[int, float] = {}
        for c, p in zip(cands, probs):
            pooled[c[d]] = pooled.get(c[d], 0.0) + p
        cols["soft_pos"].append(start + d)
        cols["soft_tokens"].append(list(pooled))
        cols["soft_probs"].append([pooled[t] for t in pooled])
        sources[source] += 1
    return cols, sources


class SoftTargetCollator:
    """TRL's collator, plus the soft targets of the batch as flat indices into its [rows x tokens] input_ids:
    soft_index [S], soft_tokens [S x K] and soft_probs [S x K] (padded with probability 0)."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __call__(self, examples: list[dict]) -> dict:
        soft = [{k: ex.pop(k, None) for k in SOFT_COLUMNS} for ex in examples]
        out = self.base(examples)
        width = out["input_ids"].shape[1]
        packed = out["input_ids"].shape[0] == 1 and len(examples) > 1
        index, tokens, probs, offset = [], [], [], 0
        for b, (ex, s) in enumerate(zip(examples, soft)):
            base = offset if packed else b * width
            for pos, toks, ps in zip(s["soft_pos"] or [], s["soft_tokens"] or [], s["soft_probs"] or []):
                index.append(base + pos)
                tokens.append(list(toks))
                probs.append(list(ps))
            offset += len(ex["input_ids"])
        k = max((len(t) for t in tokens), default=1)
        out["soft_index"] = torch.tensor(index, dtype=torch.long)
        out["soft_tokens"] = torch.tensor([t + [0] * (k - len(t)) for t in tokens] or [[0] * k], dtype=torch.long)[
            :len(tokens)]
        out["soft_probs"] = torch.tensor([p + [0.0] * (k - len(p)) for p in probs] or [[0.0] * k])[:len(tokens)]
        return out


def soft_log_probs(log_probs: torch.Tensor, hidden: torch.Tensor, head, soft_index: torch.Tensor,
                   soft_tokens: torch.Tensor, soft_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs`` [rows x tokens-1] (the labelled tokens' log-probabilities, zero elsewhere) with each soft
    position's entry replaced by ``sum_k p_k log q(token_k)`` (minus the soft cross-entropy), q the full softmax.
    ``hidden`` [rows x tokens-1 x d] predicts token t+1 at t; ``soft_index`` are flat indices of predicted tokens."""
    width = hidden.shape[1] + 1
    rows, cols = soft_index // width, soft_index % width - 1
    h = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    logits = h @ head.weight.T
    if head.bias is not None:
        logits = logits + head.bias
    logq = torch.log_softmax(logits.float(), -1)
    soft = (soft_probs.to(logq.device) * logq.gather(1, soft_tokens.to(logq.device))).sum(-1)
    return log_probs.index_put((rows.to(log_probs.device), cols.to(log_probs.device)), soft.to(log_probs.dtype))
