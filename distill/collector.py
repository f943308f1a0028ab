"""Fewer garbage-collector pauses on the hot loops: the gateway's request path and the teacher's labelling loop.

    with fewer_collections():   # around one labelling loop; the process's settings are back afterwards
        ...

Both loops allocate many short-lived objects per request (headers, JSON, ledger rows). CPython collects its
youngest generation every 700 allocations, so the objects of requests in flight are promoted and rescanned many
times a second, and a full collection walks every object alive (torch, transformers, the config) for nothing.
Collecting the youngest generation every ``GC_GEN0`` allocations and moving what is alive at the start out of the
collector's reach (``gc.freeze``) removes most of that; cycles are still collected.
"""

from __future__ import annotations

import contextlib
import gc

# Allocations between two collections of the youngest generation on a hot loop (CPython's default: 700).
GC_GEN0 = 50_000


def tune_for_good() -> None:
    """The settings for a process that is only a hot loop from now on (``distill serve``): kept until it exits."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


@contextlib.contextmanager
def fewer_collections():
    """The same settings for one loop inside a longer process (generate's labelling, a notebook): restored after.
    A heap frozen before (a gateway's) stays frozen."""
    saved, ours = gc.get_threshold(), gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    gc.set_threshold(max(GC_GEN0, saved[0]), *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        if ours:
            gc.unfreeze()
