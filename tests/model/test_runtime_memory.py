"""The serving sessions keep nothing per prompt length: a long set's prefills of every
length leave the C heap where it was (issue 12's memory target)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from divergent.model.runtime import IncrementalDecoder, OnnxModel, default_model_dir
from tests.conftest import require


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> int:
    """Bytes the C heap has handed out and not had back (small and mmapped blocks)."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _prefills(dec: IncrementalDecoder, lengths: range, rng: np.random.Generator) -> None:
    for n in lengths:
        dec.reset()
        dec.feed(rng.integers(3, 400, n).tolist())


def test_prefills_of_new_lengths_keep_no_memory() -> None:
    require(sys.platform.startswith("linux"), "reads glibc's mallinfo2 (Linux)")
    # With ONNX Runtime's memory patterns on, every new input length left ~1.7 KB of
    # allocation plan behind for the session's life: 352 KB for these 160 lengths,
    # against 72 KB without them (and 62 KB for the same 160 lengths again: what any
    # 160 prefills leave in the heap's small-block accounting here).
    model = OnnxModel(default_model_dir(), precision="int8", threads=1)
    dec = IncrementalDecoder(model)
    rng = np.random.default_rng(0)
    # the arena first grows to the longest prefill, and the short ones are seen
    _prefills(dec, range(200, 210), rng)
    _prefills(dec, range(2, 40), rng)
    before = _heap_in_use()
    _prefills(dec, range(40, 200), rng)
    grown = _heap_in_use() - before
    assert grown < 160 * 1024, f"{grown / 1024:.0f} KB kept by 160 prefills of new lengths"
