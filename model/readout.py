"""Novelty readout of generated answers, and the offline metrics behind it (numpy only).

Every answer (a few bars of notes) gets a :class:`Readout` from :func:`compute_readout`:

- ``surprisal_bits_per_note``: the answer's token log-probs (under the model, from the
  sampler) summed, in bits, per note;
- ``copy_rate``: share of the answer's interval 8-grams found in the training set
  (:func:`interval_ngrams`, looked up in a Bloom filter, :class:`NgramIndex`);
- ``feature_distance``: distance of the answer's feature vector (:func:`features`) to
  the training distribution, ~1.0 for a typical training segment
  (:class:`FeatureReference`);
- ``in_scale`` (:func:`in_scale_rate`) and ``groove`` (:func:`groove_consistency`),
  MusPy's scale consistency and groove consistency.

For offline evaluation there are also :func:`knn_precision_recall` (improved precision
and recall of Kynkäänniemi et al. 2019) over feature vectors, and
:func:`build_reference_and_index`, which builds the reference and the index from the
training data.

Notes are any objects with ``onset_beats`` (float, quarter notes), ``pitch`` (int, MIDI)
and ``duration_beats`` (float) attributes (:class:`NoteLike`), e.g.
:class:`model.grammar.NoteEvent`. Bar lines are assumed at multiples of
``beats_per_bar`` (quarter notes per bar: 4.0 for 4/4, 3.0 for 6/8 and 3/4) from time 0,
i.e. a constant metre from the start of the notes' time line; callers whose stream
changed metre earlier must shift onsets so that 0 is a bar line.

Nothing here is per-key or per-note Python work beyond reading the note attributes once,
so a whole readout of a 4-bar answer takes well under a millisecond on one core (see
``compute_readout``). This module never imports torch or music21.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "FEATURE_LAYOUT_VERSION",
    "FEATURE_NAMES",
    "N_FEATURES",
    "FeatureReference",
    "NgramIndex",
    "NoteLike",
    "Readout",
    "build_reference_and_index",
    "compute_readout",
    "copy_rate",
    "features",
    "groove_consistency",
    "in_scale_rate",
    "interval_ngrams",
    "knn_precision_recall",
]

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_U64 = npt.NDArray[np.uint64]
_T = TypeVar("_T")


class NoteLike(Protocol):
    """What the metrics read from a note (read-only attributes suffice)."""

    @property
    def onset_beats(self) -> float: ...

    @property
    def pitch(self) -> int: ...

    @property
    def duration_beats(self) -> float: ...


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------- notes
@dataclass(frozen=True)
class _Notes:
    """Note attributes as arrays, sorted by (onset, pitch)."""

    onset: _F64
    pitch: npt.NDArray[np.int64]
    duration: _F64

    def __len__(self) -> int:
        return int(self.onset.size)

    def slice(self, lo: int, hi: int) -> _Notes:
        return _Notes(self.onset[lo:hi], self.pitch[lo:hi], self.duration[lo:hi])


def _arrays(notes: Iterable[NoteLike]) -> _Notes:
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
    return _Notes(onset, pitch, duration)


def _check_bpb(beats_per_bar: float) -> float:
    bpb = float(beats_per_bar)
    if not (bpb > 0.0 and math.isfinite(bpb)):
        raise ValueError(f"beats_per_bar must be positive and finite, got {beats_per_bar!r}")
    return bpb


def _bar_of(onset: _F64, bpb: float) -> npt.NDArray[np.int64]:
    """Bar index of each onset (bar lines at multiples of ``bpb``); tolerant to rounding."""
    return np.floor(onset / bpb + 1e-6).astype(np.int64)


# ------------------------------------------------------------------------ features
#: Bumped whenever the meaning of a feature changes (bins, scaling), so that a stored
#: :class:`FeatureReference` built with another layout is refused.
FEATURE_LAYOUT_VERSION = 1

# Interval bins, in semitones (skyline, next minus previous): <=-8, -7..-5, -4..-3,
# -2..-1, 0, 1..2, 3..4, 5..7, >=8. ``searchsorted(..., side="right")`` on these edges.
_INTERVAL_EDGES = _readonly(np.array([-7, -4, -2, 0, 1, 3, 5, 8], dtype=np.int64))
_INTERVAL_NAMES = ("<=-8", "-7..-5", "-4..-3", "-2..-1", "0", "1..2", "3..4", "5..7", ">=8")
# Inter-onset-interval classes (quarter notes) and the geometric midpoints between them.
_IOI_CLASSES = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 1.0, 2.0)
_IOI_EDGES = _readonly(
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
_ROTATIONS = _readonly((np.arange(12)[:, None] + np.arange(12)[None, :]) % 12)
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


def _near_multiple(x: _F64, grid: float) -> npt.NDArray[np.bool_]:
    q = x / grid
    return np.abs(q - np.rint(q)) < 1e-3 / grid


def _features(a: _Notes, bpb: float) -> _F32:
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
    bars = _bar_of(onsets[[0, -1]], bpb)
    n_bars = int(bars[1] - bars[0]) + 1
    out[35] = m / (n_bars * bpb)
    out[36] = (int(a.pitch.max()) - int(a.pitch.min())) / 24.0
    out[37] = float(a.duration.mean())
    out[38] = m / onsets.size
    p = counts[counts > 0] / m
    out[39] = float(-(p * np.log(p)).sum()) / _LN12
    return out.astype(np.float32)


def features(notes: Iterable[NoteLike], *, beats_per_bar: float = 4.0) -> _F32:
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
    return _features(_arrays(notes), _check_bpb(beats_per_bar))


# ------------------------------------------------------------------ scale and groove
def _scale_masks() -> npt.NDArray[np.int64]:
    major = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=np.int64)  # C major
    minor = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=np.int64)  # C natural minor
    rows = [np.roll(s, r) for s in (major, minor) for r in range(12)]
    return np.stack(rows)  # (24, 12): row = scale, column = pitch class


_SCALES = _readonly(_scale_masks())


def _in_scale(a: _Notes) -> float:
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
    return _in_scale(_arrays(notes))


def _groove(a: _Notes, bpb: float, resolution: int) -> float:
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
    return _groove(_arrays(notes), _check_bpb(beats_per_bar), int(resolution))


# -------------------------------------------------------------------------- n-grams
_INTERVAL_CLIP = 24
_BASE = 2 * _INTERVAL_CLIP + 1  # 49 symbols per interval
_MAX_N = 12  # 49**11 < 2**63: keys of up to 11 intervals fit exactly


def _interval_ngrams(a: _Notes, n: int) -> _U64:
    if not 2 <= n <= _MAX_N:
        raise ValueError(f"n must be in 2..{_MAX_N}, got {n}")
    m = len(a) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    d = np.clip(np.diff(a.pitch), -_INTERVAL_CLIP, _INTERVAL_CLIP) + _INTERVAL_CLIP
    key = d[:m].copy()
    for j in range(1, n - 1):  # Horner over the n-1 intervals, vectorised over n-grams
        key *= _BASE
        key += d[j : j + m]
    return key.astype(np.uint64)


def interval_ngrams(notes: Iterable[NoteLike], n: int = 8) -> _U64:
    """Keys of all n-note pitch-interval n-grams of the notes, in order (uint64).

    Notes are ordered by (onset, pitch), chord notes included; each n-gram is the ``n-1``
    consecutive intervals (next pitch minus previous), each clipped to [-24, 24] and
    written base 49, earliest interval most significant. Keys are exact (distinct
    clipped interval sequences give distinct keys) and transposition invariant; rhythm
    is ignored. ``n`` in 2..12; fewer than ``n`` notes give an empty array.
    """
    return _interval_ngrams(_arrays(notes), int(n))


# Fixed odd 64-bit multipliers (golden ratio, and those of splitmix64/murmur3/xxhash).
_HASH_MULTIPLIERS = _readonly(
    np.array(
        [
            0x9E3779B97F4A7C15,
            0xC2B2AE3D27D4EB4F,
            0x165667B19E3779F9,
            0xD6E8FEB86659FD93,
            0xFF51AFD7ED558CCD,
            0xC4CEB9FE1A85EC53,
            0x94D049BB133111EB,
            0xBF58476D1CE4E5B9,
        ],
        dtype=np.uint64,
    )
)
_INDEX_FORMAT = "divergent-ngram-bloom"
_INDEX_VERSION = 1
_REFERENCE_FORMAT = "divergent-feature-reference"
_REFERENCE_VERSION = 1


def _mix(keys: _U64) -> _U64:
    """A bijective pre-mix of the keys (the splitmix64 finaliser), vectorised."""
    x = keys ^ (keys >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _bit_positions(keys: _U64, log2_bits: int, k: int) -> _U64:
    """(k, len(keys)) bit indices: the high ``log2_bits`` bits of ``mix(key) * C_i``."""
    x = _mix(np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1))
    h = x[None, :] * _HASH_MULTIPLIERS[:k, None]
    return h >> np.uint64(64 - log2_bits)


def _as_keys(keys: npt.ArrayLike) -> _U64:
    a = np.asarray(keys)
    if a.dtype != np.uint64:
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"keys must be integers, got dtype {a.dtype}")
        if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
            raise ValueError("keys must be non-negative")
        a = a.astype(np.uint64)
    return a.reshape(-1)


def _save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz at exactly ``path`` (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _load_npz(
    path: str | os.PathLike[str], fmt: str, version: int, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Read every array of an .npz written by :func:`_save_npz`; ValueError when bad.

    A missing file raises ``FileNotFoundError``; anything unreadable, foreign or of
    another version raises ``ValueError``.
    """
    where = os.fspath(path)
    # Our own handle: np.load leaks the file it opened when the zip directory is bad.
    with open(path, "rb") as fh:
        try:
            with np.load(fh, allow_pickle=False) as z:
                files = getattr(z, "files", None)
                if files is None:
                    raise ValueError("not an .npz archive")
                out = {name: np.asarray(z[name]) for name in names if name in files}
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            AttributeError,
            TypeError,
            zipfile.BadZipFile,
            zlib.error,
        ) as e:
            raise ValueError(f"{where}: not a readable {fmt} file ({e})") from e
    f = out.get("format")
    got_fmt = str(f) if f is not None and f.shape == () else None
    if got_fmt != fmt:
        raise ValueError(f"{where}: format {got_fmt!r}, expected {fmt!r}")
    got_version = _scalar_int(out.get("version", np.array("?")), "version", path)
    if got_version != version:
        raise ValueError(f"{where}: {fmt} version {got_version}, this code reads {version}")
    missing = sorted(set(names) - set(out))
    if missing:
        raise ValueError(f"{where}: missing arrays {missing}")
    return out


