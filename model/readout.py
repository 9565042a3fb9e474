"""The online novelty readout of a generated answer (numpy only).

Every answer (a few bars of notes) gets a :class:`Readout` from :func:`compute_readout`:

- ``surprisal_bits_per_note``: the answer's token log-probs (under the model, from the
  sampler) summed, in bits, per note;
- ``copy_rate``: share of the answer's interval 8-grams found in the training set
  (``model.copy_index``: :func:`~divergent.model.copy_index.interval_ngrams` looked up in
  a Bloom filter, :class:`~divergent.model.copy_index.NgramIndex`);
- ``feature_distance``: distance of the answer's feature vector (``model.features``) to
  the training distribution, ~1.0 for a typical training segment
  (``model.feature_reference``);
- ``in_scale`` and ``groove``: MusPy's scale consistency and groove consistency
  (``model.features``).

The notes are read once (``model.note_arrays``) and every metric runs vectorised on
them, so a whole readout of a 4-bar answer takes well under a millisecond on one core.
The banks are built offline by ``model.readout_build``; offline evaluation also uses
``model.precision_recall``. This module never imports torch or music21.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from divergent.model.copy_index import NgramIndex, copy_rate_of
from divergent.model.feature_reference import FeatureReference
from divergent.model.features import (
    FEATURE_LAYOUT_VERSION,
    FEATURE_NAMES,
    N_FEATURES,
    features_of,
    groove_of,
    in_scale_of,
)
from divergent.model.note_arrays import NoteLike, check_beats_per_bar, note_arrays

__all__ = ["Readout", "compute_readout"]


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
    bpb = check_beats_per_bar(beats_per_bar)
    a = note_arrays(notes)
    m = len(a)
    total = math.fsum(token_logprobs_nats)
    surprisal = (0.0 - total) / _LN2 / max(1, m)  # 0.0, not -0.0, for no tokens
    cr = None if index is None else copy_rate_of(a, index, n)
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
            dist = reference.distance(features_of(a, bpb))
    return Readout(
        surprisal_bits_per_note=surprisal,
        copy_rate=cr,
        feature_distance=dist,
        in_scale=in_scale_of(a),
        groove=groove_of(a, bpb, 12),
        notes=m,
        compute_ms=float(compute_ms),
        readout_ms=(time.perf_counter() - t0) * 1e3,
    )
