"""distill: turn an expensive teacher LLM into a cheap specialist student for one task type.

    python -m distill run recipe=support_tickets            # generate -> train -> evaluate -> publish
    python -m distill evaluate recipe=support_tickets run_dir=runs/support_tickets/X
"""

__version__ = "0.2.0"


class DistillError(Exception):
    """A user-facing error: its message is one line that names the problem and what to do."""
