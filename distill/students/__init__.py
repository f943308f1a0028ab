"""Students other than the LoRA causal LMs (distill.models, distill.stages.train): the rungs below them."""
