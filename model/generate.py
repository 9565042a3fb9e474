"""Continuations: prompt tokens in, grammar-valid sampled tokens and notes out (no torch).

:class:`Generator` is what both ``divergent generate`` and the live server use: it owns
one :class:`~model.runtime.IncrementalDecoder`, a :class:`~model.grammar.RemiGrammar`
and a seeded :class:`~model.grammar.Sampler`, and produces a :class:`Continuation`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from divergent.model.copy_index import NgramIndex
from divergent.model.divergence import Steering, mix_logits
from divergent.model.feature_reference import FeatureReference
from divergent.model.files import COPY_INDEX_FILE, FEATURE_REFERENCE_FILE
from divergent.model.grammar import NoteEvent, RemiGrammar, Sampler, logsoftmax
from divergent.model.readout import Readout, compute_readout
from divergent.model.runtime import IncrementalDecoder, OnnxModel
from divergent.model.tokenizer import TokenizerError

if TYPE_CHECKING:
    from divergent.model.concept import ActiveConcept

__all__ = [
    "CONCEPT_STRENGTH",
    "CONCEPT_STRENGTHS",
    "Continuation",
    "GenerateError",
    "Generator",
    "generate_file",
    "ids_from_notes",
    "read_prompt",
    "serving_generator",
    "warm_lengths",
]

#: The longest prompt (in tokens) the decoder sees; older bars are dropped.
PROMPT_TOKENS = 384
#: Bars of the answer ``serve``'s model is warmed up with at start (≈ 2 s here): long
#: enough to fill the context once (see :meth:`Generator.warm_up`).
WARM_UP_BARS = 16
#: Prompt lengths the served model prefills once after start, spread over 16 tokens to
#: PROMPT_TOKENS (:func:`warm_lengths`): see :meth:`Generator.warm_prefill`.
WARM_PREFILLS = 48
#: The prompt's last phrase (tokens) that sets the latent: half a training window.
LATENT_TOKENS = 256
#: A concept's strength g: an answer samples from ``l0 + g (l1 - l0)``, l1 the concept's
#: logits with its identifiers first in the context, l0 the same weights without them
#: (guidance, as DreamBooth's samplers use it). 1 is the concept as learned. Measured on
#: the concept protocol (mean of three draws, docs/concepts.md): against 1, 1.5 took
#: PPT's fidelity 0.231 -> 0.260 (0.67x -> 0.79x full fine-tuning's) and its style
#: distance 21.5 % -> 24.8 % below the base model's; 2 went no further (0.222, one draw).
CONCEPT_STRENGTH = 1.5
#: The range a concept's strength may take (0: the concept's weights without its style).
CONCEPT_STRENGTHS = (0.0, 3.0)


class GenerateError(ValueError):
    """A prompt or a request that cannot be continued (the message says why)."""


def _read_rows(dec: IncrementalDecoder, tokens: list[int]) -> list[np.ndarray]:
    """Feed ``tokens``; the logits after each. Calls stop where the cache is full: the
    next token then rewinds it to its recent history, as feeding it alone would."""
    rows: list[np.ndarray] = []
    while tokens:
        room = dec.model.block_size - len(dec.tokens)
        if room > 0:
            rows.extend(dec.feed(tokens[:room], all_logits=True))
            tokens = tokens[room:]
        else:
            rows.append(dec.feed(tokens[:1]).copy())  # the rewind
            tokens = tokens[1:]
    return rows


class _BaseReader:
    """At w(d) = 1 the answer's logits are the diverged decoder's alone and the base
    decoder (its row at the prompt's latent) serves only the readout's surprisal: it reads
    the answer in chunks of ``CHUNK`` tokens on the side thread while the diverged decoder
    samples on this one — a call per chunk, not a step per token — and only the last chunk
    is left when the answer ends. The grammar mask of every step is kept for it."""

    CHUNK = 32

    def __init__(self, dec: IncrementalDecoder, pool: ThreadPoolExecutor) -> None:
        self.dec, self.pool = dec, pool
        self.rows = [dec.last_logits.copy()]  # what the context predicts: the first token
        self.masks: list[np.ndarray] = []
        self.fed = 0
        self.pending: Future[list[np.ndarray]] | None = None

    def settle(self) -> None:
        """Wait for a chunk still being read (an answer that failed midway left it), so
        that the next answer does not reset the decoder under it."""
        if self.pending is not None:
            wait([self.pending])
            self.pending = None

    def _collect(self) -> None:
        if self.pending is not None:
            self.rows.extend(self.pending.result())
            self.pending = None

    def step(self, out: list[int]) -> None:
        """After each kept token: the next chunk goes to the side thread when full."""
        if len(out) - self.fed >= self.CHUNK:
            self._collect()
            self.pending = self.pool.submit(_read_rows, self.dec, out[self.fed :])
            self.fed = len(out)

    def logprobs(self, out: list[int]) -> list[float]:
        """The base log-probability of every kept token (after the answer)."""
        self._collect()
        self.rows.extend(_read_rows(self.dec, out[self.fed : len(out) - 1]))
        # a closing Bar was sampled (its mask kept) and not kept; a chunk may end with
        # the last token (its row predicts nothing kept)
        n = len(out)
        return [
            float(logsoftmax(row, mask)[tok])
            for row, mask, tok in zip(self.rows[:n], self.masks[:n], out, strict=True)
        ]


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
    divergence: float = 0.0
    base_logprobs: list[float] = field(default_factory=list)  # under the base model (d = 0)
    prompt_z: np.ndarray | None = None
    beats_per_bar: float = 4.0
    bar_start_beats: float = 0.0  # the bar line at or before start_beats


class Generator:
    """Samples continuations from an :class:`OnnxModel`."""

    def __init__(
        self,
        model: OnnxModel,
        steering: Steering | None = None,
        *,
        concept: ActiveConcept | None = None,
        like: Generator | None = None,
        concept_strength: float = CONCEPT_STRENGTH,
    ) -> None:
        """``like``: a generator of the same model files whose read-only banks (steering,
        copy index, feature reference) this one shares instead of reading its own copies
        (a concept's generator in the server: 29.0 -> 23.2 MB of private memory for each
        one kept, measured with the bundled model). ``concept_strength``: see
        :data:`CONCEPT_STRENGTH` (no effect without a concept)."""
        if like is not None and like.model.files.root != model.files.root:
            raise GenerateError("a generator shares banks only with one of the same model")
        self.concept_strength = _strength(concept_strength)
        # a concept (``model.concept``): its weights in the decoder session, and its
        # identifier tokens first in every context; without one nothing changes
        self.concept = concept
        self.concept_prefix: list[int] = list(concept.prefix) if concept is not None else []
        if concept is not None:
            model = concept.bind(model)
        self.model: OnnxModel = model
        self.vocab = model.tokenizer.vocab
        self.decoder = IncrementalDecoder(model)
        # the steered answer and the base model's view of it, in one batched ONNX call
        self.pair_decoder = IncrementalDecoder(model, batch=2)
        # the BAD-tuned decoder the knob mixes in, fed the same tokens (when shipped)
        self.div_decoder = (
            IncrementalDecoder(
                model, session=model.diverged, prefill_session=model.diverged_prefill
            )
            if model.diverged is not None
            else None
        )
        # the concept's weights without its identifiers: the l0 of its strength (a
        # concept's model has no diverged decoder, so this takes its worker thread)
        self.plain_decoder = (
            IncrementalDecoder(model) if concept is not None and self.div_decoder is None else None
        )
        self.steering: Steering = steering or (
            like.steering if like is not None else Steering.from_model_dir(model.files.root)
        )
        # how the decoder was chosen for this host (a model.host.Choice), when someone chose
        # it: the serve banner says which and why
        self.decoder_choice: Any = None
        self._pool: ThreadPoolExecutor | None = None  # the diverged decoder's worker
        self._reader: _BaseReader | None = None  # the last answer's, at w = 1
        # the readout's banks are optional: without them copy rate / distance are empty
        self.index: NgramIndex | None
        self.reference: FeatureReference | None
        if like is not None:
            self.index, self.reference = like.index, like.reference
        else:
            root = model.files.root
            index, reference = root / COPY_INDEX_FILE, root / FEATURE_REFERENCE_FILE
            self.index = NgramIndex.load(index) if index.exists() else None
            self.reference = FeatureReference.load(reference) if reference.exists() else None

    def warm_up(self, bars: int = 4) -> None:
        """Run what a live answer runs (both decoders, a full prompt's prefill, a
        ``bars``-bar answer, the readout) once, so the first answer does not pay ONNX
        Runtime's first-run costs and less memory appears during a set. Measured when
        ORT still ran with its arena (RSS growth over random 4-bar answers after it):
        9.0 MB over 100 after the earlier 2-note warm-up, 2.2 MB after 16 bars
        (``docs/reliability.md``)."""
        ids = self._warm_ids
        # d = 1, 0 < d < 1 and d = 0 run differently shaped calls (one or both decoders;
        # without a BAD decoder, d = 1 runs what d = 0.5 runs); 0 < d < 1 runs the most
        # (both decoders, two rows), so it fills the context, the others a bar each
        levels = (0.5, 1.0, 0.0) if self.model.diverged is not None else (0.5, 0.0)
        for d in levels:
            n = bars if d == levels[0] else 1
            self.readout(self.continue_ids(ids, bars=n, seed=0, divergence=d))

    @cached_property
    def _warm_ids(self) -> np.ndarray:
        # made once: warm_prefill runs dozens of times after start
        # quarter notes of a scale: more than PROMPT_TOKENS of REMI in short bars, so the
        # prompt cut at a bar line is within a bar (17 tokens) of the longest there is
        steps = (0, 2, 4, 5, 7, 9, 11, 12, 11, 9, 7, 5, 4, 2)
        played = [(float(i), 60 + steps[i % len(steps)], 1.0, 80) for i in range(112)]
        ids = ids_from_notes(self.model, played)
        ids.setflags(write=False)  # shared by every warm-up call
        return ids

    def warm_prefill(self, length: int) -> None:
        """Prefill a prompt of the last ``length`` tokens (at d = 0.5: both decoders, two
        rows) and sample one token: a few of these, of :func:`warm_lengths`, after start.

        Why: each answer's prefill allocates buffers sized by its prompt's length, and
        ONNX Runtime's arena, when the sessions had one, kept every region it ever grew:
        answers of changing lengths fragmented it until it settled, several MB above
        where it started (+6.7 MB over 400 random answers of four generators; +1.9 MB
        after prefills of 48 lengths, 5.3 s of one core on a 2-vCPU Xeon). The serving
        sessions now run without it (``model.runtime.no_cpu_arena``); what a new length
        still leaves is ONNX Runtime's ~1.8 KB per length per session, which these
        prefills pay in advance.
        """
        ids = self._warm_ids
        self.continue_ids(ids[-max(1, length) :], bars=1, seed=0, divergence=0.5, max_tokens=1)

    def readout(self, cont: Continuation) -> Readout:
        """How novel an answer is (see ``model.readout``); a few milliseconds at most."""
        # onsets from the answer's first bar line: the readout's bar grid starts at 0
        shift = cont.bar_start_beats
        notes = [
            NoteEvent(n.onset_beats - shift, n.pitch, n.duration_beats, n.bar_index)
            for n in cont.notes
        ]
        return compute_readout(
            notes,
            token_logprobs_nats=cont.base_logprobs,
            index=self.index,
            reference=self.reference,
            beats_per_bar=cont.beats_per_bar,
            compute_ms=cont.compute_ms,
        )

    def latent(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Where the prompt puts the latent: the posterior mean of its last phrase."""
        mu, _ = self.model.encode(prompt_ids[-LATENT_TOKENS:])
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
        divergence: float = 0.0,
        max_tokens: int | None = None,
        min_onset_beats: float | None = None,
        on_notes: Callable[[list[NoteEvent]], object] | None = None,
        cancel: threading.Event | None = None,
        concept_strength: float | None = None,
        anchor_seed: int | None = None,
    ) -> Continuation:
        """Continue ``prompt_ids`` (REMI ids without BOS) by ``bars`` bars.

        ``divergence`` is the knob d in [0, 1] (see ``model.divergence``); d = 0 is plain
        sampling. ``z`` overrides the prompt's latent (the steering then starts from it).

        For live use: ``min_onset_beats`` moves the earliest answer onset (default: where
        the prompt's last note ends), e.g. to the next bar line in jam mode; ``on_notes`` is
        called (in the calling thread) with each note as soon as its Duration token is
        sampled (onsets only grow), so the first note can sound while the rest is
        generated; setting
        ``cancel`` stops generation at the next token (the notes so far are returned).

        An answer always has a note: the Bar that would end it is refused until one is
        sampled (see ``_not_silent``). ``concept_strength`` overrides the generator's for
        this answer (a live knob; no effect without a concept). ``anchor_seed`` draws the
        knob's anchor (``Steering.latent``; default ``seed``).
        """
        if bars < 1 or bars > 64:
            raise GenerateError(f"bars must be in 1..64, got {bars}")
        if not np.isfinite(temperature) or temperature < 0:
            raise GenerateError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 <= divergence <= 1.0:
            raise GenerateError(f"divergence must be in 0..1, got {divergence}")
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        t0 = time.perf_counter()
        v = self.vocab
        grammar = RemiGrammar(v, fixed_timesig=self._last_timesig(prompt_ids), allow_eos=False)
        prompt_notes = [n for n in (grammar.feed(int(t)) for t in prompt_ids) if n is not None]
        if not prompt_notes:
            raise GenerateError("the prompt has no notes")
        start = max(n.onset_beats + n.duration_beats for n in prompt_notes)
        if min_onset_beats is not None:
            start = float(min_onset_beats)
        grammar.min_onset_beats = start
        beats_per_bar = grammar.bar_length_beats
        bar_start = grammar.bar_start_beats
        context = self._context(prompt_ids)
        mu = self.latent(prompt_ids) if z is None else np.asarray(z, np.float32)
        d = float(divergence)
        steered = d > 0.0
        z_answer = self.steering.latent(mu, d, seed, anchor_seed=anchor_seed) if steered else mu
        bound = np.zeros(v.size, np.float32)
        # the learned divergence: the diverged decoder's logits mixed in by w(d)
        w_bad = self.steering.mix_weight(d) if steered else 0.0
        div = self.div_decoder if w_bad > 0 else None
        # a second base row only when the answer's latent differs from the prompt's (the
        # surprisal readout is always under the base model at the prompt's latent), and
        # when the answer uses the base decoder's logits at all: at w = 1 (d = 1 by
        # default) with a diverged decoder the answer's logits are its alone. Without one
        # (a concept loaded, an older model folder) w(1) is 1 too, and the answer is the
        # base decoder's at the answer's latent up to the knob's top
        pair = steered and not self.diverged_alone(w_bad) and not np.array_equal(z_answer, mu)
        if steered:
            grammar.allow_empty_bars = d < self.steering.config.empty_bars_from
            margin = self.steering.register_margin(d)
            lo = min(n.pitch for n in prompt_notes) - margin
            hi = max(n.pitch for n in prompt_notes) + margin
            pv = v.value[v.pitch_ids]
            bound[v.pitch_ids[(pv < lo) | (pv > hi)]] = -np.inf
        dec = self.pair_decoder if pair else self.decoder
        if self._reader is not None:
            self._reader.settle()
        dec.reset()
        dec.set_z(np.stack([z_answer, mu]) if pair else mu)
        side = div
        if div is not None:
            div.reset()
            div.set_z(z_answer)
        g = self.concept_strength if concept_strength is None else _strength(concept_strength)
        plain = self.plain_decoder if g != 1.0 else None
        if plain is not None:  # the same context without the identifiers
            plain.reset()
            plain.set_z(z_answer)
            side = plain
        self._feed(dec, side, context, skip=len(self.concept_prefix) if plain is not None else 0)
        reader = None  # at w = 1: the base decoder reads the answer in chunks (_BaseReader)
        if steered and self.diverged_alone(w_bad):
            reader = self._reader = _BaseReader(dec, self._side_pool())
        sampler = Sampler(v.size, seed=seed)
        out: list[int] = []
        notes: list[NoteEvent] = []
        logprobs: list[float] = []
        base_lps: list[float] = []
        bars_left = bars
        limit = max_tokens or bars * 200
        prev = context[-1]
        repeat_pitch, repeats = -1, 0
        max_repeats = self.steering.max_repeats(d) if steered else limit
        while len(out) < limit:
            if cancel is not None and cancel.is_set():
                break
            gmask = grammar.mask()
            # never a silent answer; with the knob open, never one of a single pitch
            # either (its last bar stays open until a second pitch sounds)
            if bars_left == 0 and (not notes or (steered and repeats == len(notes))):
                gmask = _not_silent(gmask, v.bar)
            if steered:
                mask = gmask + bound
                # no long runs of one pitch, and never an answer of one repeated pitch:
                # once its first notes all share a pitch, the next note must leave it
                if repeats >= max_repeats or repeats == len(notes) >= 2:
                    mask[v.pitch_ids[0] + repeat_pitch - v.min_pitch] = -np.inf
                if not np.isfinite(mask.max()):
                    mask = gmask  # the bounds never make an answer impossible
                logits = dec.last_logits_all[0]  # the base row at z_answer, or at mu (w = 1)
                if plain is not None:
                    logits = mix_logits(plain.last_logits, logits, g)
                if div is not None:
                    logits = mix_logits(logits, div.last_logits, w_bad)
                logits = self.steering.adjust(logits, mask, prev, d)
                tok, lp = sampler.sample_with_logprob(
                    logits, mask, temperature=temperature, top_p=top_p
                )
                if reader is not None:
                    reader.masks.append(gmask.copy())
                    base_lp = math.nan  # filled in by the reader after the answer
                else:
                    base_row = dec.last_logits_all[1] if pair else dec.last_logits_all[0]
                    base_lp = float(logsoftmax(base_row, gmask)[tok])
            elif plain is not None:
                logits = mix_logits(plain.last_logits, dec.last_logits, g)
                tok, lp = sampler.sample_with_logprob(
                    logits, gmask, temperature=temperature, top_p=top_p
                )
                # the readout's surprisal: under the concept's own model (its strength
                # is how the answer was drawn, not a model)
                base_lp = float(logsoftmax(dec.last_logits, gmask)[tok])
            else:
                tok, lp = sampler.sample_with_logprob(
                    dec.last_logits, gmask, temperature=temperature, top_p=top_p
                )
                base_lp = lp
            if tok == v.bar:
                # the first Bar ends the prompt's bar; then one per generated bar
                if bars_left == 0:
                    break
                bars_left -= 1
            ev = grammar.feed(tok)
            if ev is not None:
                notes.append(ev)
                if on_notes is not None:
                    on_notes([ev])
                repeats = repeats + 1 if ev.pitch == repeat_pitch else 1
                repeat_pitch = ev.pitch
            out.append(tok)
            logprobs.append(lp)
            base_lps.append(base_lp)
            prev = tok
            if reader is not None:
                assert div is not None  # a reader only beside the diverged decoder
                div.feed([tok])  # the answer's decoder; the base one reads in chunks
                reader.step(out)
            else:
                self._feed(dec, side, [tok])
        if reader is not None:
            base_lps = reader.logprobs(out)
        return Continuation(
            tokens=out,
            notes=notes,
            logprobs=logprobs,
            start_beats=start,
            bars=bars,
            compute_ms=(time.perf_counter() - t0) * 1000,
            z=np.asarray(z_answer, np.float32),
            prompt_tokens=[int(t) for t in context],
            divergence=d,
            base_logprobs=base_lps,
            prompt_z=np.asarray(mu, np.float32),
            beats_per_bar=beats_per_bar,
            bar_start_beats=bar_start,
        )

    def diverged_alone(self, w: float) -> bool:
        """Whether a token at mix weight ``w`` samples from the diverged decoder alone: then
        the base decoder (one row, at the prompt's latent: no pair, and a model with a
        diverged decoder has no concept) only reads the answer for the readout."""
        return w == 1.0 and self.div_decoder is not None

    def _side_pool(self) -> ThreadPoolExecutor:
        """The worker thread a side decoder runs on (one, made on first use)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="side-decoder")
        return self._pool

    def _feed(
        self,
        dec: IncrementalDecoder,
        side: IncrementalDecoder | None,
        toks: list[int],
        *,
        skip: int = 0,
    ) -> None:
        """Feed the answer's decoder and (when the answer uses one) a side decoder: the
        diverged one (the knob), or a concept's without its identifiers (its strength),
        which is fed ``toks`` less their first ``skip`` (the identifiers).

        The two run over the same tokens on a worker thread and this one (ORT releases
        the GIL), so a token costs about the slower of the two, not their sum.
        """
        if side is None:
            dec.feed(toks)
            return
        fut = self._side_pool().submit(side.feed, toks[skip:])
        dec.feed(toks)
        fut.result()

    def _last_timesig(self, ids: np.ndarray) -> int | None:
        ts = [int(t) for t in ids if int(t) in self.vocab.timesig]
        return ts[-1] if ts else None

    def _context(self, ids: np.ndarray) -> list[int]:
        """The decoder's view of the prompt: the last PROMPT_TOKENS, cut at a bar line."""
        if len(ids) <= PROMPT_TOKENS:
            return [*self.concept_prefix, self.vocab.bos, *(int(t) for t in ids)]
        tail = ids[-PROMPT_TOKENS:]
        bars = np.flatnonzero(tail == self.vocab.bar)
        return [*self.concept_prefix, *(int(t) for t in (tail[bars[0] :] if len(bars) else tail))]


