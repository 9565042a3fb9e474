"""`divergent generate` and the Generator, on the tiny test model and the bundled one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from divergent.model.generate import GenerateError, Generator, generate_file, read_prompt
from divergent.model.grammar import notes_from_ids
from divergent.model.runtime import ModelError, OnnxModel
from tests.conftest import chord_score

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "model" / "examples" / "prompt.mid"


def played_phrase(path: Path, *, tempo: float = 92.0, num: int = 3, den: int = 4) -> Path:
    """A phrase as a performer might play it: unquantized, in 3/4, never in the corpus."""
    import symusic

    rng = np.random.default_rng(3)
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, tempo))
    s.time_signatures.append(symusic.TimeSignature(0, num, den))
    t = symusic.Track(program=0)
    beat = 0.0
    for p in [64, 66, 68, 71, 69, 68, 66, 64, 63, 64]:
        d = float(rng.choice([0.5, 1.0]))
        t.notes.append(
            symusic.Note(int(beat * 480) + int(rng.integers(-20, 20)) + 20, int(d * 430), p, 80)
        )
        beat += d
    s.tracks.append(t)
    s.dump_midi(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model) -> OnnxModel:  # type: ignore[no-untyped-def]
    return OnnxModel(tiny_model[0])


def test_continuation_is_grammar_valid_and_bar_bounded(tiny: OnnxModel, tmp_path: Path) -> None:
    _, ids = read_prompt(played_phrase(tmp_path / "p.mid"), tiny)
    gen = Generator(tiny)
    cont = gen.continue_ids(ids, bars=3, seed=5)
    # it decodes, and the grammar's notes are the tokenizer's notes
    full = np.concatenate([ids, cont.tokens])
    decoded = tiny.tokenizer.decode_ids(full)
    assert decoded.note_num() == len(notes_from_ids(full, tiny.tokenizer.vocab))
    # starts where the prompt ends, and lasts the prompt's bar plus 3 bars at most
    assert all(n.onset_beats >= cont.start_beats - 1e-9 for n in cont.notes)
    assert sum(1 for t in cont.tokens if t == tiny.tokenizer.vocab.bar) <= 3
    # keeps the metre: every TimeSig generated is the prompt's 3/4
    ts = {tiny.tokenizer.vocab.names[t] for t in cont.tokens if t in tiny.tokenizer.vocab.timesig}
    assert ts <= {"TimeSig_3/4"}


def test_same_seed_same_answer(tiny: OnnxModel) -> None:
    ids = tiny.tokenizer.encode_score(chord_score())
    gen = Generator(tiny)
    a = gen.continue_ids(ids, bars=2, seed=11)
    b = gen.continue_ids(ids, bars=2, seed=11)
    c = gen.continue_ids(ids, bars=2, seed=12)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_sharing_banks_changes_no_answer_and_needs_the_same_model(tiny: OnnxModel) -> None:
    ids = tiny.tokenizer.encode_score(chord_score())
    own = Generator(tiny)
    shared = Generator(tiny, like=own)
    assert shared.steering is own.steering and shared.reference is own.reference
    for d in (0.0, 0.6):
        a = own.continue_ids(ids, bars=2, seed=3, divergence=d)
        b = shared.continue_ids(ids, bars=2, seed=3, divergence=d)
        assert a.tokens == b.tokens
    with pytest.raises(GenerateError, match="same model"):
        Generator(OnnxModel(None, threads=1), like=own)


def test_an_answer_is_never_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    from divergent.model import generate

    model = OnnxModel(None, threads=1)
    _, ids = read_prompt(EXAMPLE, model)
    gen = Generator(model)

    def answers() -> list[int]:
        # hot one-bar answers: where the model may sample a bar of rests
        return [
            len(gen.continue_ids(ids[:40], bars=1, seed=s, temperature=2.0).notes)
            for s in range(60)
        ]

    assert min(answers()) >= 1
    # the case is real: without the rule some of these answers are a bar of rests
    monkeypatch.setattr(generate, "_not_silent", lambda gmask, bar: gmask)
    assert min(answers()) == 0


def test_the_silence_rule_never_makes_an_answer_impossible() -> None:
    from divergent.model.generate import _not_silent

    only_bar = np.full(8, -np.inf, np.float32)
    only_bar[3] = 0.0
    assert _not_silent(only_bar, 3) is only_bar
    both = np.zeros(8, np.float32)
    got = _not_silent(both, 3)
    assert got[3] == -np.inf and np.isfinite(np.delete(got, 3)).all() and both[3] == 0.0


@pytest.mark.parametrize("bad", [0, 65])
def test_bars_out_of_range(tiny: OnnxModel, bad: int) -> None:
    ids = tiny.tokenizer.encode_score(chord_score())
    with pytest.raises(GenerateError, match="bars"):
        Generator(tiny).continue_ids(ids, bars=bad)


def test_unreadable_and_empty_prompts(tiny: OnnxModel, tmp_path: Path) -> None:
    import symusic

    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"this is not midi")
    with pytest.raises(GenerateError, match="cannot read"):
        read_prompt(bad, tiny)
    empty = tmp_path / "empty.mid"
    symusic.Score(480).dump_midi(str(empty))
    with pytest.raises(GenerateError, match="no notes"):
        read_prompt(empty, tiny)
    with pytest.raises(GenerateError, match="not found"):
        read_prompt(tmp_path / "missing.mid", tiny)


def test_incomplete_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing"):
        OnnxModel(tmp_path)


def test_generate_file_writes_prompt_and_answer(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import symusic

    out = tmp_path / "o.mid"
    res = generate_file(
        played_phrase(tmp_path / "p.mid"), out, bars=2, seed=1, model_dir=tiny_model[0]
    )
    s = symusic.Score(str(out))
    assert [t.name for t in s.tracks] == ["prompt", "divergent"]
    assert s.tracks[1].note_num() == res["notes"]
    r = res["readout"]
    assert r["notes"] == res["notes"]
    assert 0.0 <= r["in_scale"] <= 1.0 and r["surprisal_bits_per_note"] > 0
    json.dumps(res)  # the readout is plain JSON
    assert s.tempos[0].qpm == pytest.approx(92.0, abs=0.01)
    assert (s.time_signatures[0].numerator, s.time_signatures[0].denominator) == (3, 4)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "divergent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


# Make `import torch` fail in the child: generation must not need it.
NO_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None; "
    "sys.argv = ['divergent'] + sys.argv[1:]; runpy.run_module('divergent', run_name='__main__')"
)


def _cli_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_bundled_generate_end_to_end_without_torch(tmp_path: Path) -> None:
    import symusic

    outs = []
    for run in range(2):
        out = tmp_path / f"o{run}.mid"
        r = _cli_without_torch(
            "generate", str(EXAMPLE), "--bars", "4", "--seed", "7", "-o", str(out), "--json"
        )
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        outs.append(out.read_bytes())
        s = symusic.Score(str(out))
        notes = s.tracks[1].notes
        assert len(notes) == res["notes"] > 0
        # notes in every two bars of the answer (4/4 at 480 tpq)
        start = res["start_beats"] * 480
        bars = {int((n.start - start) // (2 * 4 * 480)) for n in notes}
        assert bars >= {0, 1}
    assert outs[0] == outs[1]  # deterministic per seed


def test_bundled_generate_on_an_unseen_played_phrase(tmp_path: Path) -> None:
    out = tmp_path / "o.mid"
    r = _cli_without_torch(
        "generate",
        str(played_phrase(tmp_path / "p.mid")),
        "--bars",
        "4",
        "--seed",
        "3",
        "-o",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["notes"] > 0


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"nope")
    r = _cli("generate", str(bad), "-o", str(tmp_path / "o.mid"))
    assert r.returncode == 2
    assert r.stderr.startswith("divergent: error: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
