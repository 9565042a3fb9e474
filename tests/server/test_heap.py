"""server/heap.py: the server's malloc arenas are capped, so threads meeting a locked
arena under CPU contention share what exists instead of growing new heaps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from divergent.server.heap import MALLOC_ARENAS, limit_malloc_arenas
from tests.conftest import require

# Sixteen threads allocate at once, then glibc's malloc_stats() lists the arenas on
# stderr ("Arena 0:", "Arena 1:", ...). A new thread's first malloc takes an arena of its
# own while the count is under the cap, so without one this makes many.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    from divergent.server.heap import limit_malloc_arenas
    if sys.argv[1] == "cap":
        assert limit_malloc_arenas()
    start = threading.Barrier(16)
    def work():
        start.wait()
        for _ in range(300):
            chunks = [bytearray(20_000) for _ in range(8)]
            del chunks
    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL(None).malloc_stats()
    """
)


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


def test_threads_share_the_capped_arenas() -> None:
    require(sys.platform.startswith("linux"), "needs glibc's malloc (Linux)")
    capped, free = _arenas("cap"), _arenas("free")
    assert 1 <= capped <= MALLOC_ARENAS, capped
    assert free > MALLOC_ARENAS, free  # the probe does make arenas when nothing caps them


def test_the_environment_wins_and_bad_counts_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    with pytest.raises(ValueError):
        limit_malloc_arenas(0)