def _scalar_int(a: np.ndarray, what: str, path: str | os.PathLike[str]) -> int:
    if a.shape != () or a.dtype.kind not in "iu":
        raise ValueError(f"{os.fspath(path)}: {what} is not an integer scalar")
    return int(a)


class NgramIndex:
    """A Bloom filter over n-gram keys (see :func:`interval_ngrams`).

    ``bits`` (a power of two) bits and ``k`` hash functions: each key is pre-mixed
    (splitmix64's bijective finaliser) and multiplied by ``k`` fixed odd 64-bit
    constants; each product's top ``log2(bits)`` bits give one bit position
    (multiply-shift hashing). No false negatives; a key never inserted is reported
    present with probability about :attr:`expected_false_positive_rate`. With the
    defaults (2**24 bits = 2 MiB, k = 4), 2M distinct keys give about 2% false positives
    (see ``build``). All operations are vectorised over keys.
    """

    def __init__(
        self, data: npt.NDArray[np.uint8], *, k: int, n_keys: int, n: int | None = None
    ) -> None:
        """Wrap a packed bit array (bit ``i`` = bit ``i % 8`` of byte ``i // 8``)."""
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        bits = data.size * 8
        if bits < 64 or bits & (bits - 1):
            raise ValueError(f"the filter must have a power-of-two number of bits >= 64: {bits}")
        if not 1 <= k <= _HASH_MULTIPLIERS.size:
            raise ValueError(f"k must be in 1..{_HASH_MULTIPLIERS.size}, got {k}")
        if n is not None and not 2 <= n <= _MAX_N:
            raise ValueError(f"n must be in 2..{_MAX_N} or None, got {n}")
        self._data = _readonly(data)
        self.k = int(k)
        self.n_keys = int(n_keys)
        self.n = n
        self._log2 = bits.bit_length() - 1
        self._fill = float(np.bitwise_count(data).sum(dtype=np.int64)) / bits

    @property
    def bits(self) -> int:
        """Size of the filter in bits."""
        return self._data.size * 8

    @property
    def fill_ratio(self) -> float:
        """Share of bits set."""
        return self._fill

    @property
    def expected_false_positive_rate(self) -> float:
        """Chance that a key never inserted is reported present: ``fill_ratio ** k``.

        Measured on the filter itself, so it accounts for the actual collisions (it
        matches the textbook ``(1 - exp(-k n / bits)) ** k`` for ``n`` distinct keys).
        """
        return self._fill**self.k

    @classmethod
    def build(
        cls, keys: npt.ArrayLike, *, bits: int = 2**24, k: int = 4, n: int | None = None
    ) -> NgramIndex:
        """A filter holding ``keys`` (non-negative integers; duplicates are fine).

        ``n``: the n-gram order the keys were made with, recorded so that
        :func:`copy_rate` can refuse a mismatched order (None: not checked).
        Costs a sort of the keys and a temporary ``bits``-byte flag array (16 MiB for
        the default size); about half a second for 2M keys.
        """
        bits = int(bits)
        if bits < 64 or bits > 2**32 or bits & (bits - 1):
            raise ValueError(f"bits must be a power of two in 2**6..2**32, got {bits}")
        if not 1 <= k <= _HASH_MULTIPLIERS.size:
            raise ValueError(f"k must be in 1..{_HASH_MULTIPLIERS.size}, got {k}")
        uniq = np.unique(_as_keys(keys))
        flags = np.zeros(bits, dtype=bool)
        if uniq.size:
            flags[_bit_positions(uniq, bits.bit_length() - 1, k).reshape(-1)] = True
        data = np.packbits(flags, bitorder="little")
        return cls(data, k=k, n_keys=int(uniq.size), n=n)

    def contains(self, keys: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Membership of each key (True may be a false positive; False is certain)."""
        pos = _bit_positions(_as_keys(keys), self._log2, self.k)
        hit = (self._data[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return np.logical_and.reduce(hit.astype(bool), axis=0)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a compressed ``.npz`` at ``path`` (the name is used as given)."""
        _save_npz(
            path,
            {
                "format": np.array(_INDEX_FORMAT),
                "version": np.array(_INDEX_VERSION, dtype=np.int64),
                "bits": np.array(self.bits, dtype=np.int64),
                "k": np.array(self.k, dtype=np.int64),
                "n_keys": np.array(self.n_keys, dtype=np.int64),
                "n": np.array(0 if self.n is None else self.n, dtype=np.int64),
                "data": np.asarray(self._data),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NgramIndex:
        """Read a filter written by :meth:`save`; ValueError for a bad or foreign file."""
        z = _load_npz(
            path,
            _INDEX_FORMAT,
            _INDEX_VERSION,
            ("format", "version", "bits", "k", "n_keys", "n", "data"),
        )
        bits = _scalar_int(z["bits"], "bits", path)
        k = _scalar_int(z["k"], "k", path)
        n_keys = _scalar_int(z["n_keys"], "n_keys", path)
        n = _scalar_int(z["n"], "n", path)
        data = z["data"]
        if data.dtype != np.uint8 or data.ndim != 1 or data.size * 8 != bits:
            raise ValueError(
                f"{os.fspath(path)}: bit array is {data.dtype} {data.shape}, expected uint8 "
                f"({bits // 8},)"
            )
        try:
            return cls(data, k=k, n_keys=n_keys, n=n or None)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def __repr__(self) -> str:
        return (
            f"NgramIndex(bits={self.bits}, k={self.k}, n_keys={self.n_keys}, n={self.n}, "
            f"fp~{self.expected_false_positive_rate:.3g})"
        )


def _copy_rate(a: _Notes, index: NgramIndex, n: int) -> float | None:
    if index.n is not None and index.n != n:
        raise ValueError(f"the index holds {index.n}-grams, asked for n={n}")
    keys = _interval_ngrams(a, n)
    if keys.size == 0:
        return None
    return float(np.count_nonzero(index.contains(keys))) / keys.size


def copy_rate(notes: Iterable[NoteLike], index: NgramIndex, n: int = 8) -> float | None:
    """Share of the notes' interval n-grams found in ``index`` (None for < n notes).

    Counts every n-gram occurrence (a repeated n-gram counts as often as it occurs).
    Includes the index's false positives: a completely new phrase reads about
    ``index.expected_false_positive_rate``, not 0.
    """
    return _copy_rate(_arrays(notes), index, int(n))


# ------------------------------------------------------------- feature distribution
def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _knn_mean_dist(
    queries: _F32, bank: _F32, bank_sq: _F32, k: int, *, exclude_self: bool = False
) -> _F64:
    """Mean Euclidean distance of each query row to its ``k`` nearest bank rows.

    ``exclude_self``: queries are the bank itself (row i is bank row i); skip it.
    Processed in blocks of 1024 queries to bound memory.
    """
    out = np.empty(queries.shape[0], dtype=np.float64)
    for s in range(0, queries.shape[0], 1024):
        q = queries[s : s + 1024]
        d2 = bank_sq[None, :] - 2.0 * (q @ bank.T) + _sq_norms(q)[:, None]
        if exclude_self:
            rows = np.arange(q.shape[0])
            d2[rows, rows + s] = np.inf
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        out[s : s + q.shape[0]] = np.sqrt(np.maximum(part, 0.0)).mean(axis=1)
    return out


class FeatureReference:
    """The training distribution in feature space, for a "how typical is this" distance.

    Holds the training features' mean and std (std floored at 1e-3) and a bank of up to
    4096 distinct standardised training vectors (float16 on disk). :meth:`distance` is
    the mean Euclidean distance of a standardised vector to its ``k`` nearest bank
    vectors divided by ``scale``, the median of the same quantity over the bank (each
    bank vector against the others), so ~1.0 reads "as typical as a training segment"
    and values well above 1 read "unlike the training data".
    """

    def __init__(
        self,
        mean: npt.ArrayLike,
        std: npt.ArrayLike,
        bank: npt.ArrayLike,
        *,
        scale: float,
        k: int = 5,
        feature_names: Sequence[str] | None = None,
        layout_version: int = FEATURE_LAYOUT_VERSION,
        n_source: int = 0,
    ) -> None:
        """Wrap precomputed statistics (use :meth:`build` to make them from features)."""
        self.mean = _readonly(np.array(mean, dtype=np.float32).reshape(-1))
        self.std = _readonly(np.array(std, dtype=np.float32).reshape(-1))
        self.bank = _readonly(np.array(bank, dtype=np.float16))
        d = self.mean.size
        if self.std.shape != (d,) or self.bank.ndim != 2 or self.bank.shape[1] != d:
            raise ValueError(
                f"inconsistent shapes: mean {self.mean.shape}, std {self.std.shape}, "
                f"bank {self.bank.shape}"
            )
        if self.bank.shape[0] < 2:
            raise ValueError("the bank needs at least 2 vectors")
        if not np.all(self.std > 0) or not np.all(np.isfinite(self.std)):
            raise ValueError("std must be positive and finite")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        if not 1 <= k < self.bank.shape[0]:
            raise ValueError(f"k must be in 1..{self.bank.shape[0] - 1}, got {k}")
        if feature_names is not None and len(feature_names) != d:
            raise ValueError(f"{len(feature_names)} feature names for {d} dimensions")
        self.scale = float(scale)
        self.k = int(k)
        self.feature_names = None if feature_names is None else tuple(feature_names)
        self.layout_version = int(layout_version)
        self.n_source = int(n_source)
        self._bank32 = _readonly(self.bank.astype(np.float32))
        self._bank_sq = _readonly(_sq_norms(self._bank32))
        self._inv_std = _readonly((1.0 / self.std).astype(np.float32))

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.mean.size)

    @classmethod
    def build(
        cls,
        feats: npt.ArrayLike,
        *,
        bank_size: int = 4096,
        k: int = 5,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
    ) -> FeatureReference:
        """Statistics of ``feats`` (one training segment's feature vector per row).

        Mean and std over all rows; the bank is a random subset (``seed``) of up to
        ``bank_size`` distinct standardised rows (duplicates, e.g. repeated sections,
        are dropped first so that the bank's nearest-neighbour distances are not 0).
        ``feature_names`` (e.g. :data:`FEATURE_NAMES`) is stored and checked by
        :func:`compute_readout`. Needs at least ``k + 1`` distinct rows.
        """
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"feats must be a non-empty 2-D array, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("feats must be finite")
        mean = x.mean(axis=0)
        std = np.maximum(x.std(axis=0), 1e-3)
        z = ((x - mean) / std).astype(np.float16)
        z = np.unique(z, axis=0)
        if z.shape[0] < k + 1:
            raise ValueError(f"need at least k + 1 = {k + 1} distinct vectors, got {z.shape[0]}")
        if z.shape[0] > bank_size:
            rng = np.random.default_rng(seed)
            z = z[np.sort(rng.choice(z.shape[0], size=bank_size, replace=False))]
        bank32 = z.astype(np.float32)
        self_d = _knn_mean_dist(bank32, bank32, _sq_norms(bank32), k, exclude_self=True)
        scale = float(np.median(self_d))
        if not scale > 0:  # cannot happen for distinct rows; guard against float16 ties
            scale = float(self_d[self_d > 0].mean()) if np.any(self_d > 0) else 1.0
        return cls(mean, std, z, scale=scale, k=k, feature_names=feature_names, n_source=x.shape[0])

    def standardize(self, feats: npt.ArrayLike) -> _F32:
        """Feature vector(s) in the reference's standardised space (for k-NN metrics)."""
        return self._standardise(feats)

    def _standardise(self, feats: npt.ArrayLike) -> _F32:
        f = np.asarray(feats, dtype=np.float32)
        if f.shape[-1] != self.dim:
            raise ValueError(f"feature vector of length {f.shape[-1]}, expected {self.dim}")
        return (f - self.mean) * self._inv_std

    def distance(self, feat: npt.ArrayLike) -> float:
        """Mean distance of one feature vector to its k nearest bank vectors / scale."""
        z = self._standardise(feat)
        if z.ndim != 1:
            raise ValueError(f"distance takes one vector, got shape {z.shape}; see distances")
        d2 = self._bank_sq - 2.0 * (self._bank32 @ z) + float(z @ z)
        part = np.partition(d2, self.k - 1)[: self.k]
        return float(np.sqrt(np.maximum(part, 0.0)).mean()) / self.scale

    def distances(self, feats: npt.ArrayLike) -> _F64:
        """:meth:`distance` of each row of a 2-D array (vectorised, for evaluation)."""
        z = self._standardise(feats)
        if z.ndim != 2:
            raise ValueError(f"distances takes a 2-D array, got shape {z.shape}")
        return _knn_mean_dist(z, self._bank32, self._bank_sq, self.k) / self.scale

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a compressed ``.npz`` at ``path`` (the name is used as given)."""
        names = [] if self.feature_names is None else list(self.feature_names)
        _save_npz(
            path,
            {
                "format": np.array(_REFERENCE_FORMAT),
                "version": np.array(_REFERENCE_VERSION, dtype=np.int64),
                "layout_version": np.array(self.layout_version, dtype=np.int64),
                "mean": np.asarray(self.mean),
                "std": np.asarray(self.std),
                "bank": np.asarray(self.bank),
                "scale": np.array(self.scale, dtype=np.float64),
                "k": np.array(self.k, dtype=np.int64),
                "n_source": np.array(self.n_source, dtype=np.int64),
                "feature_names": np.array(names, dtype=np.str_),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureReference:
        """Read a reference written by :meth:`save`; ValueError for a bad or foreign file."""
        z = _load_npz(
            path,
            _REFERENCE_FORMAT,
            _REFERENCE_VERSION,
            (
                "format",
                "version",
                "layout_version",
                "mean",
                "std",
                "bank",
                "scale",
                "k",
                "n_source",
                "feature_names",
            ),
        )
        names = z["feature_names"]
        if names.ndim != 1 or (names.size and names.dtype.kind != "U"):
            raise ValueError(f"{os.fspath(path)}: bad feature_names")
        for key, dt in (("mean", np.float32), ("std", np.float32), ("bank", np.float16)):
            if z[key].dtype != dt:
                raise ValueError(f"{os.fspath(path)}: {key} is {z[key].dtype}, expected {dt}")
        if z["scale"].shape != () or z["scale"].dtype.kind != "f":
            raise ValueError(f"{os.fspath(path)}: scale is not a float scalar")
        try:
            return cls(
                z["mean"],
                z["std"],
                z["bank"],
                scale=float(z["scale"]),
                k=_scalar_int(z["k"], "k", path),
                feature_names=[str(s) for s in names] if names.size else None,
                layout_version=_scalar_int(z["layout_version"], "layout_version", path),
                n_source=_scalar_int(z["n_source"], "n_source", path),
            )
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def __repr__(self) -> str:
        return (
            f"FeatureReference(dim={self.dim}, bank={self.bank.shape[0]}, k={self.k}, "
            f"scale={self.scale:.4g}, n_source={self.n_source})"
        )


# ------------------------------------------------------------ precision and recall
def _pairwise_sq(a: _F64, b: _F64) -> _F64:
    d2 = _sq_norms(a)[:, None] - 2.0 * (a @ b.T) + _sq_norms(b)[None, :]
    return np.maximum(d2, 0.0, out=d2)


def _kth_radius_sq(x: _F64, k: int) -> _F64:
    d2 = _pairwise_sq(x, x)
    np.fill_diagonal(d2, 0.0)
    # column 0 of the partition is the point itself (distance 0), so index k is the
    # k-th nearest other point.
    return np.partition(d2, k, axis=1)[:, k]


def knn_precision_recall(
    real: npt.ArrayLike, fake: npt.ArrayLike, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

    Each set's manifold is the union of balls around its points, each ball's radius the
    distance to that point's ``k``-th nearest neighbour in the same set (itself
    excluded). Precision = share of ``fake`` points inside the real manifold (generated
    samples look real); recall = share of ``real`` points inside the fake manifold (the
    real variety is covered). Both sets are (points, dims) arrays, compared as given (so
    standardise features first, e.g. with a :class:`FeatureReference`'s mean and std).
    Dense float64 pairwise distances: memory about 8 * (N^2 + M^2 + N*M) bytes (100 MB
    for 2,000 points each).
    """
    r = np.asarray(real, dtype=np.float64)
    f = np.asarray(fake, dtype=np.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"need two 2-D arrays of equal width, got {r.shape} and {f.shape}")
    if k < 1 or k >= min(r.shape[0], f.shape[0]):
        raise ValueError(
            f"k must be in 1..{min(r.shape[0], f.shape[0]) - 1} for sets of "
            f"{r.shape[0]} and {f.shape[0]} points, got {k}"
        )
    rad_r = _kth_radius_sq(r, k)
    rad_f = _kth_radius_sq(f, k)
    cross = _pairwise_sq(r, f)  # (real, fake)
    precision = float(np.mean(np.any(cross <= rad_r[:, None], axis=0)))
    recall = float(np.mean(np.any(cross <= rad_f[None, :], axis=1)))
    return precision, recall


# --------------------------------------------------------------------------- readout
@dataclass(frozen=True)
class Readout:
    """What the performer sees about one answer (see :func:`compute_readout`).

    - ``surprisal_bits_per_note``: -log2 P(answer tokens) per note (higher = less
      expected by the model);
    - ``copy_rate``: share of the answer's interval 8-grams seen in training (None: no
      index, or fewer than 8 notes); includes the index's false-positive floor;
    - ``feature_distance``: k-NN distance to the training features, ~1.0 typical,
      NaN without a reference or notes;
    - ``in_scale``: MusPy scale consistency (0..1); ``groove``: MusPy groove
      consistency (0..1);
    - ``notes``: number of notes; ``compute_ms``: the answer's generation time (from the
      caller); ``readout_ms``: the time :func:`compute_readout` took.
    """

    surprisal_bits_per_note: float
    copy_rate: float | None
    feature_distance: float
    in_scale: float
    groove: float
    notes: int
    compute_ms: float
    readout_ms: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, with NaN/inf floats as None."""
        return {
            key: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for key, v in asdict(self).items()
        }


_LN2 = math.log(2.0)


def compute_readout(
    notes: Iterable[NoteLike],
    *,
    token_logprobs_nats: Sequence[float],
    index: NgramIndex | None,
    reference: FeatureReference | None,
    beats_per_bar: float = 4.0,
    compute_ms: float = 0.0,
    n: int = 8,
) -> Readout:
    """The readout of one answer: its notes and the log-probs of its sampled tokens.

    ``notes``: the answer's notes only (not the prompt's); ``token_logprobs_nats``: the
    natural-log probability of every token sampled for the answer (structural tokens
    included), so ``surprisal_bits_per_note = -sum / ln 2 / max(1, notes)``.
    ``copy_rate``: None without an index or with fewer than ``n`` notes.
    ``feature_distance``: NaN without a reference or for an answer with no notes.
    For no notes: ``in_scale`` 0.0 and ``groove`` 1.0. ``compute_ms`` (the generation
    time) is passed through; ``readout_ms`` is this call's own time. Raises
    ``ValueError`` if ``reference`` was built with another feature layout.
    """
    t0 = time.perf_counter()
    bpb = _check_bpb(beats_per_bar)
    a = _arrays(notes)
    m = len(a)
    total = math.fsum(token_logprobs_nats)
    surprisal = (0.0 - total) / _LN2 / max(1, m)  # 0.0, not -0.0, for no tokens
    cr = None if index is None else _copy_rate(a, index, n)
    dist = math.nan
    if reference is not None:
        if (
            reference.dim != N_FEATURES
            or reference.layout_version != FEATURE_LAYOUT_VERSION
            or (reference.feature_names is not None and reference.feature_names != FEATURE_NAMES)
        ):
            raise ValueError(
                "the feature reference was built with another feature layout "
                f"({reference.dim} dims, layout version {reference.layout_version}); rebuild it"
            )
        if m:
            dist = reference.distance(_features(a, bpb))
    return Readout(
        surprisal_bits_per_note=surprisal,
        copy_rate=cr,
        feature_distance=dist,
        in_scale=_in_scale(a),
        groove=_groove(a, bpb, 12),
        notes=m,
        compute_ms=float(compute_ms),
        readout_ms=(time.perf_counter() - t0) * 1e3,
    )


# ------------------------------------------------------------------ offline building
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
        bpb = _check_bpb(beats_per_bar)
        a = _arrays(notes)
        if len(a) == 0:
            continue
        key_chunks.append(_interval_ngrams(a, n))
        bar = _bar_of(a.onset, bpb)
        first, last = int(bar[0]), int(bar[-1])
        for b in range(first, max(first, last - segment_bars + 1) + 1):
            lo = int(np.searchsorted(bar, b, side="left"))
            hi = int(np.searchsorted(bar, b + segment_bars, side="left"))
            if hi <= lo:
                continue
            slot = seen if seen < max_segments else int(rng.integers(0, seen + 1))
            seen += 1
            if slot < max_segments:
                reservoir[slot] = _features(a.slice(lo, hi), bpb)
    if seen == 0:
        raise ValueError("no notes in the training data")
    feats = reservoir[: min(seen, max_segments)]
    reference = FeatureReference.build(
        feats, bank_size=bank_size, seed=seed, feature_names=FEATURE_NAMES
    )
    keys = np.concatenate(key_chunks) if key_chunks else np.zeros(0, dtype=np.uint64)
    index = NgramIndex.build(keys, bits=bits, k=4, n=n)
    return reference, index
