"""Dataset QA before anything is paid for or split: PII redaction, exact and near-duplicate removal, leak-free splits.

Near-duplicates are found with MinHash over word 3-grams and locality-sensitive hashing (``datasketch``); a group of
near-duplicates keeps its first member, and the split of every member is decided by the group, so a paraphrase of a
test item can never sit in train.
"""

from __future__ import annotations

import re
from collections import Counter

from distill import paths, runio

# Emails, phone numbers (7+ digits with separators, optional +country code) and payment card numbers (13-19 digits
# that pass the Luhn check). Replaced before any text leaves the machine; counted by kind.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact(text: str) -> tuple[str, Counter]:
    """Replace emails, card numbers and phone numbers with [EMAIL], [CARD], [PHONE]; count each kind."""
    counts: Counter = Counter()

    def card(m: re.Match) -> str:
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            counts["card"] += 1
            return "[CARD]"
        return m.group()

    def phone(m: re.Match) -> str:
        if len(re.sub(r"\D", "", m.group())) < 7:
            return m.group()
        counts["phone"] += 1
        return "[PHONE]"

    def email(m: re.Match) -> str:
        counts["email"] += 1
        return "[EMAIL]"

    text = _EMAIL.sub(email, text)
    text = _CARD.sub(card, text)
    text = _PHONE.sub(phone, text)
    return text, counts


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _shingles(text: str) -> set[bytes]:
    words = normalise(text).split()
    if len(words) < 3:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)}


def duplicate_groups(texts: list[str], threshold: float, num_perm: int, seed: int = 0) -> list[int]:
    """Group id per text: exact duplicates (after normalisation) and near-duplicates share the first one's index."""
    from datasketch import MinHash, MinHashLSH

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
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, text in enumerate(texts):
        norm = normalise(text)
        if norm in exact:
            union(exact[norm], i)
            continue
        exact[norm] = i
        mh = MinHash(num_perm=num_perm, seed=seed)
        mh.update_batch(list(_shingles(text)))
        for j in lsh.query(mh):
            union(int(j), i)
        lsh.insert(str(i), mh)
    return [find(i) for i in range(len(texts))]


def assign_split(text: str, fractions: dict[str, float], seed: int) -> str:
    """Deterministic split from a hash of the normalised text: identical texts always share a split."""
    u = int(runio.sha256_text(f"{seed}:{normalise(text)}")[:12], 16) / float(1 << 48)
    edge = 0.0
    for split in paths.SPLITS:
        edge += fractions[split]
        if u < edge:
            return split
    return paths.SPLITS[-1]
