"""The serving sessions keep nothing per call: a long set's prefills leave the C heap
where it was once their lengths have been seen (issue 12's memory target)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("prefill", ["int8", "int8dyn"])
def test_prefills_of_lengths_seen_before_keep_no_memory(prefill: str) -> None:
    require(sys.platform.startswith("linux"), "reads glibc's mallinfo2 (Linux)")
    # Without an arena ONNX Runtime keeps ~1.8 KB in the heap for each prompt length it
    # has not run before (about 330 KB for these 160; bounded by the model's block_size
    # per session); lengths it has seen cost nothing more (about 40-60 KB for the same
    # 160 again: what any 160 prefills leave in the heap's small-block accounting here).
    model = OnnxModel(default_model_dir(), precision="int8", threads=1, prefill=prefill)
    dec = IncrementalDecoder(model)
    rng = np.random.default_rng(0)
    _prefills(dec, range(200, 210), rng)
    _prefills(dec, range(2, 200), rng)
    before = _heap_in_use()
    _prefills(dec, range(2, 200), rng)
    grown = _heap_in_use() - before
    assert grown < 160 * 1024, f"{grown / 1024:.0f} KB kept by 198 prefills of lengths seen before"


def test_serving_sessions_run_without_an_arena_or_memory_patterns() -> None:
    # the arena kept every region a prefill grew and fragmented over a set
    # (model.runtime.no_cpu_arena); the patterns kept a plan per prompt length
    # (model.runtime.session_options); a concept's rebuilt decoder keeps both settings
    model = OnnxModel(default_model_dir(), precision="int8", threads=1, prefill="fp32")
    dyn = OnnxModel(default_model_dir(), precision="int8", threads=1, prefill="int8dyn")
    copy = model.with_decoder_initializers({})
    for session in (model.decoder, model.prefill_decoder, dyn.prefill_decoder, copy.decoder):
        options = session.get_session_options()
        assert options.enable_cpu_mem_arena is False
        assert options.enable_mem_pattern is False
