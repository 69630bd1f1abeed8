"""The cyclic garbage collector and the catalogue loaded at start.

A registry that loaded 10,000 plugins and their change log holds a few hundred
thousand long-lived objects. Every full collection walks all of them again, though
they stay until the process ends or the plugin changes: at a 10 s health interval a
quarter or more of the idle CPU went there. :func:`settle` moves what start-up
built out of the collector's sight (``gc.freeze``): it is still freed the usual
way, by reference counts, when a plugin changes or goes; only reference cycles
among those objects would outlive their use, and start-up's own garbage is
collected first.

Once per process, and only after a large load (a process that runs many small
registries, a test run, keeps the collector as it is).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Plugin states loaded (catalogue and change log) from which freezing is worth it.
LARGE_LOAD = 1_000

_settled = False


def settle(loaded: int) -> bool:
    """Collect start-up's garbage and freeze what is left, if ``loaded`` is large.

    Returns whether it did (at most once per process).
    """
    global _settled
    if _settled or loaded < LARGE_LOAD:
        return False
    _settled = True
    gc.collect()
    gc.freeze()
    log.debug("start-up objects frozen: %d", gc.get_freeze_count())
    return True
