from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from divergent.model.data import transpose_ids
from divergent.model.tokenizer import (
    TokenizerError,
    TokenizerSpec,
    build_tokenizer,
    load_tokenizer,
)
from tests.conftest import chord_score


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_tokenizer()


@pytest.mark.parametrize(
    "spec",
    [
        TokenizerSpec(),
        TokenizerSpec(n_concepts=0),
        TokenizerSpec(pitch_range=(36, 96), n_concepts=4),
        TokenizerSpec(positions_per_beat=8, beat_res=((0, 4, 8), (4, 12, 4))),
    ],
)
def test_spec_json_round_trip(spec: TokenizerSpec) -> None:
    again = TokenizerSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pitch_range": (80, 40)},
        {"n_concepts": -1},
        {"special": ("BOS", "PAD", "EOS")},
        {"positions_per_beat": 7},
    ],
)
def test_spec_rejects_bad_values(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(TokenizerError):
        TokenizerSpec(**kwargs)


def test_spec_rejects_unknown_keys() -> None:
    d = TokenizerSpec().to_dict()
    d["surprise"] = 1
    with pytest.raises(TokenizerError, match="unknown"):
        TokenizerSpec.from_dict(d)


def test_vocab_layout(tok) -> None:  # type: ignore[no-untyped-def]
    v = tok.vocab
    assert v.names[v.pad] == "PAD_None" and v.pad == 0
    assert len(v.concept_ids) == TokenizerSpec().n_concepts
    assert v.max_pitch - v.min_pitch + 1 == len(v.pitch_ids)
    # no velocity, tempo or program tokens
    assert not any(n.startswith(("Velocity", "Tempo", "Program")) for n in v.names)


def test_save_load_round_trip(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "tokenizer.json"
    tok.save(p)
    again = load_tokenizer(p)
    assert again.hash == tok.hash
    assert again.vocab.names == tok.vocab.names


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(tokenization="TSD"), "REMI"),
        (lambda d: d["config"]["additional_params"].pop("divergent_spec"), "not a divergent"),
        (lambda d: d["config"].update(use_velocities=True), "velocity"),
    ],
)
def test_load_rejects_foreign_configs(tok, tmp_path: Path, mutate, message) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "tokenizer.json"
    tok.save(p)
    d = json.loads(p.read_text())
    mutate(d)
    p.write_text(json.dumps(d))
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(p)


def test_load_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="JSON"):
        load_tokenizer(bad)


def _quantized_notes(score, tpq_out: int) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """(onset, duration, pitch) on a 12-per-quarter grid, as the tokenizer sees them."""
    out = []
    for t in score.tracks:
        for n in t.notes:
            on = round(n.start / score.tpq * 12)
            du = max(1, round(n.duration / score.tpq * 12))
            out.append((on, du, n.pitch))
    return sorted(out)


@pytest.mark.parametrize("name", ["reel_4_4", "jig_6_8", "waltz_3_4", "chords"])
def test_tokens_midi_round_trip(tok, abc_scores, name: str) -> None:  # type: ignore[no-untyped-def]
    score = chord_score() if name == "chords" else abc_scores[name]
    ids = tok.encode_score(score)
    decoded = tok.decode_ids(ids)
    assert decoded.note_num() == score.note_num()
    a = _quantized_notes(score, 12)
    b = _quantized_notes(decoded, 12)
    assert [x[2] for x in a] == [x[2] for x in b]
    assert [x[0] for x in a] == [x[0] for x in b]
    # re-encoding the decoded music gives the same tokens: a fixed point
    assert np.array_equal(tok.encode_score(decoded), ids)


def test_special_tokens_are_dropped_on_decode(tok, abc_scores) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode_score(abc_scores["reel_4_4"])
    v = tok.vocab
    framed = np.concatenate([[v.bos, int(v.concept_ids[0])], ids, [v.eos]])
    assert tok.decode_ids(framed).note_num() == tok.decode_ids(ids).note_num()


def test_empty_music_is_an_error(tok) -> None:  # type: ignore[no-untyped-def]
    import symusic

    with pytest.raises(TokenizerError, match="no notes"):
        tok.encode_score(symusic.Score(480))


@pytest.mark.parametrize("k", [-5, -1, 0, 3, 6])
def test_transpose_ids(tok, abc_scores, k: int) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode_score(abc_scores["jig_6_8"])
    out = transpose_ids(ids, k, tok.vocab)
    assert out is not None
    a = sorted(n.pitch for n in tok.decode_ids(ids).tracks[0].notes)
    b = sorted(n.pitch for n in tok.decode_ids(out).tracks[0].notes)
    assert [p + k for p in a] == b
    assert transpose_ids(ids, 60, tok.vocab) is None  # leaves the piano range


def test_import_miditok_does_not_load_torch() -> None:
    code = (
        "import sys; from divergent.model.tokenizer import build_tokenizer; build_tokenizer();"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "False"
