"""Musical descriptors of a note list (numpy only).

- :func:`features`: a fixed-length (40) vector of pitch-class, interval, rhythm, metre
  and density statistics, the space the feature reference measures distances in;
- :func:`in_scale_rate` and :func:`groove_consistency`: MusPy's scale consistency and
  groove consistency.

The ``*_of`` forms take :class:`~divergent.model.note_arrays.NoteArrays` (notes already
read), for the readout and the builder, which compute several metrics from one read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from divergent.model.note_arrays import (
    F32,
    F64,
    NoteArrays,
    NoteLike,
    bar_of,
    check_beats_per_bar,
    note_arrays,
    readonly,
)

__all__ = [
    "FEATURE_LAYOUT_VERSION",
    "FEATURE_NAMES",
    "N_FEATURES",
    "features",
    "features_of",
    "groove_consistency",
    "groove_of",
    "in_scale_of",
    "in_scale_rate",
]

#: Bumped whenever the meaning of a feature changes (bins, scaling), so that a stored
#: :class:`FeatureReference` built with another layout is refused.
FEATURE_LAYOUT_VERSION = 1

# Interval bins, in semitones (skyline, next minus previous): <=-8, -7..-5, -4..-3,
# -2..-1, 0, 1..2, 3..4, 5..7, >=8. ``searchsorted(..., side="right")`` on these edges.
_INTERVAL_EDGES = readonly(np.array([-7, -4, -2, 0, 1, 3, 5, 8], dtype=np.int64))
_INTERVAL_NAMES = ("<=-8", "-7..-5", "-4..-3", "-2..-1", "0", "1..2", "3..4", "5..7", ">=8")
# Inter-onset-interval classes (quarter notes) and the geometric midpoints between them.
_IOI_CLASSES = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 1.0, 2.0)
_IOI_EDGES = readonly(
    np.array(
        [math.sqrt(a * b) for a, b in itertools.pairwise(_IOI_CLASSES)] + [2.0 * math.sqrt(2.0)]
    )
)
_IOI_NAMES = ("<=1/8", "1/6", "1/4", "1/3", "1/2", "1", "2", ">2")
_POS_NAMES = ("downbeat", "beat", "eighth", "sixteenth", "triplet", "other")
_SCALAR_NAMES = ("note_density", "pitch_range", "mean_duration", "polyphony", "pc_entropy")

#: Names of the entries of :func:`features`, in order (see its docstring).
FEATURE_NAMES: tuple[str, ...] = (
    *(f"pc_rel_{i}" for i in range(12)),
    *(f"interval_{s}" for s in _INTERVAL_NAMES),
    *(f"ioi_{s}" for s in _IOI_NAMES),
    *(f"pos_{s}" for s in _POS_NAMES),
    *_SCALAR_NAMES,
)
#: Length of :func:`features`' vector.
N_FEATURES = len(FEATURE_NAMES)

# All 12 rotations of a 12-vector: row r is (v[r], v[r+1], ..., v[r+11]).
_ROTATIONS = readonly((np.arange(12)[:, None] + np.arange(12)[None, :]) % 12)
_LN12 = math.log(12.0)


def _canonical_pc_hist(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The lexicographically largest rotation of a pitch-class count vector.

    Its first entry is the most frequent pitch class; ties between equally frequent pitch
    classes are broken by the counts that follow, so the result depends only on the
    pitch-class content up to transposition (tied rotations give identical vectors).
    """
    rots = counts[_ROTATIONS]
    # lexsort's last key is the primary one: column 0, then 1, ...
    best = int(np.lexsort(rots.T[::-1])[-1])
    return rots[best]


def _near_multiple(x: F64, grid: float) -> npt.NDArray[np.bool_]:
    q = x / grid
    return np.abs(q - np.rint(q)) < 1e-3 / grid


