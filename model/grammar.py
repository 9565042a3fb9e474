"""REMI grammar and token sampler for the serving path (numpy only, never torch).

- :class:`RemiGrammar` is an incremental state machine over the divergent REMI stream.
  ``feed`` advances it one token at a time (a whole encoded prompt, then each sampled
  token) and returns a :class:`NoteEvent` whenever a Duration token completes a note;
  ``mask`` gives the additive logit mask (0.0 allowed, -inf not) of the tokens that keep
  the stream well-formed and decodable.
- :class:`Sampler` draws one token from logits under such a mask (temperature, top-k,
  top-p), deterministically for a seed, and can report the chosen token's log-prob under
  the untempered masked distribution (the surprisal readout).
- :func:`notes_from_ids` replays a token list through the grammar.

Time conventions (checked against miditok's encoder and decoder, see the tests): the
"beat" of Position and Duration tokens is the time signature's denominator note, with
``positions_per_beat`` (12) positions per beat, so a bar of ``num/den`` has
``num * 12`` positions and lasts ``num * 4 / den`` quarter notes; ``Position_p`` lies
``p * 4 / (den * 12)`` quarter notes after the bar start and ``Duration_b.t.r`` lasts
``(b + t / r) * 4 / den`` quarter notes. Each Bar starts where the previous bar (at the
previous bar's time signature) ends; a Position before any Bar belongs to bar 0, in 4/4
unless told otherwise, as in miditok's decoder. All times exposed here are in quarter
notes ("beats") from the start of the stream.

The grammar the mask enforces (the transitions found in the data)::

    start -> Bar
    Bar -> TimeSig                      (only ``fixed_timesig`` when set)
    TimeSig -> Position | Bar           (Bar = an empty bar; ``allow_empty_bars``)
    Position -> Pitch
    Pitch -> Duration
    Duration -> Pitch | Position | Bar | EOS   (EOS only with ``allow_eos``)
    EOS -> Bar

with Positions strictly increasing within a bar and below the bar's length, no pitch
twice at one Position and at most ``max_polyphony`` notes per Position. PAD, BOS and
Concept tokens are never allowed by the mask; ``feed`` ignores them (``decode_ids``
drops them too), so a stream may start with BOS and carry concept tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from divergent.model.tokenizer import Vocab

__all__ = [
    "GrammarError",
    "NoteEvent",
    "RemiGrammar",
    "Sampler",
    "logsoftmax",
    "notes_from_ids",
]

_NEG_INF = np.float32(-np.inf)
_max = np.maximum.reduce
_sum = np.add.reduce
_cumsum = np.add.accumulate

# token kinds
_K_OTHER, _K_PAD, _K_BOS, _K_EOS, _K_CONCEPT = 0, 1, 2, 3, 4
_K_BAR, _K_TIMESIG, _K_POSITION, _K_PITCH, _K_DURATION = 5, 6, 7, 8, 9

# states: the kind of the last structural token fed
_S_START, _S_BAR, _S_TIMESIG, _S_POSITION, _S_PITCH, _S_DURATION, _S_END = range(7)
_STATE_NAMES = ("start", "bar", "timesig", "position", "pitch", "duration", "end")


class GrammarError(ValueError):
    """A token the grammar cannot accept (out of range, or not allowed in strict mode)."""


@dataclass(frozen=True, slots=True)
class NoteEvent:
    """One note completed by a Duration token; times in quarter notes."""

    onset_beats: float
    pitch: int
    duration_beats: float
    bar_index: int


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class RemiGrammar:
    """Incremental REMI state machine with precomputed, allocation-free logit masks.

    ``mask()`` returns a float32 array of length ``vocab.size`` owned by the grammar:
    read-only, and valid until the next ``feed`` (or option change). Do not keep it.
    Masks are built once per (first allowed position, bar length, what else is allowed)
    and cached; only a chord in progress costs a 1.6 kB copy to strike out its pitches.

    Options (also settable later as attributes): ``max_polyphony`` notes per Position;
    ``fixed_timesig`` (a TimeSig id forced after each Bar: keep the prompt's metre, see
    ``timesig_token``); ``allow_eos``; ``allow_empty_bars`` (TimeSig -> Bar, a bar of
    rest, as found in the data); ``min_onset_beats`` (no note may start earlier);
    ``positions_per_beat`` (inferred from the vocabulary: 12).
    """

    def __init__(
        self,
        vocab: Vocab,
        *,
        max_polyphony: int = 4,
        fixed_timesig: int | None = None,
        allow_eos: bool = False,
        allow_empty_bars: bool = True,
        min_onset_beats: float | None = None,
        positions_per_beat: int | None = None,
    ) -> None:
        self.vocab = vocab
        v = vocab
        self.size = int(v.size)
        if max_polyphony < 1:
            raise ValueError(f"max_polyphony must be >= 1, got {max_polyphony}")
        if len(v.position_ids) == 0 or len(v.pitch_ids) == 0 or len(v.duration_ids) == 0:
            raise ValueError("the vocabulary has no Position, Pitch or Duration tokens")
        if len(v.timesig_ids) == 0:
            raise ValueError("the vocabulary has no TimeSig tokens (time signatures off)")

        kind = [_K_OTHER] * self.size
        kind[v.pad] = _K_PAD
        kind[v.bos] = _K_BOS
        kind[v.eos] = _K_EOS
        kind[v.bar] = _K_BAR
        for ids, k in (
            (v.concept_ids, _K_CONCEPT),
            (v.timesig_ids, _K_TIMESIG),
            (v.position_ids, _K_POSITION),
            (v.pitch_ids, _K_PITCH),
            (v.duration_ids, _K_DURATION),
        ):
            for i in ids:
                kind[int(i)] = k
        self._kind: list[int] = kind
        self._value: list[int] = [int(x) for x in v.value]
        self._dur_beats: list[float] = [float(x) for x in v.duration_beats]
        self._ts: dict[int, tuple[int, int]] = {int(k): val for k, val in v.timesig.items()}

        # Position ids by position index
        n_pos = len(v.position_ids)
        pos_by_value = np.full(n_pos, -1, dtype=np.int64)
        for i in v.position_ids:
            pos_by_value[int(v.value[i])] = int(i)
        if (pos_by_value < 0).any():
            raise ValueError("Position tokens are not Position_0 .. Position_{n-1}")
        self._pos_by_value = pos_by_value
        max_num = max(num for num, _ in self._ts.values())
        if positions_per_beat is None:
            # miditok makes max_num_pos_per_beat * (largest numerator) Position tokens
            if n_pos % max_num:
                raise ValueError(
                    f"cannot infer positions per beat: {n_pos} positions, largest "
                    f"time signature numerator {max_num}"
                )
            positions_per_beat = n_pos // max_num
        if positions_per_beat < 1 or positions_per_beat * max_num > n_pos:
            raise ValueError(
                f"positions_per_beat={positions_per_beat} needs {positions_per_beat * max_num}"
                f" Position tokens, the vocabulary has {n_pos}"
            )
        self.positions_per_beat = int(positions_per_beat)
        self._ts_id: dict[tuple[int, int], int] = {val: k for k, val in self._ts.items()}

        # masks that do not depend on the position
        def only(ids: Iterable[int]) -> np.ndarray:
            m = np.full(self.size, _NEG_INF, dtype=np.float32)
            m[np.asarray(list(ids), dtype=np.int64)] = 0.0
            return _readonly(m)

        self._m_bar = only([v.bar])
        self._m_all_timesig = only(int(i) for i in v.timesig_ids)
        self._m_pitch = only(int(i) for i in v.pitch_ids)
        self._m_duration = only(int(i) for i in v.duration_ids)
        self._work = np.empty(self.size, dtype=np.float32)
        self._work.flags.writeable = False

        self._max_polyphony = int(max_polyphony)
        self._allow_eos = bool(allow_eos)
        self._allow_empty_bars = bool(allow_empty_bars)
        self._fixed_timesig: int | None = None
        self._min_onset: float | None = None
        self._m_fixed_timesig: np.ndarray | None = None
        # (first position, bar length, pitches, Bar, EOS) -> mask; a few thousand at most
        self._c_range: dict[tuple[int, int, bool, bool, bool], np.ndarray] = {}
        self._cur: np.ndarray | None = None
        self.fixed_timesig = fixed_timesig
        self.min_onset_beats = min_onset_beats
        self.reset()

    # ----------------------------------------------------------------- options
    @property
    def max_polyphony(self) -> int:
        return self._max_polyphony

    @max_polyphony.setter
    def max_polyphony(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_polyphony must be >= 1, got {value}")
        self._max_polyphony = int(value)
        self._cur = None

    @property
    def allow_eos(self) -> bool:
        return self._allow_eos

    @allow_eos.setter
    def allow_eos(self, value: bool) -> None:
        self._allow_eos = bool(value)
        self._cur = None

    @property
    def allow_empty_bars(self) -> bool:
        return self._allow_empty_bars

    @allow_empty_bars.setter
    def allow_empty_bars(self, value: bool) -> None:
        self._allow_empty_bars = bool(value)
        self._cur = None

    @property
    def min_onset_beats(self) -> float | None:
        """No note may start before this time (quarter notes), e.g. the end of the
        prompt's last note so a continuation does not write into the past; None: no
        limit. Bars that lie wholly before it can only be empty."""
        return self._min_onset

    @min_onset_beats.setter
    def min_onset_beats(self, value: float | None) -> None:
        self._min_onset = None if value is None else float(value)
        self._cur = None

    @property
    def fixed_timesig(self) -> int | None:
        """The TimeSig token forced after each Bar, or None (any time signature)."""
        return self._fixed_timesig

    @fixed_timesig.setter
    def fixed_timesig(self, token: int | None) -> None:
        if token is None:
            self._fixed_timesig = None
            self._m_fixed_timesig = None
        else:
            token = int(token)
            if token not in self._ts:
                raise ValueError(f"{token} is not a TimeSig token id")
            self._fixed_timesig = token
            m = np.full(self.size, _NEG_INF, dtype=np.float32)
            m[token] = 0.0
            self._m_fixed_timesig = _readonly(m)
        self._cur = None

    def timesig_id(self, num: int, den: int) -> int:
        """The TimeSig token id of ``num/den`` (GrammarError if not in the vocabulary)."""
        try:
            return self._ts_id[(int(num), int(den))]
        except KeyError:
            raise GrammarError(f"time signature {num}/{den} is not in the vocabulary") from None

    # ------------------------------------------------------------------- state
    def reset(self) -> None:
        """Back to the start of a stream (expecting a Bar), clock at 0."""
        self._state = _S_START
        self._bar = -1
        self._ended = False
        self._bar_start = 0.0  # quarter notes
        self._set_timesig(4, 4)  # miditok's decoder default until a TimeSig arrives
        self._ts_token: int | None = None
        self._pos = -1
        self._used: list[int] = []  # pitch ids at the current position
        self._pending = -1  # pitch waiting for its Duration
        self._cur = None

    def _set_timesig(self, num: int, den: int) -> None:
        self._num, self._den = num, den
        self._bar_len = num * self.positions_per_beat  # in positions
        self._bar_q = num * 4.0 / den  # in quarter notes
        self._q_per_beat = 4.0 / den
        self._pos_den = den * self.positions_per_beat  # position p = 4p/_pos_den quarters

    @property
    def state(self) -> str:
        """What the last structural token was: start, bar, timesig, position, pitch,
        duration or end (after EOS)."""
        return _STATE_NAMES[self._state]

    @property
    def bar_index(self) -> int:
        """Index of the current bar (0 for the first), -1 before any bar."""
        return self._bar

    @property
    def bars_completed(self) -> int:
        """Bars closed by a following Bar (or by EOS)."""
        if self._bar < 0:
            return 0
        return self._bar + 1 if self._state == _S_END else self._bar

    @property
    def timesig(self) -> tuple[int, int]:
        """The current time signature (num, den); 4/4 before any TimeSig."""
        return (self._num, self._den)

    @property
    def timesig_token(self) -> int | None:
        """The last TimeSig token fed (keep it with ``fixed_timesig``), or None."""
        return self._ts_token

    @property
    def position(self) -> int:
        """The current Position index in the bar, -1 when none yet in this bar."""
        return self._pos

    @property
    def notes_at_position(self) -> int:
        return len(self._used)

    @property
    def bar_start_beats(self) -> float:
        return self._bar_start

    @property
    def bar_length_beats(self) -> float:
        return self._bar_q

    @property
    def position_beats(self) -> float:
        """Time of the current position (the bar start when none), in quarter notes."""
        return self._bar_start + 4.0 * max(self._pos, 0) / self._pos_den

    @property
    def ended(self) -> bool:
        """True once EOS has been fed (and no Bar since)."""
        return self._state == _S_END

    def allowed(self, token: int) -> bool:
        return bool(self.mask()[int(token)] == 0.0)

    def feed(self, token: int, *, strict: bool = False) -> NoteEvent | None:
        """Advance with one token; the completed note when it is a note's Duration.

        Lenient by default (a prompt may break the mask's rules, e.g. a 6-note chord:
        the state still follows the stream as miditok's decoder would); with
        ``strict=True`` a token the mask does not allow raises GrammarError.
        """
        t = int(token)
        if not 0 <= t < self.size:
            raise GrammarError(f"token {t} out of range 0..{self.size - 1}")
        if strict and self.mask()[t] != 0.0:
            raise GrammarError(
                f"token {self.vocab.names[t]} not allowed after state {self.state!r}"
            )
        k = self._kind[t]
        if k == _K_DURATION:
            self._state = _S_DURATION
            self._cur = None
            p = self._pending
            if p < 0:
                return None
            self._pending = -1
            self._used.append(p)
            return NoteEvent(
                self._bar_start + 4.0 * max(self._pos, 0) / self._pos_den,
                self._value[p],
                self._dur_beats[t] * self._q_per_beat,
                self._bar,
            )
        if k <= _K_CONCEPT and k != _K_EOS:  # BOS, PAD, Concept: decode_ids drops them
            return None
        self._pending = -1
        if k == _K_PITCH:
            if self._bar < 0:  # a note before any Bar belongs to bar 0
                self._bar = 0
            self._pending = t
            self._state = _S_PITCH
        elif k == _K_POSITION:
            if self._bar < 0:
                self._bar = 0
            self._pos = self._value[t]
            self._used.clear()
            self._state = _S_POSITION
        elif k == _K_BAR:
            if self._bar >= 0:
                self._bar_start += self._bar_q
            self._bar += 1
            self._pos = -1
            self._used.clear()
            self._state = _S_BAR
        elif k == _K_TIMESIG:
            num, den = self._ts[t]
            self._set_timesig(num, den)
            self._ts_token = t
            self._state = _S_TIMESIG
        else:  # EOS
            self._state = _S_END
        self._cur = None
        return None

    def feed_many(self, tokens: Iterable[int], *, strict: bool = False) -> list[NoteEvent]:
        """Feed every token (e.g. an encoded prompt); the notes they complete."""
        out: list[NoteEvent] = []
        for t in tokens:
            n = self.feed(t, strict=strict)
            if n is not None:
                out.append(n)
        return out

    # ------------------------------------------------------------------- masks
    def mask(self) -> np.ndarray:
        """Additive float32 mask (0.0 allowed, -inf not) for the next token."""
        m = self._cur
        if m is None:
            m = self._compute_mask()
            self._cur = m
        return m

    def _compute_mask(self) -> np.ndarray:
        s = self._state
        if s == _S_DURATION:
            lo = self._pos + 1 if self._pos >= 0 else 0
            pitches = len(self._used) < self._max_polyphony
            if self._min_onset is not None:
                first = self._first_position()
                lo = max(lo, first)
                pitches = pitches and max(self._pos, 0) >= first
            base = self._range_mask(lo, self._bar_len, pitches, True, self._allow_eos)
            if not pitches or not self._used:
                return base
            w = self._work
            w.flags.writeable = True
            np.copyto(w, base)
            for p in self._used:
                w[p] = _NEG_INF
            w.flags.writeable = False
            return w
        if s == _S_PITCH:
            return self._m_duration
        if s == _S_POSITION:
            return self._m_pitch
        if s == _S_TIMESIG:
            lo = 0 if self._min_onset is None else self._first_position()
            # a bar with no position left (min_onset_beats beyond it) can only be empty
            empty_ok = self._allow_empty_bars or lo >= self._bar_len
            return self._range_mask(lo, self._bar_len, False, empty_ok, False)
        if s == _S_BAR:
            return self._m_all_timesig if self._m_fixed_timesig is None else self._m_fixed_timesig
        return self._m_bar  # start, end

    def _first_position(self) -> int:
        """The first position of the current bar at or after ``min_onset_beats``."""
        assert self._min_onset is not None
        x = (self._min_onset - self._bar_start) * self._pos_den / 4.0
        return max(0, math.ceil(x - 1e-6))

    def _range_mask(self, lo: int, hi: int, pitches: bool, bar: bool, eos: bool) -> np.ndarray:
        """Positions lo..hi-1, plus all pitches / Bar / EOS as asked (cached, read-only)."""
        key = (lo, hi, pitches, bar, eos)
        m = self._c_range.get(key)
        if m is None:
            m = np.full(self.size, _NEG_INF, dtype=np.float32)
            m[self._pos_by_value[lo:hi]] = 0.0
            if bar:
                m[self.vocab.bar] = 0.0
            if eos:
                m[self.vocab.eos] = 0.0
            if pitches:
                m[self.vocab.pitch_ids] = 0.0
            self._c_range[key] = m = _readonly(m)
        return m


def notes_from_ids(ids: Iterable[int], vocab: Vocab) -> list[NoteEvent]:
    """The notes of a token stream, replayed through a fresh :class:`RemiGrammar`."""
    return RemiGrammar(vocab).feed_many(ids)


# ----------------------------------------------------------------------- sampling
def logsoftmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Log-probabilities (float64) of ``softmax(logits + mask)``; -inf where masked."""
    z = np.asarray(logits, dtype=np.float64) + mask
    m = z.max()
    if not math.isfinite(m):
        raise ValueError("no allowed token with a finite logit")
    z -= m
    z -= math.log(float(np.exp(z).sum()))
    return z


class Sampler:
    """Draws tokens from masked logits; deterministic for a seed and call sequence.

    Each sampling call with ``temperature > 0`` uses exactly one ``Generator.random()``
    draw; ``temperature == 0`` (argmax over allowed tokens) uses none.
    """

    def __init__(self, vocab_size: int, *, seed: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._z = np.empty(self.vocab_size, dtype=np.float64)
        self._p = np.empty(self.vocab_size, dtype=np.float64)
        self._c = np.empty(self.vocab_size, dtype=np.float64)

    def sample(
        self,
        logits: np.ndarray,
        mask: np.ndarray,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> int:
        """One allowed token id from ``softmax((logits + mask) / temperature)``,
        restricted to the ``top_k`` most likely (0: all) and then to the nucleus of
        mass ``top_p``."""
        return self._draw(logits, mask, temperature, top_p, top_k, False)[0]

    def sample_with_logprob(
        self,
        logits: np.ndarray,
        mask: np.ndarray,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> tuple[int, float]:
        """Like :meth:`sample`, plus the token's natural-log probability under the
        untempered, untruncated masked distribution ``softmax(logits + mask)``."""
        return self._draw(logits, mask, temperature, top_p, top_k, True)

    def _draw(
        self,
        logits: np.ndarray,
        mask: np.ndarray,
        temperature: float,
        top_p: float,
        top_k: int,
        want_lp: bool,
    ) -> tuple[int, float]:
        n = self.vocab_size
        if logits.shape != (n,) or mask.shape != (n,):
            raise ValueError(
                f"logits and mask must have shape ({n},), got {logits.shape} and {mask.shape}"
            )
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        z = self._z
        np.add(logits, mask, out=z)
        m = float(_max(z))
        if not math.isfinite(m):  # all masked, or NaN / +inf logits
            raise ValueError("no allowed token with a finite logit")
        p = self._p
        np.subtract(z, m, out=p)
        if temperature == 0.0:
            tok = int(z.argmax())
            if not want_lp:
                return tok, 0.0
            np.exp(p, out=p)
            return tok, float(z[tok] - m - math.log(float(_sum(p))))
        if temperature != 1.0:
            np.multiply(p, 1.0 / temperature, out=p)
        np.exp(p, out=p)  # masked -> exactly 0, the best token -> 1
        if top_k == 0 and top_p >= 1.0:
            # inverse CDF over the whole vocabulary: masked tokens add exactly 0 to the
            # cumulative sum, so the first entry above r is always an allowed token
            c = self._c
            _cumsum(p, out=c)
            total = float(c[-1])
            tok = int(c.searchsorted(self.rng.random() * total, "right"))
            if tok >= n:  # r rounded up to the total: the last allowed token
                tok = int(p.nonzero()[0][-1])
            if want_lp and temperature == 1.0:
                return tok, float(z[tok] - m - math.log(total))
        else:
            if top_k == 0:
                # the nucleus lies among tokens with p >= (1 - top_p) * total / n: the
                # others together weigh less than (1 - top_p) * total. Sort only those.
                total = float(_sum(p))
                cand = (p >= (1.0 - top_p) * total / n).nonzero()[0]
                pc = p[cand]
            else:
                cand = p.nonzero()[0]
                pc = p[cand]
                if top_k < cand.size:
                    keep = pc.argpartition(cand.size - top_k)[cand.size - top_k :]
                    cand, pc = cand[keep], pc[keep]
                total = float(_sum(pc))
            if top_p < 1.0 and cand.size > 1:
                order = (-pc).argsort(kind="stable")
                cand = cand[order]
                c = pc[order].cumsum()
                cut = int(c.searchsorted(top_p * total, "left")) + 1
                cand, c = cand[:cut], c[:cut]
            else:
                c = pc.cumsum()
            j = int(c.searchsorted(self.rng.random() * float(c[-1]), "right"))
            tok = int(cand[min(j, cand.size - 1)])
        if not want_lp:
            return tok, 0.0
        # log-prob under the untempered masked distribution
        c = self._c
        np.subtract(z, m, out=c)
        np.exp(c, out=c)
        return tok, float(z[tok] - m - math.log(float(_sum(c))))
