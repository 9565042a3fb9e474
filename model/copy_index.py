"""How much of an answer was seen in training: interval n-grams in a Bloom filter.

:func:`interval_ngrams` turns notes into exact, transposition-invariant n-gram keys;
:class:`NgramIndex` is a Bloom filter over the training works' keys (the dataset's and
the model folder's copy index); :func:`copy_rate` is the share of an answer's n-grams
found in it. Numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from divergent.model.note_arrays import U64, NoteArrays, NoteLike, note_arrays, readonly
from divergent.model.npz_store import load_npz, save_npz, scalar_int

__all__ = ["NgramIndex", "copy_rate", "copy_rate_of", "interval_ngrams", "interval_ngrams_of"]

_INTERVAL_CLIP = 24
_BASE = 2 * _INTERVAL_CLIP + 1  # 49 symbols per interval
_MAX_N = 12  # 49**11 < 2**63: keys of up to 11 intervals fit exactly


def interval_ngrams_of(a: NoteArrays, n: int) -> U64:
    """:func:`interval_ngrams` of notes already read."""
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


def interval_ngrams(notes: Iterable[NoteLike], n: int = 8) -> U64:
    """Keys of all n-note pitch-interval n-grams of the notes, in order (uint64).

    Notes are ordered by (onset, pitch), chord notes included; each n-gram is the ``n-1``
    consecutive intervals (next pitch minus previous), each clipped to [-24, 24] and
    written base 49, earliest interval most significant. Keys are exact (distinct
    clipped interval sequences give distinct keys) and transposition invariant; rhythm
    is ignored. ``n`` in 2..12; fewer than ``n`` notes give an empty array.
    """
    return interval_ngrams_of(note_arrays(notes), int(n))


# Fixed odd 64-bit multipliers (golden ratio, and those of splitmix64/murmur3/xxhash).
_HASH_MULTIPLIERS = readonly(
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


def _mix(keys: U64) -> U64:
    """A bijective pre-mix of the keys (the splitmix64 finaliser), vectorised."""
    x = keys ^ (keys >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _bit_positions(keys: U64, log2_bits: int, k: int) -> U64:
    """(k, len(keys)) bit indices: the high ``log2_bits`` bits of ``mix(key) * C_i``."""
    x = _mix(np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1))
    h = x[None, :] * _HASH_MULTIPLIERS[:k, None]
    return h >> np.uint64(64 - log2_bits)


def _as_keys(keys: npt.ArrayLike) -> U64:
    a = np.asarray(keys)
    if a.dtype != np.uint64:
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"keys must be integers, got dtype {a.dtype}")
        if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
            raise ValueError("keys must be non-negative")
        a = a.astype(np.uint64)
    return a.reshape(-1)


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
        self._data = readonly(data)
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
        save_npz(
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
        z = load_npz(
            path,
            _INDEX_FORMAT,
            _INDEX_VERSION,
            ("format", "version", "bits", "k", "n_keys", "n", "data"),
        )
        bits = scalar_int(z["bits"], "bits", path)
        k = scalar_int(z["k"], "k", path)
        n_keys = scalar_int(z["n_keys"], "n_keys", path)
        n = scalar_int(z["n"], "n", path)
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


def copy_rate_of(a: NoteArrays, index: NgramIndex, n: int) -> float | None:
    """:func:`copy_rate` of notes already read."""
    if index.n is not None and index.n != n:
        raise ValueError(f"the index holds {index.n}-grams, asked for n={n}")
    keys = interval_ngrams_of(a, n)
    if keys.size == 0:
        return None
    return float(np.count_nonzero(index.contains(keys))) / keys.size


def copy_rate(notes: Iterable[NoteLike], index: NgramIndex, n: int = 8) -> float | None:
    """Share of the notes' interval n-grams found in ``index`` (None for < n notes).

    Counts every n-gram occurrence (a repeated n-gram counts as often as it occurs).
    Includes the index's false positives: a completely new phrase reads about
    ``index.expected_false_positive_rate``, not 0.
    """
    return copy_rate_of(note_arrays(notes), index, int(n))
