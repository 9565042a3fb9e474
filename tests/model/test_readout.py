"""The novelty readout and its metrics (model.readout and the modules it reads), on
hand-made phrases."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from divergent.model.copy_index import NgramIndex, copy_rate, interval_ngrams
from divergent.model.feature_reference import FeatureReference
from divergent.model.features import (
    FEATURE_NAMES,
    N_FEATURES,
    features,
    groove_consistency,
    in_scale_rate,
)
from divergent.model.grammar import NoteEvent
from divergent.model.precision_recall import knn_precision_recall
from divergent.model.readout import Readout, compute_readout
from divergent.model.readout_build import build_reference_and_index

#: the readout's rooms, each numpy-only
MODULES = tuple(
    f"divergent.model.{name}"
    for name in (
        "note_arrays",
        "features",
        "npz_store",
        "copy_index",
        "feature_reference",
        "precision_recall",
        "readout",
        "readout_build",
    )
)

C_MAJOR = [60, 62, 64, 65, 67, 69, 71, 72]


def line(pitches: Sequence[int], *, step: float = 0.5, start: float = 0.0) -> list[NoteEvent]:
    """A monophonic line, one note every ``step`` quarter notes (bar_index for 4/4)."""
    return [
        NoteEvent(start + i * step, int(p), step, int((start + i * step) // 4))
        for i, p in enumerate(pitches)
    ]


def notes_at(onsets: Iterable[float], pitch: int = 60, dur: float = 0.25) -> list[NoteEvent]:
    return [NoteEvent(float(o), pitch, dur, int(o // 4)) for o in onsets]


def random_walk(m: int, seed: int, start: int = 62) -> list[NoteEvent]:
    rng = np.random.default_rng(seed)
    return line((start + np.cumsum(rng.integers(-5, 6, m))).tolist(), step=0.25)


def transpose(notes: Sequence[NoteEvent], semis: int, beats: float = 0.0) -> list[NoteEvent]:
    return [
        NoteEvent(n.onset_beats + beats, n.pitch + semis, n.duration_beats, n.bar_index)
        for n in notes
    ]


def feat(name: str, v: np.ndarray) -> float:
    return float(v[FEATURE_NAMES.index(name)])


# ------------------------------------------------------------------------ features
def test_feature_layout():
    assert N_FEATURES == len(FEATURE_NAMES) == 40
    assert len(set(FEATURE_NAMES)) == N_FEATURES
    v = features(random_walk(40, seed=0))
    assert v.dtype == np.float32 and v.shape == (N_FEATURES,)
    assert np.all(np.isfinite(v)) and np.all(v >= 0)
    for prefix in ("pc_rel_", "interval_", "ioi_", "pos_"):
        block = [x for x, nm in zip(v, FEATURE_NAMES, strict=True) if nm.startswith(prefix)]
        assert sum(block) == pytest.approx(1.0, abs=1e-6), prefix


def test_features_of_a_c_major_scale():
    v = features(line(C_MAJOR))  # eighth notes, 8 notes = one 4/4 bar
    assert feat("pc_rel_0", v) == pytest.approx(2 / 8)  # C twice: the most frequent
    assert feat("interval_1..2", v) == 1.0
    assert feat("ioi_1/2", v) == 1.0
    assert feat("pos_downbeat", v) == pytest.approx(1 / 8)
    assert feat("pos_beat", v) == pytest.approx(3 / 8)
    assert feat("pos_eighth", v) == pytest.approx(4 / 8)
    assert feat("note_density", v) == pytest.approx(2.0)  # 8 notes in one 4-beat bar
    assert feat("pitch_range", v) == pytest.approx(12 / 24)
    assert feat("mean_duration", v) == pytest.approx(0.5)
    assert feat("polyphony", v) == 1.0
    assert feat("pc_entropy", v) == pytest.approx(
        -(2 / 8 * math.log(2 / 8) + 6 / 8 * math.log(1 / 8)) / math.log(12), rel=1e-6
    )


def test_features_chords_use_the_skyline_and_count_polyphony():
    chords = [
        NoteEvent(float(b), p, 1.0, 0)
        for b, root in enumerate((60, 65, 67, 60))
        for p in (root, root + 4, root + 7)
    ]
    v = features(chords)
    assert feat("polyphony", v) == 3.0
    # skyline 67 -> 72 -> 74 -> 67: +5, +2, -7
    assert feat("interval_5..7", v) == pytest.approx(1 / 3)
    assert feat("interval_1..2", v) == pytest.approx(1 / 3)
    assert feat("interval_-7..-5", v) == pytest.approx(1 / 3)
    assert feat("ioi_1", v) == 1.0
    assert feat("note_density", v) == pytest.approx(12 / 4)


def test_metrical_positions_and_ioi_bins():
    onsets = [0.0, 1.0, 1.5, 1.75, 2 + 1 / 3, 2.4, 4.0, 8.0]
    v = features(notes_at(onsets), beats_per_bar=4.0)
    expected = {"downbeat": 3, "beat": 1, "eighth": 1, "sixteenth": 1, "triplet": 1, "other": 1}
    for name, count in expected.items():
        assert feat(f"pos_{name}", v) == pytest.approx(count / 8), name
    # IOIs: 1, 0.5, 0.25, 7/12 (-> 1/2), 1/15 (-> 1/8), 1.6 (-> 2), 4 (-> >2)
    got = {nm[4:]: x * 7 for nm, x in zip(FEATURE_NAMES, v, strict=True) if nm.startswith("ioi_")}
    assert got == pytest.approx(
        {"<=1/8": 1, "1/6": 0, "1/4": 1, "1/3": 0, "1/2": 2, "1": 1, "2": 1, ">2": 1}
    )
    # three bars from the first to the last onset's bar
    assert feat("note_density", v) == pytest.approx(8 / 12)


@pytest.mark.parametrize("semis, bars", [(5, 0), (-7, 3), (12, 1), (1, 10)])
def test_features_are_transposition_and_bar_shift_invariant(semis: int, bars: int):
    notes = random_walk(37, seed=semis + 100)
    np.testing.assert_array_equal(features(notes), features(transpose(notes, semis, 4.0 * bars)))


def test_features_ignore_input_order():
    notes = [*random_walk(30, seed=3), NoteEvent(1.0, 50, 1.0, 0), NoteEvent(1.0, 80, 1.0, 0)]
    shuffled = [notes[i] for i in np.random.default_rng(0).permutation(len(notes))]
    np.testing.assert_array_equal(features(notes), features(shuffled))


def test_features_reject_empty_and_bad_metre():
    with pytest.raises(ValueError, match="empty"):
        features([])
    with pytest.raises(ValueError):
        features(line(C_MAJOR), beats_per_bar=0.0)


# -------------------------------------------------------------------- scale / groove
def _scale_consistency_by_definition(pitches: Sequence[int]) -> float:
    major = {0, 2, 4, 5, 7, 9, 11}
    minor = {0, 2, 3, 5, 7, 8, 10}
    best = 0.0
    for scale, root in itertools.product((major, minor), range(12)):
        inside = sum(((p - root) % 12) in scale for p in pitches)
        best = max(best, inside / len(pitches))
    return best


def test_in_scale_rate_known_phrases():
    assert in_scale_rate(line(C_MAJOR)) == 1.0
    assert in_scale_rate(line([57, 59, 60, 62, 64, 65, 67, 69])) == 1.0  # A natural minor
    assert in_scale_rate(line([66, 68, 70, 71, 73, 75, 77])) == 1.0  # F# major
    cluster = line(range(60, 72))  # all 12 pitch classes once
    assert in_scale_rate(cluster) <= 7 / 12 + 1e-9
    assert in_scale_rate(cluster) == pytest.approx(7 / 12)
    assert in_scale_rate([]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_in_scale_rate_matches_the_definition(seed: int):
    rng = np.random.default_rng(seed)
    pitches = rng.integers(40, 90, int(rng.integers(1, 60))).tolist()
    assert in_scale_rate(line(pitches)) == pytest.approx(_scale_consistency_by_definition(pitches))


def test_groove_consistency():
    bar = [0.0, 1.0, 1.5, 2.0, 3.0]
    same = notes_at([b * 4 + o for b in range(4) for o in bar])
    assert groove_consistency(same) == 1.0
    # the same bars 10 bars later: leading empty bars are not counted
    assert groove_consistency(transpose(same, 0, 40.0)) == 1.0
    # bar 0: onsets at 0, 1, 2, 3; bar 1: 0, 2 -> Hamming distance 2 of 48 positions
    two = notes_at([0, 1, 2, 3, 4, 6])
    assert groove_consistency(two) == pytest.approx(1 - 2 / 48)
    rng = np.random.default_rng(0)
    varied = notes_at(np.sort(rng.choice(4 * 16, 24, replace=False)) / 4)
    assert groove_consistency(varied) < 0.95
    assert groove_consistency(notes_at([0, 1, 2.5])) == 1.0  # one bar
    assert groove_consistency([]) == 1.0


def test_groove_consistency_in_six_eight_and_bad_resolution():
    jig_bar = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    notes = notes_at([b * 3 + o for b in range(3) for o in jig_bar])
    assert groove_consistency(notes, beats_per_bar=3.0) == 1.0
    # read in 4/4 the same onsets no longer line up bar to bar
    assert groove_consistency(notes, beats_per_bar=4.0) < 1.0
    with pytest.raises(ValueError):
        groove_consistency(notes, beats_per_bar=1.1, resolution=12)
    with pytest.raises(ValueError):
        groove_consistency(notes, resolution=0)


# -------------------------------------------------------------------------- n-grams
def test_interval_ngram_keys():
    keys = interval_ngrams(line([60, 62, 61, 61]), n=3)
    assert keys.dtype == np.uint64
    # intervals +2, -1, 0 -> digits 26, 23, 24 (base 49, offset 24)
    assert keys.tolist() == [26 * 49 + 23, 23 * 49 + 24]
    assert interval_ngrams(line(C_MAJOR[:7]), n=8).size == 0
    assert interval_ngrams(line(C_MAJOR), n=8).size == 1
    # intervals beyond two octaves are clipped to +-24
    assert interval_ngrams(line([30, 90]), n=2).tolist() == [48]
    assert interval_ngrams(line([90, 30]), n=2).tolist() == [0]
    # ordered by (onset, pitch): a chord reads upwards
    chord = [NoteEvent(0.0, 67, 1.0, 0), NoteEvent(0.0, 60, 1.0, 0), NoteEvent(0.0, 64, 1.0, 0)]
    assert interval_ngrams(chord, n=3).tolist() == [28 * 49 + 27]
    with pytest.raises(ValueError):
        interval_ngrams(line(C_MAJOR), n=1)
    with pytest.raises(ValueError):
        interval_ngrams(line(C_MAJOR), n=13)


@pytest.mark.parametrize("n", [2, 5, 8, 12])
def test_interval_ngrams_are_exact_and_transposition_invariant(n: int):
    notes = random_walk(60, seed=n)
    keys = interval_ngrams(notes, n=n)
    assert keys.size == 60 - n + 1
    np.testing.assert_array_equal(keys, interval_ngrams(transpose(notes, 7, 2.0), n=n))
    # decode base 49 back to the intervals
    iv = np.diff([x.pitch for x in notes])
    for i, key in enumerate(keys.tolist()):
        digits = [(key // 49**j) % 49 - 24 for j in reversed(range(n - 1))]
        assert digits == iv[i : i + n - 1].tolist()


def test_bloom_filter_has_no_false_negatives_and_the_expected_fp_rate():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 49**7, 10_000, dtype=np.int64).astype(np.uint64))
    index = NgramIndex.build(keys, bits=2**16, k=4)
    assert index.n_keys == keys.size and index.bits == 2**16
    assert index.contains(keys).all()
    textbook = (1 - math.exp(-4 * keys.size / 2**16)) ** 4
    assert index.expected_false_positive_rate == pytest.approx(textbook, rel=0.05)
    others = np.setdiff1d(rng.integers(0, 49**7, 120_000, dtype=np.int64).astype(np.uint64), keys)
    fp = float(index.contains(others).mean())
    # ~4.4% expected; 5 standard errors of 120k Bernoulli draws are ~0.3%
    assert fp == pytest.approx(index.expected_false_positive_rate, abs=0.005)


def test_bloom_filter_on_structured_keys():
    # consecutive keys (e.g. n-grams differing in their last interval) hash as well as random
    keys = np.arange(20_000, dtype=np.uint64)
    index = NgramIndex.build(keys, bits=2**17, k=4)
    assert index.contains(keys).all()
    fp = float(index.contains(np.arange(20_000, 120_000, dtype=np.uint64)).mean())
    assert fp == pytest.approx(index.expected_false_positive_rate, abs=0.005)
    assert NgramIndex.build(np.zeros(0, dtype=np.uint64), bits=64).contains([1, 2]).tolist() == [
        False,
        False,
    ]


def test_bloom_filter_rejects_bad_arguments():
    with pytest.raises(ValueError):
        NgramIndex.build([1, 2], bits=1000)
    with pytest.raises(ValueError):
        NgramIndex.build([1, 2], k=0)
    with pytest.raises(ValueError):
        NgramIndex.build([-1])
    with pytest.raises(ValueError):
        NgramIndex.build(np.array([0.5]))


def test_copy_rate():
    training = [random_walk(64, seed=s) for s in range(50)]
    keys = np.concatenate([interval_ngrams(w, 8) for w in training])
    index = NgramIndex.build(keys, bits=2**18, n=8)
    copied = training[7][10:30]
    assert copy_rate(copied, index) == 1.0
    assert copy_rate(transpose(copied, -5, 8.0), index) == 1.0
    new = random_walk(40, seed=12345)
    rate = copy_rate(new, index)
    assert rate is not None and rate <= 0.05
    half = training[3][:20] + transpose(random_walk(20, seed=999), 0, 10.0)
    rate = copy_rate(half, index)
    assert rate is not None and 0.3 < rate < 0.7
    assert copy_rate(copied[:7], index) is None
    with pytest.raises(ValueError, match="8-grams"):
        copy_rate(copied, index, n=6)


# ------------------------------------------------------------------- distributions
def test_knn_precision_recall_same_distribution():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 4))
    fake = rng.normal(size=(600, 4))
    p, r = knn_precision_recall(real, fake, k=3)
    assert p > 0.9 and r > 0.9  # 0.95, 0.94 (in many dimensions small k reads lower)


def test_knn_precision_recall_far_and_collapsed():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 8))
    p, r = knn_precision_recall(real, rng.normal(size=(400, 8)) + 50.0, k=3)
    assert p == 0.0 and r == 0.0
    # mode collapse: every fake point near the centre -> precise, but covers little
    p, r = knn_precision_recall(real, 0.1 * rng.normal(size=(400, 8)), k=3)
    assert p > 0.95 and r < 0.3


def test_knn_precision_recall_matches_a_loop():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(30, 3)), rng.normal(0.5, 1.2, size=(25, 3))

    def radii(x: np.ndarray, k: int) -> np.ndarray:
        return np.array([sorted(np.linalg.norm(x - a, axis=1))[k] for a in x])

    rr, rf = radii(real, 3), radii(fake, 3)
    prec = np.mean([any(np.linalg.norm(f - a) <= rr[i] for i, a in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(a - f) <= rf[j] for j, f in enumerate(fake)) for a in real])
    assert knn_precision_recall(real, fake, k=3) == pytest.approx((prec, rec))
    with pytest.raises(ValueError):
        knn_precision_recall(real, fake[:, :2])
    with pytest.raises(ValueError):
        knn_precision_recall(real, fake, k=25)


@pytest.fixture(scope="module")
def gaussian_reference() -> tuple[FeatureReference, np.ndarray]:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 3.0, N_FEATURES)
    train = rng.normal(size=(3000, N_FEATURES)) * scale + 5.0
    train[:, 7] = 0.25  # a constant feature: std floored
    ref = FeatureReference.build(train, bank_size=2048, k=5, seed=0, feature_names=FEATURE_NAMES)
    return ref, scale


def test_feature_reference_distance(gaussian_reference: tuple[FeatureReference, np.ndarray]):
    ref, scale = gaussian_reference
    assert ref.bank.shape == (2048, N_FEATURES) and ref.bank.dtype == np.float16
    assert ref.std[7] == pytest.approx(1e-3)
    rng = np.random.default_rng(1)
    fresh = rng.normal(size=(300, N_FEATURES)) * scale + 5.0
    fresh[:, 7] = 0.25
    d = ref.distances(fresh)
    assert 0.9 < float(np.median(d)) < 1.15
    assert ref.distance(fresh[0]) == pytest.approx(d[0], rel=1e-5)
    far = fresh[:20] + 6.0 * scale
    assert float(ref.distances(far).min()) > 3.0
    off = fresh[0].copy()
    off[7] = 0.3  # off the constant feature by 50 floored stds
    assert ref.distance(off) > 3.0
    with pytest.raises(ValueError):
        ref.distance(fresh[0, :10])


def test_feature_reference_dedups_and_rejects_too_few():
    rows = np.repeat(np.eye(6), 50, axis=0)  # 6 distinct rows, each 50 times
    ref = FeatureReference.build(rows, k=5)
    assert ref.bank.shape[0] == 6 and ref.scale > 0
    with pytest.raises(ValueError, match="distinct"):
        FeatureReference.build(np.repeat(np.eye(5), 3, axis=0), k=5)


# ----------------------------------------------------------------------- save/load
def _index() -> NgramIndex:
    keys = np.random.default_rng(3).integers(0, 2**40, 5000, dtype=np.int64)
    return NgramIndex.build(keys, bits=2**15, k=3, n=8)


def _reference() -> FeatureReference:
    x = np.random.default_rng(4).normal(size=(500, N_FEATURES))
    return FeatureReference.build(x, bank_size=256, feature_names=FEATURE_NAMES)


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, NgramIndex):
        assert (a.bits, a.k, a.n_keys, a.n) == (b.bits, b.k, b.n_keys, b.n)
        probe = np.arange(10_000, dtype=np.uint64)
        np.testing.assert_array_equal(a.contains(probe), b.contains(probe))
        assert a.expected_false_positive_rate == b.expected_false_positive_rate
    else:
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.std, b.std)
        np.testing.assert_array_equal(a.bank, b.bank)
        assert (a.scale, a.k, a.feature_names, a.n_source) == (
            b.scale,
            b.k,
            b.feature_names,
            b.n_source,
        )
        v = np.linspace(-1, 1, N_FEATURES)
        assert a.distance(v) == b.distance(v)


MAKERS: dict[str, tuple[Callable[[], Any], Any]] = {
    "index": (_index, NgramIndex),
    "reference": (_reference, FeatureReference),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("name", ["thing.npz", "no_suffix"])
def test_save_load_round_trip(kind: str, name: str, tmp_path: Path):
    make, cls = MAKERS[kind]
    obj = make()
    path = tmp_path / name
    obj.save(path)
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]
    _same(obj, cls.load(path))


def test_index_without_n_round_trips(tmp_path: Path):
    index = NgramIndex.build([1, 2, 3], bits=1024)
    index.save(tmp_path / "i.npz")
    assert NgramIndex.load(tmp_path / "i.npz").n is None


def _truncate(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _flip_middle(b: bytes) -> bytes:
    mid = len(b) // 2
    return b[:mid] + bytes(x ^ 0xFF for x in b[mid : mid + 16]) + b[mid + 16 :]


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_middle, lambda b: b"not a zip file at all", lambda b: b""],
    ids=["truncated", "flipped", "garbage", "empty"],
)
def test_corrupted_files_raise_value_error(kind: str, damage: Any, tmp_path: Path):
    make, cls = MAKERS[kind]
    path = tmp_path / "x.npz"
    make().save(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError):
        cls.load(path)


def test_foreign_and_wrong_version_files_raise_value_error(tmp_path: Path):
    _reference().save(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="format"):
        NgramIndex.load(tmp_path / "ref.npz")
    _index().save(tmp_path / "idx.npz")
    with pytest.raises(ValueError, match="format"):
        FeatureReference.load(tmp_path / "idx.npz")
    with np.load(tmp_path / "idx.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(tmp_path / "v2.npz", **{**arrays, "version": np.array(2)})
    with pytest.raises(ValueError, match="version"):
        NgramIndex.load(tmp_path / "v2.npz")
    np.savez_compressed(tmp_path / "short.npz", **{**arrays, "data": arrays["data"][:-1]})
    with pytest.raises(ValueError, match="bit array"):
        NgramIndex.load(tmp_path / "short.npz")
    np.savez_compressed(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="format"):
        NgramIndex.load(tmp_path / "plain.npz")
    del arrays["k"]
    np.savez_compressed(tmp_path / "no_k.npz", **arrays)
    with pytest.raises(ValueError, match="missing"):
        NgramIndex.load(tmp_path / "no_k.npz")
    with pytest.raises(FileNotFoundError):
        NgramIndex.load(tmp_path / "nothing_here.npz")


# -------------------------------------------------------------------------- readout
def test_compute_readout(gaussian_reference: tuple[FeatureReference, np.ndarray]):
    training = [random_walk(64, seed=s) for s in range(20)]
    index = NgramIndex.build(
        np.concatenate([interval_ngrams(w) for w in training]), bits=2**16, n=8
    )
    ref, _ = build_reference_and_index(((w, 4.0) for w in training), lambda w: w, bits=2**10)
    answer = training[2][:40]
    logprobs = [-0.5, -1.0, -2.0] * 40
    out = compute_readout(
        answer, token_logprobs_nats=logprobs, index=index, reference=ref, compute_ms=12.5
    )
    assert isinstance(out, Readout)
    assert out.notes == 40
    assert out.surprisal_bits_per_note == pytest.approx(3.5 * 40 / math.log(2) / 40)
    assert out.copy_rate == 1.0
    assert out.in_scale == in_scale_rate(answer)
    assert out.groove == groove_consistency(answer)
    assert out.feature_distance == pytest.approx(ref.distance(features(answer)))
    assert out.compute_ms == 12.5 and out.readout_ms > 0
    d = out.to_dict()
    assert set(d) == {
        "surprisal_bits_per_note",
        "copy_rate",
        "feature_distance",
        "in_scale",
        "groove",
        "notes",
        "compute_ms",
        "readout_ms",
    }
    json.dumps(d, allow_nan=False)
    # a reference for another feature layout is refused
    other, _ = gaussian_reference
    assert other.dim == N_FEATURES
    bad = FeatureReference(other.mean[:10], other.std[:10], other.bank[:, :10], scale=1.0)
    with pytest.raises(ValueError, match="layout"):
        compute_readout(answer, token_logprobs_nats=logprobs, index=None, reference=bad)


def test_compute_readout_without_index_reference_or_notes():
    out = compute_readout([], token_logprobs_nats=[-1.0], index=None, reference=None)
    assert out.notes == 0 and out.copy_rate is None and math.isnan(out.feature_distance)
    assert out.in_scale == 0.0 and out.groove == 1.0
    assert out.surprisal_bits_per_note == pytest.approx(1 / math.log(2))
    d = out.to_dict()
    assert d["feature_distance"] is None and d["copy_rate"] is None
    json.dumps(d, allow_nan=False)


# --------------------------------------------------------------------------- build
def test_build_reference_and_index_from_synthetic_works():
    works = [(random_walk(48, seed=s), 4.0) for s in range(30)]  # 3 bars of 16ths each
    ref, index = build_reference_and_index(works, lambda w: w, n=6, segment_bars=2, bits=2**16)
    assert index.n == 6 and ref.feature_names == FEATURE_NAMES
    for w, _ in works:
        assert copy_rate(w, index, n=6) == 1.0
    assert ref.n_source == 30 * 2  # two 2-bar windows per 3-bar work
    again, _ = build_reference_and_index(works, lambda w: w, n=6, segment_bars=2, bits=2**16)
    np.testing.assert_array_equal(ref.bank, again.bank)
    # a reservoir smaller than the number of windows keeps max_segments of them
    small, _ = build_reference_and_index(works, lambda w: w, max_segments=16, bits=2**10)
    assert small.n_source == 16


def test_build_from_grammar_notes_of_real_tunes():
    import symusic

    from divergent.model.grammar import notes_from_ids
    from divergent.model.tokenizer import build_tokenizer
    from tests.conftest import ABC_TUNES

    tok = build_tokenizer()
    bpb = {"reel_4_4": 4.0, "jig_6_8": 3.0, "waltz_3_4": 3.0}
    works = [
        (tok.encode_score(symusic.Score.from_abc(abc)), bpb[k]) for k, abc in ABC_TUNES.items()
    ]

    def decode(item: tuple[np.ndarray, float]) -> tuple[list[NoteEvent], float]:
        return notes_from_ids(item[0].tolist(), tok.vocab), item[1]

    ref, index = build_reference_and_index(works, decode, n=8, segment_bars=2, bits=2**12)
    jig = decode(works[1])[0]
    assert copy_rate(jig, index) == 1.0
    assert in_scale_rate(jig) == 1.0  # G major
    waltz = decode(works[2])[0]
    assert groove_consistency(waltz, beats_per_bar=3.0) < 1.0
    out = compute_readout(
        jig[:12], token_logprobs_nats=[], index=index, reference=ref, beats_per_bar=3.0
    )
    assert out.copy_rate == 1.0 and math.isfinite(out.feature_distance)


def test_readout_modules_do_not_import_torch_or_music21():
    code = (
        f"import sys, {', '.join(MODULES)}; "
        "bad = {'torch', 'music21'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("module", MODULES)
def test_no_module_level_mutable_arrays(module: str):
    m = importlib.import_module(module)
    for name in dir(m):
        value = getattr(m, name)
        if isinstance(value, np.ndarray):
            assert not value.flags.writeable, name
