"""The SFT trainer train runs: batches in an order fixed per epoch (length-grouped, or round-robin over the teacher's
labels when they are skewed), an LM head that scores only the labelled positions (the memory that full-vocabulary
logits at every position would take on CPU), soft targets on enum values' first tokens, and the val agreement with
the teacher measured at every validation."""

from __future__ import annotations

import torch

# Vocabulary columns per logit tile of the fused LM head (TRL's default).
_VOCAB_TILE = 32768

def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class ClassRoundRobinSampler(torch.utils.data.Sampler):
    """One epoch = len(classes) draws, round-robin over the classes (a fresh class order every round), each class's
    examples in a shuffled order that restarts when used up: every run of n_classes consecutive draws holds each
    class once, so a rare label is trained as often as a common one (its examples repeat, a common one's are
    subsampled within an epoch and rotate across epochs). The order is fixed by (seed, epoch), as a resume needs."""

    def __init__(self, classes: list[int], seed: int):
        self.classes, self.seed, self.epoch = list(classes), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        generator = _epoch_generator(self.seed, self.epoch)
        members: dict[int, list[int]] = {}
        for i, c in enumerate(self.classes):
            members.setdefault(c, []).append(i)
        pools = {c: [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
                 for c, idx in sorted(members.items())}
        keys = sorted(pools)
        taken = dict.fromkeys(keys, 0)
        out: list[int] = []
        while len(out) < len(self.classes):
            for k in torch.randperm(len(keys), generator=generator).tolist():
                c = keys[k]
                out.append(pools[c][taken[c] % len(pools[c])])
                taken[c] += 1
                if len(out) == len(self.classes):
                    break
        return iter(out)


def _trainer_class():
    """SFTTrainer whose batches group examples of similar length (less padding), in an order fixed per epoch, or
    balance the teacher's labels (``balance_classes``: ClassRoundRobinSampler); soft targets (``soft=True``: the
    dataset's soft_* columns reach the loss); ``agreement``: a function of no argument returning the val agreement
    with the teacher, logged as eval_agreement at every validation during training (``measure_agreement``).

    transformers' length-grouped sampler draws its order from the global RNG when an epoch starts, which a resume
    restores only later, so a run resumed after the first epoch would see other batches; seeding the order by
    (seed, epoch) makes a resumed run train on exactly the batches an uninterrupted one does.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
    from trl import SFTTrainer

    from distill.stages.train.soft import SOFT_COLUMNS, SoftTargetCollator

    class EpochSeededLengthSampler(LengthGroupedSampler):
        def __init__(self, *args, seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = _epoch_generator(self.seed, self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    class Trainer(SFTTrainer):
        def __init__(self, *args, balance_classes: list[int] | None = None, soft: bool = False, agreement=None,
                     **kwargs):
            self.balance_classes, self.soft, self.agreement = balance_classes, soft, agreement
            self.measure_agreement = agreement is not None
            super().__init__(*args, **kwargs)
            _score_labelled_positions_only(self.model.get_base_model() if hasattr(self.model, "get_base_model")
                                           else self.model)
            if soft:  # TRL refuses a custom collator with padding-free batches: wrap the one it built
                self.data_collator = SoftTargetCollator(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self.soft and not set(SOFT_COLUMNS) <= set(self._signature_columns):
                self._signature_columns = [*self._signature_columns, *SOFT_COLUMNS]

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            if getattr(self, "balance_classes", None) is not None:
                return ClassRoundRobinSampler(self.balance_classes, seed=seed)
            return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=[len(ids) for ids in dataset["input_ids"]], seed=seed)

        def evaluation_loop(self, *args, **kwargs):
            out = super().evaluation_loop(*args, **kwargs)
            if self.agreement is not None and self.measure_agreement:
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                out.metrics[f"{prefix}_agreement"] = self.agreement()
            return out

    return Trainer


def _score_labelled_positions_only(model) -> None:
    """Make TRL's fused LM head project only the positions that carry a label, on every device.

    SFTTrainer computes the loss through a fused head (``model(..., fused_lm_head=True)``) that never builds the
    full logits, but off CUDA/XPU it scores every position, prompt and padding included, and masks afterwards: on CPU
    that is [tokens, 32768] fp32 logit tiles and their softmax temporaries (about 1 GB) for the ~15% of positions
    that have a label. This forward selects the labelled positions first, then calls the same TRL kernel, so the
    per-token log-probabilities, entropy and accuracy are the ones TRL computes. Models whose head scales or caps its
    logits, or that add a router loss, keep TRL's forward.
    """
    import types

    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    from distill.stages.train.soft import soft_log_probs

    text = model.config.get_text_config()
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling") if getattr(text, k, None) not in (None, 1.0)]
    if scaled or getattr(text, "output_router_logits", False):
        return
    trl_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                soft_index=None, soft_tokens=None, soft_probs=None, **kwargs):
        if not fused_lm_head or labels is None or shift_labels is not None:
            if soft_index is not None and fused_lm_head:
                raise ValueError("soft targets need the labelled-positions head (a model whose head scales or caps "
                                 "its logits keeps TRL's forward): set train.targets=hard")
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        head = self.get_output_embeddings()
        scored = ChunkedLogProbFunction.apply(hidden[mask], head.weight, head.bias, labels[mask], 1.0, _VOCAB_TILE,
                                              None, 1.0, ("log_probs", "entropy", "is_top1"))
        # masked_scatter keeps the loss connected to the model when a batch has no label at all
        log_probs, entropy, _, _, is_top1 = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                                             for x in scored)
        if soft_index is not None and soft_index.numel():
            log_probs = soft_log_probs(log_probs, hidden, head, soft_index, soft_tokens, soft_probs)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._distill_labelled_head = True  # soft targets need this forward (train checks it)


