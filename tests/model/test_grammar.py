"""The REMI grammar (masks, note events, clock) and the token sampler."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import symusic

from divergent.model.grammar import (
    GrammarError,
    NoteEvent,
    RemiGrammar,
    Sampler,
    logsoftmax,
    notes_from_ids,
)
from divergent.model.tokenizer import DivergentTokenizer, build_tokenizer

ABC_TUNES = {
    "4/4": "X:1\nM:4/4\nL:1/8\nK:C\nCDEF GABc|c4 G4|(3cBA G2 z4|[CEG]4 [CEGc]4|\n",
    "6/8": "X:1\nM:6/8\nL:1/8\nK:D\nDFA d2c|B2A G2F|E3 z3|DFA dfa|\n",
    "3/4": "X:1\nM:3/4\nL:1/4\nK:G\nG A B|[Gc]2 d|e3|z3|B/c/d/e/ f g|\n",
    "2/2": "X:1\nM:2/2\nL:1/4\nK:C\nC D E F|G4|c2 G2|\n",
    "3/4->6/8": "X:1\nM:3/4\nL:1/4\nK:C\nC D E|F3|[M:6/8] G/A/B/ c/B/A/|G3|\n",
}


def _chordal_score() -> Any:
    """Block chords, a suspension and overlapping voices in 4/4 (tpq 480)."""
    s: Any = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    t: Any = symusic.Track(program=0, is_drum=False, name="chords")
    chords = [
        (0, 960, (48, 60, 64, 67)),
        (960, 480, (53, 60, 65, 69)),
        (1440, 240, (55, 62, 67, 71)),
        (1680, 240, (74,)),
        (1920, 1920, (48, 64, 67, 72)),
        (2400, 480, (76,)),
        (3840 + 160, 160, (60, 63)),  # triplet eighths
        (3840 + 320, 1280, (67,)),
    ]
    for onset, dur, pitches in chords:
        for p in pitches:
            t.notes.append(symusic.Note(onset, dur, p, 80))
    s.tracks.append(t)
    return s


@pytest.fixture(scope="module")
def tok() -> DivergentTokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def pieces(tok: DivergentTokenizer) -> dict[str, np.ndarray]:
    out = {name: tok.encode_score(symusic.Score.from_abc(abc)) for name, abc in ABC_TUNES.items()}
    out["chords"] = tok.encode_score(_chordal_score())
    return out


def _ids(tok: DivergentTokenizer, names: str) -> list[int]:
    index = {n: i for i, n in enumerate(tok.vocab.names)}
    return [index[n] for n in names.split()]


def _decoded_notes(tok: DivergentTokenizer, ids: list[int] | np.ndarray) -> list[tuple]:
    score: Any = tok.decode_ids(ids)
    q = score.tpq
    return sorted((n.time / q, n.pitch, n.duration / q) for tr in score.tracks for n in tr.notes)


def _event_notes(notes: list[NoteEvent]) -> list[tuple]:
    return sorted((n.onset_beats, n.pitch, n.duration_beats) for n in notes)


def _assert_same_notes(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-9)


# --------------------------------------------------------------------------- grammar
def test_real_encodings_are_allowed_token_by_token(tok, pieces):
    v = tok.vocab
    for name, ids in pieces.items():
        g = RemiGrammar(v, allow_eos=True)
        g.feed(v.bos)  # BOS is never sampled, but a stream may start with it
        for t in [*ids.tolist(), v.eos]:
            assert g.mask()[t] == 0.0, (name, v.names[t], g.state)
            g.feed(t, strict=True)
        assert g.ended


def test_note_events_match_decoder(tok, pieces):
    for name, ids in pieces.items():
        got = _event_notes(notes_from_ids(ids, tok.vocab))
        _assert_same_notes(got, _decoded_notes(tok, ids))
        assert got, name


def test_time_units_are_the_denominator_beat(tok):
    # 6/8: 12 positions per eighth; 2/2: 12 per half note; Duration_b.t.r in those beats
    ids = _ids(
        tok,
        "Bar_None TimeSig_6/8 Position_12 Pitch_60 Duration_1.0.12 Position_71 Pitch_61 "
        "Duration_6.0.4 Bar_None TimeSig_2/2 Position_6 Pitch_62 Duration_0.6.12 "
        "Bar_None TimeSig_4/4 Position_47 Pitch_64 Duration_2.0.12",
    )
    notes = notes_from_ids(ids, tok.vocab)
    assert [(n.onset_beats, n.pitch, n.duration_beats, n.bar_index) for n in notes] == [
        pytest.approx((0.5, 60, 0.5, 0)),
        pytest.approx((71 / 24, 61, 3.0, 0)),
        pytest.approx((3.0 + 1.0, 62, 1.0, 1)),
        pytest.approx((3.0 + 4.0 + 47 / 12, 64, 2.0, 2)),
    ]
    _assert_same_notes(_event_notes(notes), _decoded_notes(tok, ids))


def test_prompt_then_continue_state_and_clock(tok, pieces):
    v = tok.vocab
    g = RemiGrammar(v)
    ids = pieces["6/8"]
    notes = g.feed_many(ids)
    assert len(notes) == len(notes_from_ids(ids, v))
    assert g.state == "duration"
    assert g.timesig == (6, 8)
    assert g.timesig_token == g.timesig_id(6, 8)
    assert g.bar_index == 3 and g.bars_completed == 3
    assert g.bar_start_beats == pytest.approx(9.0) and g.bar_length_beats == pytest.approx(3.0)
    assert g.position == 60 and g.position_beats == pytest.approx(9.0 + 2.5)
    m = g.mask()
    allowed = {v.names[i].split("_")[0] for i in np.flatnonzero(m == 0.0)}
    assert allowed == {"Pitch", "Position", "Bar"}
    positions = sorted(int(v.value[i]) for i in np.flatnonzero(m == 0.0) if i in v.position_ids)
    assert positions == list(range(61, 72))  # after 60, inside the 6/8 bar
    assert m[v.pitch_ids[81 - v.min_pitch]] == -np.inf  # already sounding here
    g.feed(v.bar)
    assert g.bars_completed == 4 and g.bar_start_beats == pytest.approx(12.0)
    g.fixed_timesig = g.timesig_id(6, 8)
    assert np.flatnonzero(g.mask() == 0.0).tolist() == [g.timesig_id(6, 8)]


def test_structural_rules(tok):
    v = tok.vocab
    never = np.concatenate([[v.pad, v.bos], v.concept_ids])
    g = RemiGrammar(v)
    assert np.flatnonzero(g.mask() == 0.0).tolist() == [v.bar]
    g.feed(v.bar)
    m = g.mask()
    assert m[v.bar] == -np.inf  # no Bar right after Bar
    assert set(np.flatnonzero(m == 0.0).tolist()) == set(v.timesig_ids.tolist())
    g.feed(g.timesig_id(3, 4))
    m = g.mask()
    assert m[v.bar] == 0.0  # an empty bar (a bar of rest, as in the data)
    assert int((m[v.position_ids] == 0.0).sum()) == 36
    g.allow_empty_bars = False
    assert g.mask()[v.bar] == -np.inf
    g.feed(_ids(tok, "Position_35")[0])
    assert set(np.flatnonzero(g.mask() == 0.0).tolist()) == set(v.pitch_ids.tolist())
    g.feed(v.pitch_ids[40])
    assert set(np.flatnonzero(g.mask() == 0.0).tolist()) == set(v.duration_ids.tolist())
    g.feed(v.duration_ids[3])
    m = g.mask()
    assert not (m[v.position_ids] == 0.0).any()  # last position of the bar taken
    assert m[v.eos] == -np.inf and m[v.bar] == 0.0
    g.allow_eos = True
    assert g.mask()[v.eos] == 0.0
    for _ in range(3):  # fill the chord up to max_polyphony
        g.feed(int(np.flatnonzero(g.mask()[v.pitch_ids] == 0.0)[0] + v.pitch_ids[0]))
        g.feed(v.duration_ids[0])
    assert g.notes_at_position == 4
    assert not (g.mask()[v.pitch_ids] == 0.0).any()
    assert (g.mask()[never] == -np.inf).all()
    with pytest.raises(GrammarError):
        g.feed(v.pitch_ids[0], strict=True)
    with pytest.raises(GrammarError):
        g.feed(v.size)


def test_special_tokens_do_not_move_the_stream(tok):
    v = tok.vocab
    ids = _ids(tok, "Bar_None TimeSig_4/4 Position_12 Pitch_60 Duration_1.0.12")
    noisy = [v.bos, v.concept_ids[0], *ids[:4], v.pad, v.concept_ids[3], ids[4], v.eos]
    g = RemiGrammar(v)
    notes = g.feed_many(noisy)
    assert notes == [NoteEvent(1.0, 60, 1.0, 0)]
    assert notes == notes_from_ids(ids, v)
    assert g.ended and g.bars_completed == 1
    assert np.flatnonzero(g.mask() == 0.0).tolist() == [v.bar]
    _assert_same_notes(_event_notes(notes), _decoded_notes(tok, noisy))


def test_mask_is_cached_readonly_float32(tok, pieces):
    g = RemiGrammar(tok.vocab)
    g.feed_many(pieces["chords"])
    m = g.mask()
    assert m is g.mask()
    assert m.dtype == np.float32 and m.shape == (tok.vocab.size,)
    assert not m.flags.writeable
    with pytest.raises(ValueError):
        m[0] = 0.0


def _check_stream(tok: DivergentTokenizer, ids: list[int], max_poly: int) -> None:
    """Well-formedness checked from token names alone (independent of the grammar)."""
    v = tok.vocab
    bar_len, pos = 0, -1
    pitches: list[int] = []
    for a, b in itertools.pairwise(ids):
        ka, kb = v.kind(a), v.kind(b)
        assert (
            kb
            in {
                "Bar": {"TimeSig"},
                "TimeSig": {"Position", "Bar"},
                "Position": {"Pitch"},
                "Pitch": {"Duration"},
                "Duration": {"Pitch", "Position", "Bar"},
            }[ka]
        ), (v.names[a], v.names[b])
    for t in ids:
        k = v.kind(t)
        if k == "TimeSig":
            num, _ = v.timesig[t]
            bar_len, pos = num * 12, -1
        elif k == "Position":
            assert pos < v.value[t] < bar_len
            pos, pitches = int(v.value[t]), []
        elif k == "Pitch":
            assert t not in pitches
            pitches.append(t)
            assert len(pitches) <= max_poly


@pytest.mark.parametrize("fixed", [False, True])
def test_random_sampling_stays_decodable(tok, pieces, fixed):
    v = tok.vocab
    g = RemiGrammar(v)
    prompt = pieces["3/4"].tolist()
    g.feed_many(prompt)
    if fixed:
        g.fixed_timesig = g.timesig_token
    s = Sampler(v.size, seed=7)
    logits = np.zeros(v.size, dtype=np.float32)
    out: list[int] = []
    notes: list[NoteEvent] = []
    for _ in range(2000):
        t = s.sample(logits, g.mask())
        n = g.feed(t, strict=True)
        if n is not None:
            notes.append(n)
        out.append(t)
    _check_stream(tok, prompt + out, 4)
    kinds = {v.kind(t) for t in out}
    assert {"Bar", "TimeSig", "Position", "Pitch", "Duration"} <= kinds
    if fixed:
        assert {t for t in out if v.kind(t) == "TimeSig"} == {g.timesig_id(3, 4)}
    else:
        assert len({t for t in out if v.kind(t) == "TimeSig"}) > 3
    all_notes = notes_from_ids(prompt, v) + notes
    _assert_same_notes(_event_notes(all_notes), _decoded_notes(tok, prompt + out))


def test_min_onset_keeps_new_notes_out_of_the_past(tok, pieces):
    v = tok.vocab
    prompt = pieces["4/4"].tolist()
    g = RemiGrammar(v, allow_empty_bars=False)
    end = max(n.onset_beats + n.duration_beats for n in g.feed_many(prompt))
    assert g.position_beats < end  # the last chord still sounds
    g.min_onset_beats = end + 4.5  # ends a bar and a half later
    assert not (g.mask()[v.pitch_ids] == 0.0).any()
    assert not (g.mask()[v.position_ids] == 0.0).any()
    g.feed(v.bar)
    g.feed(g.timesig_id(4, 4))
    assert np.flatnonzero(g.mask() == 0.0).tolist() == [v.bar]  # forced empty bar
    g.feed(v.bar)
    g.feed(g.timesig_id(4, 4))
    positions = [int(v.value[i]) for i in v.position_ids if g.mask()[i] == 0.0]
    assert end == pytest.approx(16.0)
    assert positions == list(range(6, 48))  # from 20.5 = bar start 20 + 6 / 12
    s = Sampler(v.size, seed=2)
    logits = np.zeros(v.size, dtype=np.float32)
    notes = [g.feed(s.sample(logits, g.mask()), strict=True) for _ in range(600)]
    onsets = [n.onset_beats for n in notes if n is not None]
    assert onsets and min(onsets) >= end + 4.5 - 1e-9


# --------------------------------------------------------------------------- sampler
def _logits_and_mask(rng: np.random.Generator, n: int = 411) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(0, 3, n).astype(np.float32)
    mask = np.where(rng.random(n) < 0.4, 0.0, -np.inf).astype(np.float32)
    logits[mask != 0.0] += 50.0  # masked tokens are the most likely ones
    return logits, mask


def test_sampler_is_deterministic_per_seed():
    logits, mask = _logits_and_mask(np.random.default_rng(0))

    def draw(seed: int) -> list[int]:
        s = Sampler(411, seed=seed)
        kw: list[dict[str, Any]] = [
            {},
            {"temperature": 0.7},
            {"top_p": 0.9},
            {"top_k": 5, "temperature": 1.3},
        ]
        return [s.sample(logits, mask, **kw[i % 4]) for i in range(200)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.3},
        {"temperature": 2.5},
        {"top_p": 0.5},
        {"top_k": 3},
        {"top_k": 50, "top_p": 0.95, "temperature": 1.7},
    ],
)
def test_sampler_never_picks_a_masked_token(kw: dict[str, Any]):
    rng = np.random.default_rng(1)
    s = Sampler(411, seed=3)
    for _ in range(50):
        logits, mask = _logits_and_mask(rng)
        for _ in range(20):
            t, lp = s.sample_with_logprob(logits, mask, **kw)
            assert mask[t] == 0.0
            assert np.isfinite(lp) and lp <= 0.0


def test_temperature_zero_is_masked_argmax():
    logits, mask = _logits_and_mask(np.random.default_rng(2))
    s = Sampler(411, seed=0)
    best = int(np.argmax(np.where(mask == 0.0, logits, -np.inf)))
    assert np.argmax(logits) != best
    assert {s.sample(logits, mask, temperature=0.0) for _ in range(5)} == {best}


def test_top_p_and_top_k_restrict_to_the_head():
    n = 411
    probs = np.full(n, 1e-6)
    probs[[10, 20, 30, 40]] = [0.5, 0.3, 0.15, 0.05]
    logits = np.log(probs).astype(np.float32)
    mask = np.zeros(n, dtype=np.float32)
    mask[10] = -np.inf  # the most likely token is masked: renormalise over the rest
    s = Sampler(n, seed=5)
    # over allowed tokens: 20 -> .6, 30 -> .3, 40 -> .1
    assert {s.sample(logits, mask, top_p=0.55) for _ in range(300)} == {20}
    assert {s.sample(logits, mask, top_p=0.85) for _ in range(300)} == {20, 30}
    assert {s.sample(logits, mask, top_k=2) for _ in range(300)} == {20, 30}
    assert {s.sample(logits, mask, top_k=1, temperature=3.0) for _ in range(50)} == {20}
    counts = np.bincount([s.sample(logits, mask) for _ in range(3000)], minlength=n)
    np.testing.assert_allclose(counts[[20, 30, 40]] / 3000, [0.6, 0.3, 0.1], atol=0.04)


@pytest.mark.parametrize(
    ("top_p", "top_k", "temperature"), [(0.6, 0, 1.0), (0.9, 0, 0.7), (0.8, 6, 1.5)]
)
def test_nucleus_matches_a_full_sort_reference(top_p: float, top_k: int, temperature: float):
    rng = np.random.default_rng(11)
    s = Sampler(411, seed=1)
    for _ in range(5):
        logits, mask = _logits_and_mask(rng)
        logits = logits / 2
        prob = np.exp(logsoftmax(logits / temperature, mask))
        order = np.argsort(-prob, kind="stable")
        if top_k:
            order = order[:top_k]
        cum = np.cumsum(prob[order]) / prob[order].sum()
        ref = set(order[: int(np.searchsorted(cum, top_p)) + 1].tolist())
        kw: dict[str, Any] = {"top_p": top_p, "top_k": top_k, "temperature": temperature}
        got = {s.sample(logits, mask, **kw) for _ in range(400)}
        assert got <= ref
        assert len(got) >= min(len(ref), 2)


def test_logprob_is_untempered_masked_log_softmax():
    logits, mask = _logits_and_mask(np.random.default_rng(4))
    ref = logsoftmax(logits, mask)
    assert np.isneginf(ref[mask != 0.0]).all()
    assert np.exp(ref).sum() == pytest.approx(1.0)
    s = Sampler(411, seed=9)
    kws: list[dict[str, Any]] = [
        {},
        {"temperature": 0.0},
        {"temperature": 0.5, "top_p": 0.8},
        {"top_k": 4},
    ]
    for kw in kws:
        t, lp = s.sample_with_logprob(logits, mask, **kw)
        assert lp == pytest.approx(ref[t], abs=1e-9)


def test_sampler_rejects_bad_input():
    s = Sampler(4, seed=0)
    z = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError):
        s.sample(z, np.full(4, -np.inf, dtype=np.float32))
    with pytest.raises(ValueError):
        s.sample(np.zeros(5, dtype=np.float32), z)
    with pytest.raises(ValueError):
        s.sample(z, z, top_p=0.0)


def test_grammar_module_does_not_import_torch():
    code = (
        "import sys, divergent.model.grammar, divergent.model.tokenizer; "
        "divergent.model.tokenizer.build_tokenizer(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