def _strength(g: float) -> float:
    """``g`` as a concept strength, checked against :data:`CONCEPT_STRENGTHS`."""
    lo, hi = CONCEPT_STRENGTHS
    if not lo <= g <= hi:  # NaN fails too
        raise GenerateError(f"concept strength must be in {lo:g}..{hi:g}, got {g}")
    return float(g)


def _not_silent(gmask: np.ndarray, bar: int) -> np.ndarray:
    """``gmask`` without the Bar token that would end an answer with no note yet.

    An answer is never silent: in a jam a one-bar answer of rests is a bar the machine
    skipped (the performer hears a dropped beat, not a musical rest), and ``generate``
    would write an empty file. Rests inside a longer answer stay the model's choice.
    """
    m = gmask.copy()
    m[bar] = -np.inf
    return m if np.isfinite(m.max()) else gmask


def warm_lengths(count: int = WARM_PREFILLS, *, seed: int = 1) -> list[int]:
    """``count`` prompt lengths from 16 tokens to PROMPT_TOKENS, evenly spread, in a
    seeded shuffled order (growing lengths in order would split the arena's chunks in one
    pattern only)."""
    lengths = np.linspace(16, PROMPT_TOKENS, max(0, count)).astype(int)
    np.random.default_rng(seed).shuffle(lengths)
    return [int(n) for n in lengths]


