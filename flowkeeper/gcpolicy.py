"""The cyclic garbage collector's first threshold in a process serving the endpoint.

CPython collects its youngest generation every 700 net allocations of
container objects, and each collection also walks everything allocated
since the last one that is still alive.  An invocation keeps a run's
history, coroutines and records alive across many such collections: with
64 workflows in flight, collections took about 18 % of the endpoint's CPU
(``bench.compare``).  Raising the first threshold to 20,000 gave 15-27 %
more workflows per second in the same benchmark (README, Performance),
for at most that many more young objects waiting to be collected.

Only raised, never lowered, and only while the collector is on: a process
that set its own thresholds higher, or turned collection off, is left alone.
``FlowKeeper(gc_threshold=None)`` leaves it alone too.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_GEN0", "check_gc_threshold", "raise_threshold"]

logger = logging.getLogger("flowkeeper")

#: The first threshold FlowKeeper's serving app sets by default.
DEFAULT_GEN0 = 20_000
_MAX = 10_000_000


def check_gc_threshold(value: Any) -> int | None:
    """``FlowKeeper(gc_threshold=...)``: a whole number from 700 to 10,000,000, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 700 <= value <= _MAX:
        raise ConfigurationError(
            "gc_threshold must be a whole number from 700 (CPython's own first threshold) "
            f"to {_MAX:,}, or None to leave the garbage collector alone; got {value!r:.100}"
        )
    return value


def raise_threshold(gen0: int | None) -> bool:
    """Raise the collector's first threshold to ``gen0`` if it is lower; True if raised."""
    if gen0 is None or not gc.isenabled():
        return False
    first, *rest = gc.get_threshold()
    if first >= gen0:
        return False
    gc.set_threshold(gen0, *rest)
    logger.debug("garbage collector: first threshold raised from %d to %d", first, gen0)
    return True
