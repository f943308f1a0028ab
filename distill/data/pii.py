"""PII redaction before any text leaves the machine: emails, payment card numbers and phone numbers.

    python -m distill generate recipe=support_tickets generate.redact_pii=true
"""

from __future__ import annotations

import re
from collections import Counter

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
