"""Offline: the readout's two banks (feature reference and copy index) from training
data, in one pass over the works (numpy only; ``divergent data index`` calls it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from divergent.model.copy_index import NgramIndex, interval_ngrams_of
from divergent.model.feature_reference import FeatureReference
from divergent.model.features import FEATURE_NAMES, N_FEATURES, features_of
from divergent.model.note_arrays import NoteLike, bar_of, check_beats_per_bar, note_arrays

__all__ = ["build_reference_and_index"]

_T = TypeVar("_T")


def build_reference_and_index(
    token_streams: Iterable[_T],
    decode_notes: Callable[[_T], tuple[Sequence[NoteLike], float]],
    *,
    n: int = 8,
    segment_bars: int = 4,
    max_segments: int = 4096,
    seed: int = 0,
    bits: int = 2**24,
    bank_size: int = 4096,
) -> tuple[FeatureReference, NgramIndex]:
    """Build the :class:`FeatureReference` and :class:`NgramIndex` from training data.

    ``token_streams``: one item per training work (or per constant-metre piece of a
    work), of any type; ``decode_notes(item)`` turns an item into ``(notes,
    beats_per_bar)``: its notes (:class:`NoteLike`, onsets in quarter notes with a bar
    line at 0) and its bar length in quarter notes. E.g. for token id arrays::

        decode = lambda ids: (notes_from_ids(ids, vocab), 4.0)

    or, for items that already are ``(notes, beats_per_bar)`` pairs, ``lambda w: w``.
    Works are streamed once and not kept.

    - The index holds every interval ``n``-gram of every work (whole works, so n-grams
      across segment boundaries are included), ``bits`` bits, k = 4.
    - The reference is built from the feature vectors of segments: every window of
      ``segment_bars`` consecutive bars (hop of one bar, from the work's first bar; a
      work shorter than that is one segment; windows without notes are skipped).
      ``max_segments`` of them are kept by reservoir sampling (uniform over all windows
      of all works, deterministic for ``seed``; features are computed only for windows
      the reservoir accepts), and give the mean/std and the bank (up to ``bank_size``).
    """
    if segment_bars < 1 or max_segments < 6:
        raise ValueError("segment_bars must be >= 1 and max_segments >= 6")
    rng = np.random.default_rng(seed)
    reservoir = np.zeros((max_segments, N_FEATURES), dtype=np.float32)
    seen = 0
    key_chunks: list[np.ndarray] = []
    for item in token_streams:
        notes, beats_per_bar = decode_notes(item)
        bpb = check_beats_per_bar(beats_per_bar)
        a = note_arrays(notes)
        if len(a) == 0:
            continue
        key_chunks.append(interval_ngrams_of(a, n))
        bar = bar_of(a.onset, bpb)
        first, last = int(bar[0]), int(bar[-1])
        for b in range(first, max(first, last - segment_bars + 1) + 1):
            lo = int(np.searchsorted(bar, b, side="left"))
            hi = int(np.searchsorted(bar, b + segment_bars, side="left"))
            if hi <= lo:
                continue
            slot = seen if seen < max_segments else int(rng.integers(0, seen + 1))
            seen += 1
            if slot < max_segments:
                reservoir[slot] = features_of(a.slice(lo, hi), bpb)
    if seen == 0:
        raise ValueError("no notes in the training data")
    feats = reservoir[: min(seen, max_segments)]
    reference = FeatureReference.build(
        feats, bank_size=bank_size, seed=seed, feature_names=FEATURE_NAMES
    )
    keys = np.concatenate(key_chunks) if key_chunks else np.zeros(0, dtype=np.uint64)
    index = NgramIndex.build(keys, bits=bits, k=4, n=n)
    return reference, index
