"""Continuations: prompt tokens in, grammar-valid sampled tokens and notes out (no torch).

:class:`Generator` is what both ``divergent generate`` and the live server use: it owns
one :class:`~model.runtime.IncrementalDecoder`, a :class:`~model.grammar.RemiGrammar`
and a seeded :class:`~model.grammar.Sampler`, and produces a :class:`Continuation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.grammar import NoteEvent, RemiGrammar, Sampler
from model.runtime import IncrementalDecoder, OnnxModel
from model.tokenizer import TokenizerError

__all__ = ["Continuation", "GenerateError", "Generator", "generate_file", "read_prompt"]

#: The longest prompt (in tokens) the decoder sees; older bars are dropped.
PROMPT_TOKENS = 384


class GenerateError(ValueError):
    """A prompt or a request that cannot be continued (the message says why)."""


@dataclass
class Continuation:
    tokens: list[int]
    notes: list[NoteEvent]
    logprobs: list[float]  # natural-log probability of each token under the masked model
    start_beats: float  # where the prompt ended (quarter notes from the prompt's start)
    bars: int
    compute_ms: float
    z: np.ndarray
    prompt_tokens: list[int] = field(default_factory=list)


class Generator:
    """Samples continuations from an :class:`OnnxModel`."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.vocab = model.tokenizer.vocab
        self.decoder = IncrementalDecoder(model)

    def latent(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Where the prompt puts the latent: its posterior mean."""
        mu, _ = self.model.encode(prompt_ids[-PROMPT_TOKENS:])
        return mu

    def continue_ids(
        self,
        prompt_ids: np.ndarray,
        *,
        bars: int = 4,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 0.95,
        z: np.ndarray | None = None,
        max_tokens: int | None = None,
    ) -> Continuation:
        """Continue ``prompt_ids`` (REMI ids without BOS) by ``bars`` bars."""
        if bars < 1 or bars > 64:
            raise GenerateError(f"bars must be in 1..64, got {bars}")
        if not np.isfinite(temperature) or temperature < 0:
            raise GenerateError(f"temperature must be >= 0, got {temperature}")
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        t0 = time.perf_counter()
        v = self.vocab
        grammar = RemiGrammar(v, fixed_timesig=self._last_timesig(prompt_ids), allow_eos=False)
        prompt_notes = [n for n in (grammar.feed(int(t)) for t in prompt_ids) if n is not None]
        if not prompt_notes:
            raise GenerateError("the prompt has no notes")
        start = max(n.onset_beats + n.duration_beats for n in prompt_notes)
        grammar.min_onset_beats = start
        context = self._context(prompt_ids)
        if z is None:
            z = self.latent(prompt_ids)
        self.decoder.reset()
        self.decoder.set_z(z)
        logits = self.decoder.feed(context)
        sampler = Sampler(v.size, seed=seed)
        out: list[int] = []
        notes: list[NoteEvent] = []
        logprobs: list[float] = []
        bars_left = bars
        limit = max_tokens or bars * 200
        while len(out) < limit:
            mask = grammar.mask()
            tok, lp = sampler.sample_with_logprob(
                logits, mask, temperature=temperature, top_p=top_p
            )
            if tok == v.bar:
                # the first Bar ends the prompt's bar; then one per generated bar
                if bars_left == 0:
                    break
                bars_left -= 1
            ev = grammar.feed(tok)
            if ev is not None:
                notes.append(ev)
            out.append(tok)
            logprobs.append(lp)
            logits = self.decoder.feed([tok])
        return Continuation(
            tokens=out,
            notes=notes,
            logprobs=logprobs,
            start_beats=start,
            bars=bars,
            compute_ms=(time.perf_counter() - t0) * 1000,
            z=np.asarray(z, np.float32),
            prompt_tokens=[int(t) for t in context],
        )

    def _last_timesig(self, ids: np.ndarray) -> int | None:
        ts = [int(t) for t in ids if int(t) in self.vocab.timesig]
        return ts[-1] if ts else None

    def _context(self, ids: np.ndarray) -> list[int]:
        """The decoder's view of the prompt: the last PROMPT_TOKENS, cut at a bar line."""
        if len(ids) <= PROMPT_TOKENS:
            return [self.vocab.bos, *(int(t) for t in ids)]
        tail = ids[-PROMPT_TOKENS:]
        bars = np.flatnonzero(tail == self.vocab.bar)
        return [int(t) for t in (tail[bars[0] :] if len(bars) else tail)]


def read_prompt(path: Path, model: OnnxModel) -> tuple[Any, np.ndarray]:
    """(symusic score, REMI ids) of a MIDI prompt, with clear errors for bad files."""
    import symusic

    if not path.exists():
        raise GenerateError(f"prompt not found: {path}")
    try:
        score = symusic.Score(str(path))
    except Exception as e:  # symusic raises RuntimeError/ValueError with C++ messages
        raise GenerateError(f"cannot read {path} as MIDI: {e}") from e
    if score.note_num() == 0:
        raise GenerateError(f"{path} has no notes to continue")
    try:
        ids = model.tokenizer.encode_score(score)
    except TokenizerError as e:
        raise GenerateError(f"{path}: {e}") from e
    return score, ids


def write_continuation(score: Any, cont: Continuation, path: Path, *, velocity: int = 90) -> int:
    """Write prompt (track 0) and continuation (track 1) on the prompt's timeline."""
    import symusic

    tpq = score.tpq
    out = symusic.Score(tpq)
    out.tempos = score.tempos.copy()
    out.time_signatures = score.time_signatures.copy()
    if len(out.tempos) == 0:
        out.tempos.append(symusic.Tempo(0, 120.0))
    prompt = symusic.Track(program=0, name="prompt")
    for t in score.tracks:
        if not t.is_drum:
            prompt.notes.extend(t.notes)
    prompt.notes.sort()
    machine = symusic.Track(program=0, name="divergent")
    for n in cont.notes:
        machine.notes.append(
            symusic.Note(
                round(n.onset_beats * tpq),
                max(1, round(n.duration_beats * tpq)),
                n.pitch,
                velocity,
            )
        )
    out.tracks.append(prompt)
    out.tracks.append(machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.dump_midi(str(path))
    return len(machine.notes)


def generate_file(
    prompt: Path,
    output: Path,
    *,
    bars: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """``divergent generate``: continue a MIDI file and write the result."""
    model = OnnxModel(model_dir)
    score, ids = read_prompt(prompt, model)
    gen = Generator(model)
    cont = gen.continue_ids(ids, bars=bars, seed=seed, temperature=temperature, top_p=top_p)
    n = write_continuation(score, cont, output)
    return {
        "output": str(output),
        "notes": n,
        "bars": bars,
        "tokens": len(cont.tokens),
        "start_beats": cont.start_beats,
        "seed": seed,
        "compute_ms": round(cont.compute_ms, 2),
    }