def features_of(a: NoteArrays, bpb: float) -> F32:
    """:func:`features` of notes already read."""
    m = len(a)
    if m == 0:
        raise ValueError("features of an empty note list are undefined")
    out = np.zeros(N_FEATURES, dtype=np.float64)
    # 0..11: pitch-class histogram, canonically rotated (transposition invariant).
    counts = np.bincount(a.pitch % 12, minlength=12)
    out[0:12] = _canonical_pc_hist(counts) / m
    # Distinct onsets; notes are sorted by (onset, pitch), so a group's last is its top.
    first = np.empty(m, dtype=bool)
    first[0] = True
    np.not_equal(a.onset[1:], a.onset[:-1], out=first[1:])
    onsets = a.onset[first]
    last = np.empty(m, dtype=bool)
    last[-1] = True
    last[:-1] = first[1:]
    skyline = a.pitch[last]
    # 12..20: melodic intervals of the skyline (highest note per onset).
    if skyline.size > 1:
        iv = np.diff(skyline)
        out[12:21] = np.bincount(np.searchsorted(_INTERVAL_EDGES, iv, side="right"), minlength=9)
        out[12:21] /= iv.size
    # 21..28: inter-onset intervals between distinct onsets.
    if onsets.size > 1:
        ioi = np.diff(onsets)
        out[21:29] = np.bincount(np.searchsorted(_IOI_EDGES, ioi, side="left"), minlength=8)
        out[21:29] /= ioi.size
    # 29..34: metrical position of the distinct onsets (first matching class wins).
    pos = onsets - np.floor(onsets / bpb + 1e-6) * bpb
    cls = np.full(onsets.size, 5, dtype=np.int64)
    for c, hit in (
        (4, _near_multiple(pos, 1 / 6)),
        (3, _near_multiple(pos, 0.25)),
        (2, _near_multiple(pos, 0.5)),
        (1, _near_multiple(pos, 1.0)),
        (0, np.abs(pos) < 1e-3),
    ):
        cls[hit] = c
    out[29:35] = np.bincount(cls, minlength=6) / onsets.size
    # 35..39: scalars.
    bars = bar_of(onsets[[0, -1]], bpb)
    n_bars = int(bars[1] - bars[0]) + 1
    out[35] = m / (n_bars * bpb)
    out[36] = (int(a.pitch.max()) - int(a.pitch.min())) / 24.0
    out[37] = float(a.duration.mean())
    out[38] = m / onsets.size
    p = counts[counts > 0] / m
    out[39] = float(-(p * np.log(p)).sum()) / _LN12
    return out.astype(np.float32)


def features(notes: Iterable[NoteLike], *, beats_per_bar: float = 4.0) -> F32:
    """A fixed-length (:data:`N_FEATURES` = 40) float32 description of a note list.

    Layout (names in :data:`FEATURE_NAMES`); every histogram sums to 1 (or is all zero
    when undefined, e.g. intervals of a single onset):

    - ``0..11`` ``pc_rel_*``: pitch-class histogram (share of notes), rotated to its
      canonical form: the lexicographically largest rotation, so entry 0 is the most
      frequent pitch class and ties are broken by the counts that follow it. This is
      exactly transposition invariant. Chosen over rotating to an estimated tonic
      (Krumhansl–Schmuckler key finding) because key estimates on a few bars are unstable
      (relative major/minor, modal tunes, dominant-heavy phrases) and a change of
      estimate would jump the whole block; the canonical rotation is deterministic and
      stable, which is what a distance to the training distribution needs.
    - ``12..20`` ``interval_*``: melodic intervals in semitones between consecutive
      distinct onsets' highest notes (the skyline; identical to consecutive notes for a
      monophonic line, and keeps chord-internal harmonic intervals out), binned
      ``<=-8, -7..-5, -4..-3, -2..-1, 0, 1..2, 3..4, 5..7, >=8``.
    - ``21..28`` ``ioi_*``: inter-onset intervals between consecutive distinct onsets,
      in quarter notes, binned to the nearest (geometrically) of ``1/8, 1/6, 1/4, 1/3,
      1/2, 1, 2`` and ``>2`` (above 2*sqrt(2)).
    - ``29..34`` ``pos_*``: metrical position of the distinct onsets within the bar:
      downbeat, other quarter-note beat, other eighth, other sixteenth, triplet grid
      (multiples of 1/6 beat not already counted), other.
    - ``35`` ``note_density``: notes per quarter note over the bars from the first to the
      last onset's bar (whole bars, so leading/trailing rests inside them count).
    - ``36`` ``pitch_range``: (highest - lowest pitch) / 24.
    - ``37`` ``mean_duration``: mean note duration in quarter notes.
    - ``38`` ``polyphony``: notes per distinct onset (1.0 for a monophonic line).
    - ``39`` ``pc_entropy``: entropy of the pitch-class histogram / ln 12 (0..1).

    The whole vector is transposition invariant and invariant to shifting all onsets by
    whole bars. Raises ``ValueError`` for an empty note list (an answer of rests has no
    features; zeros would silently look like a point of feature space).
    """
    return features_of(note_arrays(notes), check_beats_per_bar(beats_per_bar))


