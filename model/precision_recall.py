"""Offline: improved precision and recall of generated against real feature vectors
(numpy only)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from divergent.model.feature_reference import sq_norms
from divergent.model.note_arrays import F64

__all__ = ["knn_precision_recall"]


def _pairwise_sq(a: F64, b: F64) -> F64:
    d2 = sq_norms(a)[:, None] - 2.0 * (a @ b.T) + sq_norms(b)[None, :]
    return np.maximum(d2, 0.0, out=d2)


def _kth_radius_sq(x: F64, k: int) -> F64:
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
