"""The SFT trainer train runs: length-grouped batches in an order fixed per epoch, and an LM head that scores only the
labelled positions (the memory that full-vocabulary logits at every position would take on CPU)."""

from __future__ import annotations

import torch

# Vocabulary columns per logit tile of the fused LM head (TRL's default).
_VOCAB_TILE = 32768

def _trainer_class():
    """SFTTrainer whose batches group examples of similar length (less padding), in an order fixed per epoch.

    transformers' length-grouped sampler draws its order from the global RNG when an epoch starts, which a resume
    restores only later, so a run resumed after the first epoch would see other batches; seeding the order by
    (seed, epoch) makes a resumed run train on exactly the batches an uninterrupted one does.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
    from trl import SFTTrainer

    class EpochSeededLengthSampler(LengthGroupedSampler):
        def __init__(self, *args, seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    class Trainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _score_labelled_positions_only(self.model.get_base_model() if hasattr(self.model, "get_base_model")
                                           else self.model)

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=[len(ids) for ids in dataset["input_ids"]],
                                            seed=self.args.data_seed if self.args.data_seed is not None
                                            else self.args.seed)

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

    text = model.config.get_text_config()
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling") if getattr(text, k, None) not in (None, 1.0)]
    if scaled or getattr(text, "output_router_logits", False):
        return
    trl_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or labels is None or shift_labels is not None:
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
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


