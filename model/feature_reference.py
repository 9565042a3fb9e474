"""The training distribution in feature space: how typical an answer is (numpy only).

:class:`FeatureReference` holds the training features' mean and std and a bank of
standardised training vectors; its distance is the mean distance to the k nearest bank
vectors, scaled so that ~1.0 reads "as typical as a training segment".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from divergent.model.features import FEATURE_LAYOUT_VERSION
from divergent.model.note_arrays import F32, F64, readonly
from divergent.model.npz_store import load_npz, save_npz, scalar_int

__all__ = ["FeatureReference", "sq_norms"]

_REFERENCE_FORMAT = "divergent-feature-reference"
_REFERENCE_VERSION = 1


def sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of each row."""
    return np.einsum("ij,ij->i", x, x)


def _knn_mean_dist(
    queries: F32, bank: F32, bank_sq: F32, k: int, *, exclude_self: bool = False
) -> F64:
    """Mean Euclidean distance of each query row to its ``k`` nearest bank rows.

    ``exclude_self``: queries are the bank itself (row i is bank row i); skip it.
    Processed in blocks of 1024 queries to bound memory.
    """
    out = np.empty(queries.shape[0], dtype=np.float64)
    for s in range(0, queries.shape[0], 1024):
        q = queries[s : s + 1024]
        d2 = bank_sq[None, :] - 2.0 * (q @ bank.T) + sq_norms(q)[:, None]
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
        self.mean = readonly(np.array(mean, dtype=np.float32).reshape(-1))
        self.std = readonly(np.array(std, dtype=np.float32).reshape(-1))
        self.bank = readonly(np.array(bank, dtype=np.float16))
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
        self._bank32 = readonly(self.bank.astype(np.float32))
        self._bank_sq = readonly(sq_norms(self._bank32))
        self._inv_std = readonly((1.0 / self.std).astype(np.float32))

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
        self_d = _knn_mean_dist(bank32, bank32, sq_norms(bank32), k, exclude_self=True)
        scale = float(np.median(self_d))
        if not scale > 0:  # cannot happen for distinct rows; guard against float16 ties
            scale = float(self_d[self_d > 0].mean()) if np.any(self_d > 0) else 1.0
        return cls(mean, std, z, scale=scale, k=k, feature_names=feature_names, n_source=x.shape[0])

    def standardize(self, feats: npt.ArrayLike) -> F32:
        """Feature vector(s) in the reference's standardised space (for k-NN metrics)."""
        return self._standardise(feats)

    def _standardise(self, feats: npt.ArrayLike) -> F32:
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

    def distances(self, feats: npt.ArrayLike) -> F64:
        """:meth:`distance` of each row of a 2-D array (vectorised, for evaluation)."""
        z = self._standardise(feats)
        if z.ndim != 2:
            raise ValueError(f"distances takes a 2-D array, got shape {z.shape}")
        return _knn_mean_dist(z, self._bank32, self._bank_sq, self.k) / self.scale

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a compressed ``.npz`` at ``path`` (the name is used as given)."""
        names = [] if self.feature_names is None else list(self.feature_names)
        save_npz(
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
        z = load_npz(
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
                k=scalar_int(z["k"], "k", path),
                feature_names=[str(s) for s in names] if names.size else None,
                layout_version=scalar_int(z["layout_version"], "layout_version", path),
                n_source=scalar_int(z["n_source"], "n_source", path),
            )
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def __repr__(self) -> str:
        return (
            f"FeatureReference(dim={self.dim}, bank={self.bank.shape[0]}, k={self.k}, "
            f"scale={self.scale:.4g}, n_source={self.n_source})"
        )
