"""The performance state machine: who plays when, with no I/O.

Notes and the time go in; requests come out (start an answer, release it, cut it, yield
the turn, panic, reject, notice). The app carries the requests out: this module imports
no bridge, thread, asyncio or I/O module, and is handed its clocks (``now`` and ``grid``),
so its tests run without JACK on a fake clock — policy apart from I/O, the way Magenta's
call-and-response interaction takes its MIDI hub and generator from outside.

What it owns: the notes held and played (both parts), phrase ends (a silence, or a bar
line), speculative answers during the silence, the echo guard, stale held notes, jam-bar
timing, the context an answer continues and the machine's velocity, and turn-taking: in
call mode a performer who starts a new phrase while the machine is still answering takes
the turn (``yield_turn``), as a duet partner would.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BEATS_PER_BAR",
    "STALE_HOLD_S",
    "Cut",
    "Drop",
    "Grid",
    "Notice",
    "Panic",
    "Performance",
    "PhraseEnd",
    "PlayedNote",
    "Reject",
    "Release",
    "Request",
    "StartAnswer",
    "Timeline",
    "YieldTurn",
    "jam_anchor_seed",
]

#: Seconds without any note event after which notes still held count as released.
STALE_HOLD_S = 4.0
#: With the machine off, an answer to what was played is made this long after the
#: performer's hands are off the keys, and kept warm: /divergent/generate then only has
#: to release notes that already exist (a button press sounds at once, not after the
#: prompt's prefill and the first note's tokens, 78 ms median before). Playing on, or a
#: control change, drops it.
WARM_AFTER_S = 0.1
BEATS_PER_BAR = 4.0

#: (onset beat from the context's bar line, pitch, duration in beats, velocity)
ContextNote = tuple[float, int, float, int]


def jam_anchor_seed(jam_bar: float, bars: int, seed: int | None) -> int:
    """The knob's anchor seed for a jam bar: one per phrase of ``bars`` bars on the grid.

    Each jam bar is an answer of its own; drawing its anchor from its own seed gave every
    bar a new idea. On the bundled model at d = 1 (32 eight-bar jams over 16 prompts, each
    starting on a phrase's third bar) the pitch centre jumped 8.8 semitones bar to bar
    (median; 2.1 at d = 0); one anchor per four-bar phrase: 4.8. The phrase, like a
    call-mode answer of ``bars`` bars, keeps one idea; the next phrase draws a new one.
    ``seed`` (the app's, if fixed) makes another run's jam draw other ideas.
    """
    phrase = math.floor(jam_bar / (max(1, bars) * BEATS_PER_BAR))
    return (seed or 0) * 1_000_003 + phrase % 1_000_003


class Grid(Protocol):
    """The beat grid answers are placed on (a clock read at one moment)."""

    def bpm(self) -> float:
        """Tempo in quarter notes per minute."""
        ...

    def beat_at(self, t: float) -> float:
        """Beat position at monotonic time ``t``."""
        ...

    def time_at(self, beat: float) -> float:
        """Monotonic time of beat position ``beat``."""
        ...


@dataclass(frozen=True, slots=True)
class Timeline:
    """An immutable beat line: beat ``beat0`` at time ``t0``, then ``tempo`` BPM.

    What the app hands out as its grid: a snapshot of the leading clock, so a reader
    never sees it change between two calls (``followed``: the tempo belongs to a clock
    master that may change it, so far-off notes are timed again just before they play).
    """

    t0: float
    beat0: float
    tempo: float
    followed: bool = False

    def bpm(self) -> float:
        """Tempo in BPM."""
        return self.tempo

    def beat_at(self, t: float) -> float:
        """Beat position at monotonic time ``t``."""
        return self.beat0 + (t - self.t0) * self.tempo / 60.0

    def time_at(self, beat: float) -> float:
        """Monotonic time of beat position ``beat``."""
        return self.t0 + (beat - self.beat0) * 60.0 / self.tempo

    def retempo(self, tempo: float, at: float) -> Timeline:
        """The same line from ``at`` on at ``tempo`` (the beat position does not jump)."""
        return Timeline(at, self.beat_at(at), tempo, self.followed)


@dataclass
class PlayedNote:
    """A note, in monotonic seconds (``off`` None while held)."""

    on: float
    pitch: int
    velocity: int
    off: float | None = None
    machine: bool = False


# --- requests: what the app is asked to do ----------------------------------------------


@dataclass(frozen=True, slots=True)
class StartAnswer:
    """Generate an answer continuing ``notes`` (a speculative one waits for ``Release``;
    a jam bar sounds as it comes)."""

    answer_id: int
    t: float
    reason: str
    notes: tuple[ContextNote, ...]
    origin: float
    velocity: int
    performer_notes: int
    jam_bar: float | None = None
    speculative: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    """Let answer ``answer_id`` sound from ``t`` (its notes so far now, the rest as made)."""

    answer_id: int
    t: float


@dataclass(frozen=True, slots=True)
class Cut:
    """A newer answer takes over: drop this one's pending notes (sounding ones end)."""

    answer_id: int


@dataclass(frozen=True, slots=True)
class Drop:
    """A speculative answer the performer outplayed: stop it; nothing of it sounds."""

    answer_id: int


@dataclass(frozen=True, slots=True)
class YieldTurn:
    """The performer took the turn: release this answer's sounding notes now, stop it."""

    answer_id: int


@dataclass(frozen=True, slots=True)
class Panic:
    """Silence the machine: stop every answer, note-offs for everything."""

    why: str


@dataclass(frozen=True, slots=True)
class Reject:
    """A request that cannot be carried out (reported to the peers)."""

    message: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the operator should know (logged as a warning)."""

    message: str


@dataclass(frozen=True, slots=True)
class PhraseEnd:
    """A phrase ended at ``t`` (``reason``: None for a silence, else what ended it)."""

    t: float
    reason: str | None = None


Request = StartAnswer | Release | Cut | Drop | YieldTurn | Panic | Reject | Notice | PhraseEnd


class Performance:
    """The live performance's state and policy; every method runs on one thread.

    ``now`` returns monotonic seconds; ``grid`` returns the grid at this moment;
    ``usable(answer_id)`` says whether a speculative answer can still be released. Inputs
    are :meth:`performer_note`, :meth:`machine_note`, :meth:`tick` (at or after
    :meth:`next_deadline`), the controls (:meth:`set_mode`, :meth:`generate`,
    :meth:`stop`) and the answers' fate (:meth:`answer_failed`, :meth:`answer_complete`).
    Each returns the requests for the app, in order.
    """

    def __init__(
        self,
        *,
        now: Callable[[], float],
        grid: Callable[[], Grid],
        mode: str = "call",
        phrase_silence_s: float = 0.6,
        bar_ends_phrase: bool = False,
        velocity: int = 0,
        yield_turn: bool = True,
        usable: Callable[[int], bool] = lambda answer_id: True,
    ) -> None:
        self._now = now
        self._grid = grid
        self._usable = usable
        self.mode = mode
        self.phrase_silence_s = phrase_silence_s
        self.bar_ends_phrase = bar_ends_phrase
        self.velocity_setting = velocity
        self.yield_turn = yield_turn
        self.held: dict[tuple[int, int], PlayedNote] = {}
        self.history: deque[PlayedNote] = deque(maxlen=512)
        self.performer_notes = 0
        self.answered_notes = 0  # performer notes already answered (call mode)
        self.answer_id = 0
        self.echoes = 0
        self._last_note_event = 0.0
        # the machine's last notes (time, channel, pitch, on, velocity), to recognise echoes
        self._recent_out: deque[tuple[float, int, int, bool, int]] = deque(maxlen=64)
        self._spec_at: float | None = None  # when to start a speculative answer
        self._end_at: float | None = None  # when the phrase ends, if the silence lasts
        self._speculative: StartAnswer | None = None
        self._playing: int | None = None  # the answer now allowed to sound (call mode)
        self._playing_until: float | None = None  # its last note-off, once known
        self._jam_at: float | None = None  # when to ask for the next jam bar
        self._jam_bar: float | None = None  # that bar's beat
        self._jam_last: float | None = None  # the last bar asked for

    # ------------------------------------------------------------------ notes in

    def is_echo(self, t: float, channel: int, pitch: int, on: bool, velocity: int) -> bool:
        """A machine note coming back in (``divergent out`` routed into ``divergent in``,
        as loopMIDI on Windows does): to be ignored, or the machine would answer itself.

        A loop returns the bytes it was given, so a note-on echo has the velocity the
        machine sent; a performer who strikes the pitch the machine just played, at another
        velocity, is heard (a note-off's velocity varies between keyboards: not compared).
        """
        for i, (sent_t, ch, note, sent_on, sent_vel) in enumerate(self._recent_out):
            # -5..+50 ms: two stamps taken in different places (after our send, at rtmidi's
            # arrival), and a VM that may stall between them
            same = ch == channel and note == pitch and sent_on == on
            same = same and (not on or sent_vel == velocity)
            if same and -0.005 <= t - sent_t <= 0.05:
                del self._recent_out[i]
                self.echoes += 1
                return True
        return False

    def performer_note(
        self, t: float, on: bool, pitch: int, velocity: int, channel: int
    ) -> list[Request]:
        """A performer's note-on (``on``) or note-off at ``t``."""
        key = (channel, pitch)
        self._last_note_event = t
        if not on:
            note_off = self.held.pop(key, None)
            if note_off is None:
                return []
            note_off.off = t
            if not self.held and self.mode == "call":
                return self._arm_phrase_end(t)
            if not self.held and self.mode == "off":
                out = self._drop_speculation()
                self._spec_at = t + WARM_AFTER_S
                return out
            return []
        prev = self.held.pop(key, None)
        if prev is not None:
            prev.off = t
        note = PlayedNote(on=t, pitch=pitch, velocity=velocity)
        self.held[key] = note
        self.history.append(note)
        self.performer_notes += 1
        self._end_at = None
        out = self._drop_speculation()
        if self.yield_turn and self.mode == "call" and self.answering(t):
            # a new phrase over the answer: hand the turn over at its first note
            assert self._playing is not None
            out.append(YieldTurn(self._playing))
            self._playing = None
        return out

    def machine_note(self, t: float, channel: int, pitch: int, velocity: int, on: bool) -> None:
        """A machine note as it was sent (for the echo guard and the context)."""
        self._recent_out.append((t, channel, pitch, on, velocity))
        if on:
            self.history.append(PlayedNote(on=t, pitch=pitch, velocity=velocity, machine=True))
            return
        for n in reversed(self.history):
            if n.machine and n.pitch == pitch and n.off is None:
                n.off = t
                break

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: only on input)."""
        times = [t for t in (self._spec_at, self._end_at, self._jam_at) if t is not None]
        if self.held:
            times.append(self._last_note_event + STALE_HOLD_S)
        if self.mode == "jam" and self._jam_at is None:
            times.append(self._now())
        return min(times) if times else None

    def tick(self) -> list[Request]:
        """Whatever is due now: stale held notes, speculation, the phrase end, a jam bar."""
        now = self._now()
        out = self._release_stale_notes(now)
        if self._spec_at is not None and now >= self._spec_at:
            self._spec_at = None
            out += self._speculate(now)
        if self._end_at is not None and now >= self._end_at:
            self._end_at = None
            out += self._phrase_end(now)
        out += self._jam(now)
        return out

    def answering(self, t: float) -> bool:
        """Whether the machine's answer (call mode) is still generating or sounding at t."""
        if self._playing is None:
            return False
        return self._playing_until is None or t < self._playing_until

    # ------------------------------------------------------------------ controls

    def set_mode(self, mode: str) -> list[Request]:
        """call, jam or off; a change silences the machine."""
        if mode == self.mode:
            return []
        out = self.stop(f"mode {self.mode} -> {mode}")
        self.mode = mode
        self.answered_notes = self.performer_notes
        self._jam_at = self._jam_bar = self._jam_last = None
        return out

    def generate(self) -> list[Request]:
        """Answer now, from what was played (every mode): the warm answer to exactly what
        was played, when there is one, else a new one."""
        t = self._now()
        self.answered_notes = self.performer_notes
        out: list[Request] = [PhraseEnd(t, "generate")]
        self._spec_at = None
        spec, self._speculative = self._speculative, None
        if (
            spec is not None
            and spec.performer_notes == self.performer_notes
            and self._usable(spec.answer_id)
        ):
            return out + self._release(spec.answer_id, t)
        if spec is not None:
            out.append(Drop(spec.answer_id))
        return out + self._answer(t, reason="/divergent/generate")

    def settings_changed(self) -> list[Request]:
        """A control an answer is made with changed (divergence, temperature, bars, the
        concept, …): a speculative or warm answer made with the old one is dropped."""
        return self._drop_speculation()

    def stop(self, why: str) -> list[Request]:
        """Silence the machine now."""
        self._spec_at = None
        self._speculative = None
        self._playing = None
        return [Panic(why)]

    # ------------------------------------------------------------------ answers' fate

    def answer_failed(self, answer_id: int) -> None:
        """Answer ``answer_id`` ended without sounding (failed, cancelled, empty)."""
        if self._speculative is not None and self._speculative.answer_id == answer_id:
            self._speculative = None
        if self._playing == answer_id:
            self._playing = None

    def answer_complete(self, answer_id: int, until: float) -> None:
        """Answer ``answer_id`` is fully placed: its last note ends at ``until``."""
        if self._playing == answer_id:
            self._playing_until = until

    # ------------------------------------------------------------------ policy

    def _arm_phrase_end(self, t_off: float) -> list[Request]:
        out = self._drop_speculation()
        silence = self.phrase_silence_s
        # speculate after a third of the silence (at most 100 ms): not on every short gap
        # inside a phrase, but early enough to have the answer ready when the phrase ends
        self._spec_at = t_off + min(0.1, silence / 3)
        end = t_off + silence
        if self.bar_ends_phrase:
            # or at the first bar line after at least one silent beat, if that is sooner
            grid = self._grid()
            beat = grid.beat_at(t_off) + 1.0
            end = min(end, grid.time_at(math.ceil(beat / BEATS_PER_BAR) * BEATS_PER_BAR))
        self._end_at = end
        return out

    def _drop_speculation(self) -> list[Request]:
        self._spec_at = None
        spec, self._speculative = self._speculative, None
        return [Drop(spec.answer_id)] if spec is not None else []

    def _speculate(self, now: float) -> list[Request]:
        """Start the answer during the silence, before the phrase is known to be over.

        When the silence lasts, the phrase end only has to release notes that already
        exist (a response of a few milliseconds); when the performer plays on, the
        speculative answer is dropped and nothing of it sounds.
        """
        if self.held or self.mode not in ("call", "off"):
            return []
        if self.performer_notes <= self.answered_notes:
            return []
        reason = "phrase" if self.mode == "call" else "warm"
        return self._answer(now, reason=reason, speculative=True)

    def _phrase_end(self, now: float) -> list[Request]:
        if self.held or self.mode != "call" or self.performer_notes <= self.answered_notes:
            return []
        out: list[Request] = [PhraseEnd(now)]
        self.answered_notes = self.performer_notes
        spec, self._speculative = self._speculative, None
        if (
            spec is not None
            and spec.performer_notes == self.performer_notes
            and self._usable(spec.answer_id)
        ):
            return out + self._release(spec.answer_id, now)
        if spec is not None:
            out.append(Drop(spec.answer_id))
        return out + self._answer(now, reason="phrase")

    def _release(self, answer_id: int, t: float) -> list[Request]:
        """Let an answer sound: the previous answer stops, this one starts now (or on grid)."""
        out: list[Request] = []
        if self._playing is not None and self._playing != answer_id:
            out.append(Cut(self._playing))
        self._playing = answer_id
        self._playing_until = None
        out.append(Release(answer_id, t))
        return out

    def _answer(
        self, t: float, *, reason: str, jam_bar: float | None = None, speculative: bool = False
    ) -> list[Request]:
        notes, origin = self.context(t)
        if not notes:
            if speculative:
                return []
            return [Reject(f"{reason}: nothing to continue yet - play something first (rejected)")]
        out: list[Request] = []
        if not speculative:
            # one generation at a time: a speculative one still running is outplayed
            out += self._drop_speculation()
        self.answer_id += 1
        start = StartAnswer(
            answer_id=self.answer_id,
            t=t,
            reason=reason,
            notes=tuple(notes),
            origin=origin,
            velocity=self.velocity(),
            performer_notes=self.performer_notes,
            jam_bar=jam_bar,
            speculative=speculative,
        )
        out.append(start)
        if speculative:
            self._speculative = start
        elif jam_bar is not None:
            out.append(Release(start.answer_id, t))  # jam bars overlap nothing: no cut
        else:
            out += self._release(start.answer_id, t)
        return out

    def _release_stale_notes(self, now: float) -> list[Request]:
        """Held notes with no other input for STALE_HOLD_S: their note-off was lost (a
        dropped MIDI event, a stuck key). Treat them as released, or call mode would wait
        for a phrase end forever."""
        if not self.held or now - self._last_note_event < STALE_HOLD_S:
            return []
        out: list[Request] = [
            Notice(
                f"no note-off for {sorted(p for _, p in self.held)} after "
                f"{STALE_HOLD_S:.0f} s of silence: treating as released"
            )
        ]
        for note in self.held.values():
            note.off = now
        self.held.clear()
        if self.mode == "call":
            out += self._arm_phrase_end(now - self.phrase_silence_s)
        return out

    def _jam(self, now: float) -> list[Request]:
        """In jam mode: ask for each next bar shortly before it starts."""
        if self.mode != "jam":
            return []
        if self._jam_at is None:
            self._plan_jam(now)
        assert self._jam_at is not None and self._jam_bar is not None
        if now < self._jam_at:
            return []
        bar = self._jam_bar
        self._jam_last = bar
        self._plan_jam(now)
        # only while the performer plays (a note in the last two bars): the machine does
        # not jam on its own echo
        since = self._grid().time_at(bar - 3 * BEATS_PER_BAR)
        if any(n.on >= since and not n.machine for n in self.history):
            return self._answer(now, reason="jam", jam_bar=bar)
        return []

    def _plan_jam(self, now: float) -> None:
        grid = self._grid()
        bpb = BEATS_PER_BAR
        next_bar = math.floor(grid.beat_at(now) / bpb) * bpb + bpb
        if self._jam_last is not None and next_bar <= self._jam_last:
            next_bar = self._jam_last + bpb
        # ahead by half a beat (at least 150 ms): late enough to hear the performer's bar,
        # early enough for a bar's worth of tokens on a slow machine
        lead = max(0.15, 30.0 / max(grid.bpm(), 1.0))
        self._jam_bar = next_bar
        self._jam_at = grid.time_at(next_bar) - lead

    # ------------------------------------------------------------------ context

    def context(self, t_end: float, bars_back: int = 8) -> tuple[list[ContextNote], float]:
        """Recent notes (both parts) in beats from a bar line, and that bar line's beat."""
        grid = self._grid()
        bpb = BEATS_PER_BAR
        end_beat = grid.beat_at(t_end)
        notes = [n for n in self.history if n.on <= t_end]
        if not notes:
            return [], 0.0
        first = max(grid.beat_at(notes[0].on), end_beat - bars_back * bpb)
        origin = math.floor(first / bpb) * bpb
        out = []
        for n in notes:
            b = grid.beat_at(n.on)
            if b < origin:
                continue
            off = n.off if n.off is not None else t_end
            dur = max(grid.beat_at(off) - b, 1 / 12)
            out.append((b - origin, n.pitch, dur, n.velocity))
        return out, origin

    def velocity(self) -> int:
        """The machine's velocity: fixed, or (0) the mean of the performer's last 8 notes,
        so a soft phrase gets a soft answer."""
        if self.velocity_setting > 0:
            return self.velocity_setting
        played = [n.velocity for n in self.history if not n.machine][-8:]
        return max(1, min(127, round(sum(played) / len(played)))) if played else 90
