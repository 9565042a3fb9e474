"""Played-style references for concept evaluation: seeded, unquantized, never in the corpus.

Each generator writes what a performer might bring as a concept reference: a riff-based
style with its own pitch set, rhythm and phrasing, played with timing jitter and
varied velocities, about two minutes long. Used by ``model.concept_eval`` and the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PLAYED_STYLES", "played_reference"]


def _score(tempo: float, num: int, den: int) -> tuple[Any, Any]:
    import symusic

    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, tempo))
    s.time_signatures.append(symusic.TimeSignature(0, num, den))
    t = symusic.Track(program=0, name="played")
    s.tracks.append(t)
    return s, t


def _note(t: Any, rng: np.random.Generator, beat: float, dur: float, pitch: int) -> None:
    import symusic

    onset = max(0, int(beat * 480) + int(rng.integers(-15, 16)))  # human timing
    t.notes.append(
        symusic.Note(onset, max(30, int(dur * 430)), int(pitch), int(rng.integers(60, 110)))
    )


def _blues_riffs(seconds: float, rng: np.random.Generator) -> Any:
    """Swung minor-pentatonic riffs in 4/4 over a I-IV-V bass pattern (E)."""
    tempo = 104.0
    s, t = _score(tempo, 4, 4)
    scale = [52, 55, 57, 58, 59, 62, 64, 67, 69, 70, 71, 74, 76]
    roots = [40, 40, 45, 40, 47, 45, 40, 47]
    motifs = [[0, 2, 4, 2], [4, 5, 4, 2, 0], [7, 6, 4, 2], [2, 4, 7, 9, 7]]
    bars = int(seconds * tempo / 60 / 4)
    for b in range(bars):
        base = b * 4.0
        _note(t, rng, base, 1.5, roots[b % len(roots)])  # bass on the downbeat
        _note(t, rng, base + 2, 1.0, roots[b % len(roots)] + 7)
        m = motifs[int(rng.integers(len(motifs)))]
        beat = base + float(rng.choice([0.0, 0.5]))
        for k, step in enumerate(m):
            dur = 2 / 3 if k % 2 == 0 else 1 / 3  # swung eighths
            if beat >= base + 4:
                break
            _note(t, rng, beat, dur, scale[min(step + int(rng.integers(0, 3)), len(scale) - 1)])
            beat += dur
    return s


def _waltz_arpeggios(seconds: float, rng: np.random.Generator) -> Any:
    """Broken-chord arpeggios in 3/4, D minor / harmonic minor, with a sung top line."""
    tempo = 132.0
    s, t = _score(tempo, 3, 4)
    chords = [[50, 53, 57], [46, 50, 53], [43, 46, 50], [45, 49, 52]]
    bars = int(seconds * tempo / 60 / 3)
    for b in range(bars):
        base = b * 3.0
        c = chords[(b // 2) % len(chords)]
        _note(t, rng, base, 1.0, c[0] - 12)
        for k in range(3):
            _note(t, rng, base + 1 + k * 2 / 3, 2 / 3, c[(k + 1) % 3])
        top = c[2] + 12 + int(rng.choice([0, 2, 3, 5]))
        _note(t, rng, base, 2.0 if b % 2 else 3.0, top)
    return s


PLAYED_STYLES: dict[str, Callable[[float, np.random.Generator], Any]] = {
    "played_blues": _blues_riffs,
    "played_waltz": _waltz_arpeggios,
}


def played_reference(style: str, path: Path, *, seconds: float = 120.0, seed: int = 0) -> Path:
    """Write a played-style reference MIDI of about ``seconds`` to ``path``."""
    if style not in PLAYED_STYLES:
        raise ValueError(f"unknown played style {style!r}: {sorted(PLAYED_STYLES)}")
    score = PLAYED_STYLES[style](seconds, np.random.default_rng(seed))
    for tr in score.tracks:
        tr.notes.sort()
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path
