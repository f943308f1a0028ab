"""Find test items that exactly or nearly duplicate a training item, so headline metrics leave them out.

Exact: equal after lower-casing and dropping punctuation and extra spaces. Near: Jaccard similarity of character
shingles >= threshold; candidates come from datasketch's MinHash LSH and are confirmed with the exact Jaccard of
the shingle sets, so a reported pair always really is that similar.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, k: int) -> set[str]:
    norm = normalize(text)
    if len(norm) <= k:
        return {norm}
    return {norm[i:i + k] for i in range(len(norm) - k + 1)}


def find_duplicates(train: list[dict], test: list[dict], *, threshold: float = 0.8, num_perm: int = 128,
                    k: int = 5) -> dict[str, dict]:
    """Test items that duplicate a training item.

    Args:
        train, test: rows with "id" and "input".
        threshold: Jaccard similarity of character ``k``-shingles at or above which an item is a near duplicate.
    Returns:
        {test id: {"train_id", "kind": "exact"|"near", "jaccard"}} for every contaminated test item.
    """
    from datasketch import MinHash, MinHashLSH

    exact = {normalize(r["input"]): r["id"] for r in train}
    found: dict[str, dict] = {}
    for row in test:
        if (match := exact.get(normalize(row["input"]))) is not None:
            found[row["id"]] = {"train_id": match, "kind": "exact", "jaccard": 1.0}
    if threshold >= 1.0 or not train:
        return found

    def minhash(sh: set[str]) -> MinHash:
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sh])
        return m

    # A lower LSH threshold than the one confirmed below: MinHash estimates are noisy, the exact check is not.
    lsh = MinHashLSH(threshold=max(0.05, threshold - 0.15), num_perm=num_perm)
    train_sh = {}
    for row in train:
        sh = shingles(row["input"], k)
        train_sh[row["id"]] = sh
        lsh.insert(row["id"], minhash(sh), check_duplication=False)
    for row in test:
        if row["id"] in found:
            continue
        sh = shingles(row["input"], k)
        best_id, best = None, 0.0
        for cand in lsh.query(minhash(sh)):
            other = train_sh[cand]
            jac = len(sh & other) / len(sh | other)
            if jac > best:
                best_id, best = cand, jac
        if best_id is not None and best >= threshold:
            found[row["id"]] = {"train_id": best_id, "kind": "near", "jaccard": round(best, 4)}
    return found
