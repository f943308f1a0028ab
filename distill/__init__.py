"""distill: turn an expensive teacher LLM into a cheap specialist student for one task type.

    python -m distill run recipe=support_tickets            # generate -> train -> evaluate -> publish
    python -m distill evaluate recipe=support_tickets run_dir=runs/support_tickets/X

Every error type distill raises lives here, so a caller catches them from one place: ``DistillError`` (one line
that names the problem and what to do; the CLI prints it and exits 2) and its kinds below.
"""

__version__ = "0.2.0"


class DistillError(Exception):
    """A user-facing error: its message is one line that names the problem and what to do."""


class GateFailed(DistillError):
    """The evaluate gate failed: the message says which threshold and by how much (the CLI exits 3)."""


class EndpointFailed(DistillError):
    """The scored endpoint gave no valid answer at all (down, wrong URL, or garbage); the report counts why."""


class RoutingRuleError(DistillError):
    """A routing file that is missing, unreadable or breaks the schema."""


class LedgerWriteError(DistillError):
    """The ledger could not record a paid answer: the run stops rather than pay on without a record."""
