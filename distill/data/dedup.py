"""The one deduper: exact duplicates after normalising, near-duplicates by MinHash LSH (datasketch).

    python -m distill generate recipe=support_tickets generate.dedup.threshold=0.8     # inputs (word 3-grams)
    python -m distill evaluate run_dir=DIR eval.decontam.threshold=0.8                # test vs train (5-char shingles)

Exact: equal after lower-casing and dropping punctuation and extra spaces (``normalise``). Near: the Jaccard
similarity of the texts' shingle sets is at least ``threshold``. For decontamination the LSH looks a little below
the threshold (MinHash estimates are noisy) and each candidate is confirmed with the exact Jaccard of the shingle
sets, so a reported pair always really is that similar; generate's dedup takes the LSH's estimate as it is
(``generate.dedup.threshold`` is documented as one). Generate groups its inputs (``duplicate_groups``: a group keeps
its first member and decides every member's split); evaluate finds test items that duplicate a training item
(``find_duplicates``) and leaves them out of the headline metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")
LSH_MARGIN = 0.15  # how far below ``threshold`` the LSH looks for candidates (the exact check decides)


def normalise(text: str) -> str:
    """Lower-cased words joined by single spaces: punctuation and extra whitespace dropped."""
    return " ".join(_WORD.findall(text.lower()))


def word_shingles(text: str, n: int = 3) -> set[str]:
    """Word ``n``-grams of the normalised text (the whole text when it is shorter)."""
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def char_shingles(text: str, k: int = 5) -> set[str]:
    """Character ``k``-grams of the normalised text (the whole text when it is shorter)."""
    norm = normalise(text)
    if len(norm) <= k:
        return {norm}
    return {norm[i:i + k] for i in range(len(norm) - k + 1)}


class NearDuplicates:
    """An index of texts by their shingles: ``matches(text)`` gives the indexed keys at least ``threshold`` similar.

    ``exact=True`` (decontamination): LSH candidates from ``LSH_MARGIN`` below the threshold, each confirmed with
    the exact Jaccard of the shingle sets. ``exact=False`` (generate's ``generate.dedup``, documented as an
    estimate): every LSH candidate at the threshold counts, with its MinHash estimate; it errs towards grouping,
    which for a dataset only moves a borderline paraphrase into its original's split.
    """

    def __init__(self, threshold: float, num_perm: int, shingles: Callable[[str], set[str]] = word_shingles,
                 seed: int = 1, *, exact: bool = True):
        self.threshold, self.num_perm, self.shingles, self.seed, self.exact = threshold, num_perm, shingles, seed, exact
        lsh_threshold = max(0.05, threshold - LSH_MARGIN) if exact else threshold
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
        self.sets: dict[str, set[str]] = {}
        self.hashes: dict[str, MinHash] = {}

    def _minhash(self, shingle_set: set[str]) -> MinHash:
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch([s.encode("utf-8") for s in shingle_set])
        return m

    def add(self, key: str, text: str) -> None:
        sh = self.shingles(text)
        self.sets[key], self.hashes[key] = sh, self._minhash(sh)
        self.lsh.insert(key, self.hashes[key], check_duplication=False)

    def matches(self, text: str) -> list[tuple[str, float]]:
        """(key, similarity) of every indexed text at least ``threshold`` similar, most similar first; similarity
        is the exact Jaccard, or the MinHash estimate when ``exact=False``."""
        sh = self.shingles(text)
        mh = self._minhash(sh)
        found = []
        for key in self.lsh.query(mh):
            if not self.exact:
                found.append((key, mh.jaccard(self.hashes[key])))
                continue
            other = self.sets[key]
            jaccard = len(sh & other) / len(sh | other)
            if jaccard >= self.threshold:
                found.append((key, jaccard))
        return sorted(found, key=lambda kv: (-kv[1], kv[0]))


def duplicate_groups(texts: list[str], threshold: float, num_perm: int, seed: int = 0,
                     shingles: Callable[[str], set[str]] = word_shingles) -> list[int]:
    """Group id per text: exact duplicates (after normalising) and near-duplicates (transitively, by the MinHash
    estimate: ``NearDuplicates(exact=False)``) share the index of the group's first text."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    exact: dict[str, int] = {}
    index = NearDuplicates(threshold, num_perm, shingles, seed, exact=False)
    for i, text in enumerate(texts):
        norm = normalise(text)
        if norm in exact:
            union(exact[norm], i)
            continue
        exact[norm] = i
        for key, _ in index.matches(text):
            union(int(key), i)
        index.add(str(i), text)
    return [find(i) for i in range(len(texts))]


def find_duplicates(train: Iterable[dict], test: Iterable[dict], *, threshold: float = 0.8, num_perm: int = 128,
                    k: int = 5) -> dict[str, dict]:
    """Test items that duplicate a training item (decontamination).

    Args:
        train, test: rows with "id" and "input".
        threshold: Jaccard similarity of character ``k``-shingles at or above which an item is a near duplicate.
    Returns:
        {test id: {"train_id", "kind": "exact"|"near", "jaccard"}} for every contaminated test item.
    """
    train, test = list(train), list(test)
    exact = {normalise(r["input"]): r["id"] for r in train}
    found: dict[str, dict] = {}
    for row in test:
        if (match := exact.get(normalise(row["input"]))) is not None:
            found[row["id"]] = {"train_id": match, "kind": "exact", "jaccard": 1.0}
    if threshold >= 1.0 or not train:
        return found
    index = NearDuplicates(threshold, num_perm, lambda text: char_shingles(text, k), seed=1)
    for row in train:
        index.add(row["id"], row["input"])
    for row in test:
        if row["id"] not in found and (matches := index.matches(row["input"])):
            train_id, jaccard = matches[0]
            found[row["id"]] = {"train_id": train_id, "kind": "near", "jaccard": round(jaccard, 4)}
    return found
