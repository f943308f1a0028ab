"""``NotInRun``: what a notebook view returns for a table or plot the run does not have."""

from __future__ import annotations


class NotInRun:
    """Stands in for a table or plot the run does not have; shows one line and is falsy."""

    def __init__(self, what: str, why: str):
        self.what, self.why = what, why

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"not in this run: {self.what} ({self.why})"

    def _repr_markdown_(self) -> str:
        return f"*not in this run: {self.what} ({self.why})*"
