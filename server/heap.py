"""The server process's C heap over a long set: two malloc arenas, not one per contention,
large blocks mapped on their own, and free pages given back between answers.

glibc hands a thread that finds its malloc arena locked a new arena, up to eight per
core, and every arena keeps the memory it grew. The server's threads (the event loop,
inference, the sender, the MIDI and OSC callbacks) rarely collide on an idle machine,
but when another program keeps the cores busy a thread is often preempted while it
holds an arena's lock, the others are sent to new arenas, and each of those grows its
own heap. Measured on a 2-vCPU VM (``divergent bench soak``, Intel Xeon): the server
held 18 arena heaps, and its RSS rose in steps of 5–8 MB in the minute another CPU job
started, every time. With two arenas the same contention reuses what is there.

Python offers no binding for ``mallopt``; :func:`_mallopt` is the one call to it, through
ctypes. ``MALLOC_ARENA_MAX`` and ``MALLOC_MMAP_THRESHOLD_`` in the environment, if set,
win (glibc reads them at start).

Each answer's prefill allocates buffers whose size follows the prompt's length (the
attention scores alone are up to 4.7 MB). ONNX Runtime's arena kept them, and grew in
steps as prompts of new lengths fragmented it; with the arena off
(``model.runtime.session_options``) they come from malloc each call, and glibc's default
*dynamic* mmap threshold then put them in the heap: after a mapped block is freed the
threshold rises to its size (up to 32 MB), so the next blocks of that size come from the
heap and stay resident when freed. :func:`fix_mmap_threshold` pins the threshold at
128 KiB: a prefill's large buffers are mapped and unmapped each call, and the heap holds
small blocks only. Measured on a 2-vCPU AMD EPYC, ``RssAnon`` after each call,
a trim every 5: over 200 prefills of random lengths on a pair decoder (after one of the
longest), the arena and the dynamic threshold +3.0 MB (median), +4.3 MB at most, the
fixed threshold without the arena +0.0 MB (median), +0.8 at most; over 60 whole answers
of the base model and two concepts, no arena with the dynamic threshold rose up to
+20 MB between two trims, with the fixed one −1.1 to +2.2 MB. Prefill and step times,
the two ways interleaved in one process: within 4 % of each other, both ways round.

``malloc_trim`` hands the whole free pages inside the heap back (glibc's ``free`` only
trims the top): :class:`HeapTrimmer` calls it on the inference worker after an answer,
at most every few seconds: 0.36 ms a call (max 0.94 ms).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "MALLOC_ARENAS",
    "MMAP_THRESHOLD",
    "TRIM_INTERVAL_S",
    "HeapTrimmer",
    "fix_mmap_threshold",
    "limit_malloc_arenas",
    "trim_heap",
]

log = logging.getLogger(__name__)

#: arenas for the server process: the main thread's and one shared by all others
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's <malloc.h>
#: blocks of this many bytes or more are mapped on their own and unmapped when freed
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, here kept for the process's life
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
#: the shortest time between two trims: a trim frees pages the next prefill faults in again
TRIM_INTERVAL_S = 5.0


def _libc_function(name: str) -> Any:
    """The process's own C library's ``name`` (None where there is none, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _mallopt(param: int, value: int, env: str) -> bool:
    """glibc's ``mallopt(param, value)``; False (nothing changed) where ``env`` is set in
    the environment or the C library has no ``mallopt`` (macOS, Windows; musl returns 0)."""
    if os.environ.get(env):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; True when the cap was set.

    Call it before the server starts its threads: arenas that exist stay. False (and
    nothing changed) where the C library has no ``mallopt`` (macOS, Windows, musl
    returns 0), or where ``MALLOC_ARENA_MAX`` is set in the environment.
    """
    if arenas < 1:
        raise ValueError(f"arenas must be at least 1, got {arenas}")
    done = _mallopt(_M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX")
    log.debug("malloc arenas capped at %d: %s", arenas, done)
    return done


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Map every block of ``threshold`` bytes or more on its own, for the process's life
    (glibc's ``M_MMAP_THRESHOLD``, which also stops its dynamic raising); True when set.

    Call it at start, before the model's first prefill. False (and nothing changed) where
    the C library has no ``mallopt``, or where ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be at least 0, got {threshold}")
    done = _mallopt(_M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_")
    log.debug("malloc mmap threshold fixed at %d bytes: %s", threshold, done)
    return done


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim(0)``).

    True when some memory was released; False when none was, or where the C library has
    no ``malloc_trim`` (macOS, Windows, musl).
    """
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


class HeapTrimmer:
    """:func:`trim_heap`, at most once every ``interval`` seconds.

    Call :meth:`maybe_trim` where a pause costs nothing: the server calls it on the
    inference worker after each answer (a trim holds glibc's arena locks for well under
    a millisecond).
    """

    def __init__(
        self,
        *,
        interval: float = TRIM_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[], bool] = trim_heap,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be at least 0, got {interval}")
        self.interval = interval
        self._clock = clock
        self._trim = trim
        self._last: float | None = None
        #: trims done so far
        self.trims = 0

    def maybe_trim(self) -> bool:
        """Trim when ``interval`` has passed since the last trim; True when it did."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        self._trim()
        self.trims += 1
        return True