def _scale_masks() -> npt.NDArray[np.int64]:
    major = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=np.int64)  # C major
    minor = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=np.int64)  # C natural minor
    rows = [np.roll(s, r) for s in (major, minor) for r in range(12)]
    return np.stack(rows)  # (24, 12): row = scale, column = pitch class


_SCALES = readonly(_scale_masks())


def in_scale_of(a: NoteArrays) -> float:
    """:func:`in_scale_rate` of notes already read."""
    if len(a) == 0:
        return 0.0
    counts = np.bincount(a.pitch % 12, minlength=12)
    return float((_SCALES @ counts).max()) / len(a)


def in_scale_rate(notes: Iterable[NoteLike]) -> float:
    """MusPy's scale consistency: the largest share of notes inside one scale.

    The maximum over the 24 major and natural-minor scales (12 roots each) of the share
    of notes whose pitch class is in the scale; 0.0 for no notes. (Natural minor scales
    have the same pitch-class sets as their relative majors, so the 12 majors alone
    give the same value; all 24 are kept to follow the definition.)
    """
    return in_scale_of(note_arrays(notes))


def groove_of(a: NoteArrays, bpb: float, resolution: int) -> float:
    """:func:`groove_consistency` of notes already read."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    length_f = bpb * resolution
    length = round(length_f)
    if length < 1 or abs(length_f - length) > 1e-6:
        raise ValueError(
            f"beats_per_bar * resolution must be a whole number of positions, got {length_f}"
        )
    if len(a) == 0:
        return 1.0
    q = np.rint(a.onset * resolution).astype(np.int64)
    bar, pos = np.divmod(q, length)
    bar -= bar[0]  # sorted by onset: the first note's bar is bar 0
    n_bars = int(bar[-1]) + 1
    if n_bars < 2:
        return 1.0
    grid = np.zeros((n_bars, length), dtype=bool)
    grid[bar, pos] = True
    hamming = int(np.count_nonzero(grid[1:] != grid[:-1]))
    return 1.0 - hamming / (length * (n_bars - 1))


def groove_consistency(
    notes: Iterable[NoteLike], *, beats_per_bar: float = 4.0, resolution: int = 12
) -> float:
    """MusPy's groove consistency: 1 - mean normalised Hamming distance of adjacent bars.

    Each bar is a binary vector of ``beats_per_bar * resolution`` onset positions
    (``resolution`` positions per quarter note; onsets rounded to the nearest position);
    the result is ``1 - sum_i d(G_i, G_{i+1}) / (length * (bars - 1))``. Bars run from
    the bar of the first onset to the bar of the last (empty bars in between count), not
    from time 0 as in MusPy, so an answer late in a stream is not padded with empty
    bars. 1.0 for fewer than two bars (MusPy gives NaN). ``beats_per_bar * resolution``
    must be a whole number.
    """
    return groove_of(note_arrays(notes), check_beats_per_bar(beats_per_bar), int(resolution))
