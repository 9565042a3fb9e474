"""Notes as numpy arrays: what every readout metric reads (numpy only).

Notes are any objects with ``onset_beats`` (float, quarter notes), ``pitch`` (int, MIDI)
and ``duration_beats`` (float) attributes (:class:`NoteLike`), e.g.
:class:`model.grammar.NoteEvent`. :func:`note_arrays` reads those attributes once into a
:class:`NoteArrays`, sorted by (onset, pitch); the metrics in ``model.features``,
``model.copy_index`` and ``model.readout`` work on that, vectorised. Bar lines are
assumed at multiples of ``beats_per_bar`` (quarter notes per bar: 4.0 for 4/4, 3.0 for
6/8 and 3/4) from time 0, i.e. a constant metre from the start of the notes' time line;
callers whose stream changed metre earlier must shift onsets so that 0 is a bar line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "F32",
    "F64",
    "U64",
    "NoteArrays",
    "NoteLike",
    "bar_of",
    "check_beats_per_bar",
    "note_arrays",
    "readonly",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]


class NoteLike(Protocol):
    """What the metrics read from a note (read-only attributes suffice)."""

    @property
    def onset_beats(self) -> float: ...

    @property
    def pitch(self) -> int: ...

    @property
    def duration_beats(self) -> float: ...


def readonly(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only (module-level tables must not be mutable state)."""
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class NoteArrays:
    """Note attributes as arrays, sorted by (onset, pitch)."""

    onset: F64
    pitch: npt.NDArray[np.int64]
    duration: F64

    def __len__(self) -> int:
        return int(self.onset.size)

    def slice(self, lo: int, hi: int) -> NoteArrays:
        return NoteArrays(self.onset[lo:hi], self.pitch[lo:hi], self.duration[lo:hi])


def note_arrays(notes: Iterable[NoteLike]) -> NoteArrays:
    """Read the notes' attributes once, into arrays sorted by (onset, pitch)."""
    seq = notes if isinstance(notes, Sequence) else list(notes)
    m = len(seq)
    # Rounded so that onsets computed along different float paths still group as equal.
    onset = np.fromiter((x.onset_beats for x in seq), np.float64, m).round(6)
    pitch = np.fromiter((x.pitch for x in seq), np.int64, m)
    duration = np.fromiter((x.duration_beats for x in seq), np.float64, m)
    if m > 1 and not np.all(
        (onset[1:] > onset[:-1]) | ((onset[1:] == onset[:-1]) & (pitch[1:] >= pitch[:-1]))
    ):
        order = np.lexsort((pitch, onset))
        onset, pitch, duration = onset[order], pitch[order], duration[order]
    return NoteArrays(onset, pitch, duration)


def check_beats_per_bar(beats_per_bar: float) -> float:
    """``beats_per_bar`` as a float; ValueError unless positive and finite."""
    bpb = float(beats_per_bar)
    if not (bpb > 0.0 and math.isfinite(bpb)):
        raise ValueError(f"beats_per_bar must be positive and finite, got {beats_per_bar!r}")
    return bpb


def bar_of(onset: F64, bpb: float) -> npt.NDArray[np.int64]:
    """Bar index of each onset (bar lines at multiples of ``bpb``); tolerant to rounding."""
    return np.floor(onset / bpb + 1e-6).astype(np.int64)
