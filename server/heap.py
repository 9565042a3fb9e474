"""The server process's C heap over a long set: two malloc arenas, not one per contention.

glibc hands a thread that finds its malloc arena locked a new arena, up to eight per
core, and every arena keeps the memory it grew. The server's threads (the event loop,
inference, the sender, the MIDI and OSC callbacks) rarely collide on an idle machine,
but when another program keeps the cores busy a thread is often preempted while it
holds an arena's lock, the others are sent to new arenas, and each of those grows its
own heap. Measured on a 2-vCPU VM (``divergent bench soak``, Intel Xeon): the server
held 18 arena heaps, and its RSS rose in steps of 5–8 MB in the minute another CPU job
started, every time. With two arenas the same contention reuses what is there.

Python offers no binding for ``mallopt``; this is the one call to it, through ctypes.
``MALLOC_ARENA_MAX`` in the environment, if set, wins (glibc reads it at start).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas"]

log = logging.getLogger(__name__)

#: arenas for the server process: the main thread's and one shared by all others
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's <malloc.h>


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; True when the cap was set.

    Call it before the server starts its threads: arenas that exist stay. False (and
    nothing changed) where the C library has no ``mallopt`` (macOS, Windows, musl
    returns 0), or where ``MALLOC_ARENA_MAX`` is set in the environment.
    """
    if arenas < 1:
        raise ValueError(f"arenas must be at least 1, got {arenas}")
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, done)
    return done
