"""The split rule: a deterministic split from a hash of the normalised text, so identical texts share a split.

Generate passes the text of each input's near-duplicate group's first member (``dedup.duplicate_groups``), so a
paraphrase of a test item can never sit in train.
"""

from __future__ import annotations

from distill import paths, runio
from distill.data.dedup import normalise


def assign_split(text: str, fractions: dict[str, float], seed: int) -> str:
    """Deterministic split from a hash of the normalised text: identical texts always share a split."""
    u = int(runio.sha256_text(f"{seed}:{normalise(text)}")[:12], 16) / float(1 << 48)
    edge = 0.0
    for split in paths.SPLITS:
        edge += fractions[split]
        if u < edge:
            return split
    return paths.SPLITS[-1]