def ids_from_notes(
    model: OnnxModel,
    notes: Sequence[tuple[float, int, float, int]],
    *,
    beats_per_bar: int = 4,
) -> np.ndarray:
    """REMI ids of live notes: (onset_beats, pitch, duration_beats, velocity) tuples.

    Beat 0 must be a bar line: leading empty bars are kept as Bar tokens, so the ids'
    beat grid is the caller's (the live clock's) grid, and answer onsets map straight back.
    """
    import symusic

    if not notes:
        raise GenerateError("nothing to continue: no notes yet")
    tpq = 480
    score = symusic.Score(tpq)
    score.time_signatures.append(symusic.TimeSignature(0, beats_per_bar, 4))
    track = symusic.Track(program=0, name="live")
    for onset, pitch, dur, vel in notes:
        if onset < 0 or not 0 <= pitch <= 127:
            continue
        ticks = max(1, round(dur * tpq))
        track.notes.append(symusic.Note(round(onset * tpq), ticks, int(pitch), int(vel) or 1))
    score.tracks.append(track)
    try:
        return model.tokenizer.encode_score(score)
    except TokenizerError as e:
        raise GenerateError(f"cannot tokenize the live notes: {e}") from e


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
    divergence: float = 0.0,
    model_dir: Path | None = None,
    concept: str | None = None,
    concepts_dir: Path | None = None,
    device: str = "cpu",
    concept_strength: float = CONCEPT_STRENGTH,
) -> dict[str, Any]:
    """``divergent generate``: continue a MIDI file and write the result.

    ``concept`` names a learned concept (or ``A+B``) in ``concepts_dir``, answered at
    ``concept_strength`` (:data:`CONCEPT_STRENGTH`). ``device``
    (``model.files.DEVICE_CHOICES``): where the model runs; one that cannot run it is
    refused with a DeviceError before the prompt is read.
    """
    model = OnnxModel(model_dir, device=device)
    score, ids = read_prompt(prompt, model)
    active = None
    if concept:
        from divergent.model.concept import activate

        active = activate(concept, model, concepts_dir)
    gen = Generator(model, concept=active, concept_strength=concept_strength)
    cont = gen.continue_ids(
        ids, bars=bars, seed=seed, temperature=temperature, top_p=top_p, divergence=divergence
    )
    n = write_continuation(score, cont, output)
    return {
        "readout": gen.readout(cont).to_dict(),
        "output": str(output),
        "notes": n,
        "bars": bars,
        "tokens": len(cont.tokens),
        "start_beats": cont.start_beats,
        "seed": seed,
        "divergence": divergence,
        "compute_ms": round(cont.compute_ms, 2),
        **(
            {
                "concept": active.spec,
                "concept_strength": concept_strength,
                "concept_load_ms": round(active.load_ms, 1),
            }
            if active
            else {}
        ),
        "device": model.device,
        "decoder": model.precision,
    }


def serving_generator(
    model_dir: str | Path | None = None, *, decoder: str = "auto", device: str = "cpu"
) -> Generator:
    """The generator ``serve`` answers with: the decoder this host serves with
    (:func:`divergent.model.host.choose_decoder`: ``decoder`` is ``--decoder``) on
    ``device``, warmed up so the first answer does not pay ONNX Runtime's first-run
    costs. ``decoder_choice`` says which and why (the banner's line). Raises ModelError,
    DeviceError for a device that cannot run the model (before any answer)."""
    from divergent.model.host import choose_decoder

    choice = choose_decoder(model_dir, decoder, device=device)
    model = choice.load(model_dir)
    generator = Generator(model)
    generator.decoder_choice = choice
    generator.warm_up(bars=WARM_UP_BARS)
    return generator
