"""Three clocks behind one protocol: internal tempo, MIDI clock follower, Ableton Link.

Every time here is ``time.monotonic()`` seconds (CLOCK_MONOTONIC on Linux, the clock JACK
stamps with too); every beat is a quarter note. The server converts both ways:
``beat_at(t)`` places a played note on the beat grid, ``time_at(beat)`` tells the sender
when a generated note is due.

None of these classes locks. Feed or set each one from one thread (the event loop); read
it from any thread: :class:`InternalClock` and :class:`MidiClockFollower` publish what
readers need as one immutable snapshot, swapped in a single assignment, so a reader on
the worker thread sees the line before an update or after it, never half of each (a new
slope with an old offset). :class:`LinkClock` reads Link, which is thread-safe for reading.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mido

__all__ = [
    "BPM_MAX",
    "BPM_MIN",
    "CLOCK_SOURCES",
    "Clock",
    "InternalClock",
    "LinkClock",
    "MidiClockFollower",
    "make_clock",
]

BPM_MIN = 20.0
BPM_MAX = 300.0
CLOCK_SOURCES = ("internal", "midi", "link")

PPQN = 24  # MIDI clock ticks per quarter note
TICKS_PER_SONGPOS = 6  # song position pointer counts sixteenths: 6 ticks each


def _check_bpm(bpm: float) -> float:
    bpm = float(bpm)
    if not (BPM_MIN <= bpm <= BPM_MAX):  # also rejects NaN
        raise ValueError(f"tempo {bpm} BPM is outside {BPM_MIN:g}..{BPM_MAX:g}")
    return bpm


@runtime_checkable
class Clock(Protocol):
    """Tempo and beat position against ``time.monotonic()``."""

    source: str  # "internal" | "midi" | "link"

    def bpm(self) -> float:
        """Current tempo in quarter notes per minute."""
        ...

    def beat_at(self, t: float) -> float:
        """Beat position (quarter notes) at monotonic time ``t``."""
        ...

    def time_at(self, beat: float) -> float:
        """Monotonic time at which beat position ``beat`` occurs (at the current tempo)."""
        ...

    def running(self) -> bool:
        """Whether the beat position advances (a followed master may be stopped)."""
        ...


@dataclass(frozen=True, slots=True)
class _Tempo:
    """A steady tempo anchored at (``t0``, ``beat0``): what an InternalClock's readers see."""

    t0: float
    beat0: float
    bpm: float

    def beat_at(self, t: float) -> float:
        return self.beat0 + (t - self.t0) * self.bpm / 60.0


class InternalClock:
    """A steady tempo of our own: beat 0 at ``start`` (default: now)."""

    source: str = "internal"

    def __init__(self, *, bpm: float = 120.0, start: float | None = None) -> None:
        # a tempo change moves the anchor so the beat position never jumps; anchor and
        # tempo change together, in one assignment (readers may be on another thread)
        t0 = time.monotonic() if start is None else float(start)
        self._line = _Tempo(t0=t0, beat0=0.0, bpm=_check_bpm(bpm))

    def bpm(self) -> float:
        """Current tempo in BPM."""
        return self._line.bpm

    def beat_at(self, t: float) -> float:
        """Beat position at monotonic time ``t``."""
        return self._line.beat_at(t)

    def time_at(self, beat: float) -> float:
        """Monotonic time of beat position ``beat``."""
        line = self._line
        return line.t0 + (beat - line.beat0) * 60.0 / line.bpm

    def running(self) -> bool:
        """Always true: the internal clock never stops."""
        return True

    def set_bpm(self, bpm: float, at: float | None = None) -> None:
        """Change the tempo from time ``at`` (default now) on, keeping the beat continuous.

        Raises ValueError outside 20..300 BPM.
        """
        new = _check_bpm(bpm)
        t = time.monotonic() if at is None else float(at)
        self._line = _Tempo(t0=t, beat0=self._line.beat_at(t), bpm=new)


@dataclass(frozen=True, slots=True)
class _Grid:
    """What a MidiClockFollower's readers see, published whole after each message.

    Tick ``k`` arrives at ``a + b * k``; while ``running``, tick ``k`` is at song position
    ``k - k0`` ticks; while stopped, the position is ``stopped_pos``; ``t_alive`` is the
    last sign of life while running.
    """

    a: float
    b: float
    k0: int
    running: bool
    stopped_pos: int
    t_alive: float | None


# per accepted tick: the jitter estimate forgets a burst over a few hundred ticks
_JITTER_DECAY = 0.995


class MidiClockFollower:
    """Follows a MIDI clock master: 24 ticks per quarter note, start/continue/stop, SPP.

    Tempo and phase come from a least-squares line through the arrival times of the last
    ``window_ticks`` ticks against their tick index. JACK delivers MIDI once per period
    (1.33 ms at 64 frames, 48 kHz), so single tick times jitter by up to a period; the
    fitted line averages that out, and predicts ticks a beat ahead to well under a
    millisecond on a steady clock.

    Robustness: a tick far off the line (more than a quarter of a tick period and 3 ms,
    or 2.5x the jitter the accepted ticks have shown lately, up to 3/4 of a tick period;
    or an interval over 3x the median, e.g. a late tick after a GIL stall) still counts
    for the position but stays out of the fit; three such ticks in a row mean the master
    really changed tempo or phase, and the line restarts from them (``restarts``). The
    jitter term matters with large JACK periods: at 512 frames (10.7 ms) every tick is
    stamped with its period's start, and a fixed 4.6 ms bound at 137 BPM took a steady
    master for a tempo change again and again (measured: 117 BPM followed for 137). No tick for
    ``timeout`` seconds restarts the line too (and ``running()`` turns false).

    Position follows the MIDI spec: after Start the next tick is beat 0; after Continue
    the next tick is the song position (from Song Position Pointer, or where Stop left
    it). Ticks without Start (a master that is stopped but sends clock) keep the tempo
    current but do not make the clock run.
    """

    source: str = "midi"

    # a line needs this many ticks before its own slope beats the previous tempo
    MIN_FIT = 8
    # this many consecutive outliers mean the master moved: restart the line from them
    MAX_OUTLIERS = 3

    def __init__(
        self, *, fallback_bpm: float = 120.0, window_ticks: int = 48, timeout: float = 0.5
    ) -> None:
        if window_ticks < 3:
            raise ValueError("window_ticks must be at least 3")
        self.window_ticks = window_ticks
        self.timeout = timeout
        # seconds per tick before any has been measured
        self._period = 60.0 / (_check_bpm(fallback_bpm) * PPQN)
        self._measured = False  # whether _period comes from real ticks
        self._window: deque[tuple[int, float]] = deque(maxlen=window_ticks)
        self._outliers: list[tuple[int, float]] = []
        self._k = -1  # index of the last tick received (ticks are counted, never inferred)
        self._t_last: float | None = None  # arrival of the last tick
        self._t_alive: float | None = None  # last sign of life while running
        self._anchor_t = time.monotonic()  # where the line goes through with no ticks
        self._anchor_k = 0
        # the fitted line: tick k arrives at _a + _b * k
        self._a = self._anchor_t
        self._b = self._period
        # song position: tick k is at position k - _k0 ticks while running
        self._k0 = 0
        self._running = False
        self._stopped_pos = 0  # position (ticks) where the next tick lands after Continue
        self._reported_bpm: float | None = None
        self.ticks = 0
        self.outliers = 0
        self.restarts = 0  # lines restarted after MAX_OUTLIERS outliers in a row
        # a slowly decaying maximum of accepted ticks' distance from the line (seconds)
        self._jitter = 0.0
        self._grid = self._snapshot()

    def _snapshot(self) -> _Grid:
        return _Grid(
            a=self._a,
            b=self._b,
            k0=self._k0,
            running=self._running,
            stopped_pos=self._stopped_pos,
            t_alive=self._t_alive,
        )

    # ------------------------------------------------------------------ reading

    # Readers take one reference to the published snapshot and compute from it alone:
    # the fields below it (_a, _b, _k0, ...) belong to the feeding thread.

    def bpm(self) -> float:
        """Tempo from the fitted tick period."""
        return 60.0 / (self._grid.b * PPQN)

    def beat_at(self, t: float) -> float:
        """Beat position at ``t``; while stopped, the position where Continue resumes."""
        g = self._grid
        if not g.running:
            return g.stopped_pos / PPQN
        return ((t - g.a) / g.b - g.k0) / PPQN

    def time_at(self, beat: float) -> float:
        """Predicted arrival time of the tick at ``beat`` (meaningful while running)."""
        g = self._grid
        return g.a + g.b * (g.k0 + beat * PPQN)

    def running(self, now: float | None = None) -> bool:
        """Started (or continued), not stopped, and a tick within ``timeout`` of ``now``."""
        g = self._grid
        if not g.running or g.t_alive is None:
            return False
        t = time.monotonic() if now is None else now
        return t - g.t_alive < self.timeout

    # ------------------------------------------------------------------ feeding

    def feed(self, t: float, message: mido.Message) -> str | None:
        """Take one message that arrived at ``t``; say what it changed.

        Returns ``"tick"`` (a clock tick), ``"tempo"`` (a tick that moved the tempo by
        0.5 BPM or more since the last ``"tempo"``), ``"start"``, ``"continue"``,
        ``"stop"``, ``"songpos"``, or None for messages that are not about the clock.
        Readers see the message's whole effect at once, when it is published at the end.
        """
        what = self._take(t, message)
        if what is not None:
            self._grid = self._snapshot()
        return what

    def _take(self, t: float, message: mido.Message) -> str | None:
        kind = message.type
        if kind == "clock":
            return self._tick(t)
        if kind == "start":
            # the next tick is beat 0
            self._k0 = self._k + 1
            self._start(t)
            return "start"
        if kind == "continue":
            self._k0 = self._k + 1 - self._stopped_pos
            self._start(t)
            return "continue"
        if kind == "stop":
            if self._running:
                self._stopped_pos = self._k + 1 - self._k0
            self._running = False
            return "stop"
        if kind == "songpos":
            pos = int(message.pos) * TICKS_PER_SONGPOS
            self._stopped_pos = pos
            if self._running:
                # not sent while playing per the spec; if it is, jump there at the next tick
                self._k0 = self._k + 1 - pos
            return "songpos"
        return None

    def _start(self, t: float) -> None:
        self._running = True
        self._t_alive = t
        if self._t_last is None or t - self._t_last > self.timeout:
            # no line to continue: the first tick is expected right after Start
            self._restart_line(t, self._k + 1)

    def _restart_line(self, t: float, k: int) -> None:
        self._window.clear()
        self._outliers.clear()
        self._anchor_t = t
        self._anchor_k = k
        self._fit()

    def _tick(self, t: float) -> str:
        self._k += 1
        k = self._k
        self.ticks += 1
        gap = None if self._t_last is None else t - self._t_last
        self._t_last = t
        if self._running:
            self._t_alive = t
        if gap is None or gap > self.timeout:
            self._restart_line(t, k)
            self._window.append((k, t))
        elif self._is_outlier(k, t, gap):
            self.outliers += 1
            self._outliers.append((k, t))
            if len(self._outliers) >= self.MAX_OUTLIERS:
                self.restarts += 1
                self._window.clear()
                self._window.extend(self._outliers)
                self._outliers.clear()
                # the tempo may have changed too: let the few new ticks set the slope
                self._measured = False
        else:
            if len(self._window) >= 2:
                residual = abs(t - (self._a + self._b * k))
                self._jitter = max(residual, self._jitter * _JITTER_DECAY)
            self._window.append((k, t))
            self._outliers.clear()
        self._fit()
        bpm = self.bpm()
        if self._reported_bpm is None or abs(bpm - self._reported_bpm) >= 0.5:
            self._reported_bpm = bpm
            return "tempo"
        return "tick"

    def _is_outlier(self, k: int, t: float, gap: float) -> bool:
        if len(self._window) < 4:
            # a line through two or three ticks stamped a JACK period apart is no line yet
            # (two ticks in one 10.7 ms period read as 240 BPM): nothing is off it
            return False
        if len(self._window) >= 4:
            ks = [w[0] for w in self._window]
            ts = [w[1] for w in self._window]
            intervals = [(ts[i + 1] - ts[i]) / (ks[i + 1] - ks[i]) for i in range(len(ks) - 1)]
            if gap > 3.0 * statistics.median(intervals):
                return True
        residual = t - (self._a + self._b * k)
        tolerance = max(0.25 * self._b, 0.003, min(2.5 * self._jitter, 0.75 * self._b))
        return abs(residual) > tolerance

    def _fit(self) -> None:
        n = len(self._window)
        if n == 0:
            self._b = self._period
            self._a = self._anchor_t - self._b * self._anchor_k
            return
        if n < self.MIN_FIT and (self._measured or n < 2):
            # too few ticks for a slope of their own: keep the last tempo, fit the phase
            b = self._period
            self._b = b
            self._a = sum(tt - b * kk for kk, tt in self._window) / n
            return
        # least squares t = a + b k, centred for precision (t is ~1e4 s since boot)
        k_mean = sum(kk for kk, _ in self._window) / n
        t_mean = sum(tt for _, tt in self._window) / n
        sxx = sum((kk - k_mean) ** 2 for kk, _ in self._window)
        sxy = sum((kk - k_mean) * (tt - t_mean) for kk, tt in self._window)
        b = sxy / sxx
        lo, hi = 60.0 / (BPM_MAX * 2 * PPQN), 60.0 / (BPM_MIN / 2 * PPQN)
        if not (lo <= b <= hi) or not math.isfinite(b):
            # a degenerate window (burst of late ticks): keep the last good tempo
            b = self._period
        self._b = b
        self._a = t_mean - b * k_mean
        if n >= self.MIN_FIT:
            self._period = b
            self._measured = True


class LinkClock:
    """An Ableton Link session member (aalink): shared tempo and beat grid.

    aalink's ``Link`` wants a running asyncio loop when it is made (its callbacks and
    ``sync()`` futures live on it; passing ``loop=`` is deprecated). Create a LinkClock
    inside a coroutine and its Link uses the running loop; created outside any loop,
    it makes the Link inside a private loop that it keeps (unused: this class registers
    no callbacks) and closes in :meth:`close`. Always call :meth:`close` (or use ``with``).

    Link's own clock (``link.time``) is CLOCK_MONOTONIC_RAW on Linux, not
    ``time.monotonic()``: the two differ by an offset (a fraction of a second after boot,
    growing under NTP slewing) and by up to a few hundred ppm in rate. So the conversion
    never uses ``link.time``: it reads Link's beat "now" bracketed by two
    ``time.monotonic()`` reads and extrapolates at the session tempo, which is exact up
    to a tempo change and the ppm rate difference (under 0.1 ms a second ahead).
    """

    source: str = "link"

    def __init__(self, *, bpm: float = 120.0, quantum: float = 4.0) -> None:
        import aalink  # a compiled extension: load it only when Link is wanted

        self._private_loop: asyncio.AbstractEventLoop | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._private_loop = asyncio.new_event_loop()
        self._link: Any = None
        try:
            bpm = _check_bpm(bpm)
            if self._private_loop is None:
                self._link = aalink.Link(bpm)
            else:

                async def make() -> Any:
                    return aalink.Link(bpm)

                self._link = self._private_loop.run_until_complete(make())
            self._link.quantum = float(quantum)
            self._link.enabled = True
        except BaseException:
            self.close()
            raise

    def bpm(self) -> float:
        """The session tempo."""
        return float(self._link.tempo)

    def _now(self) -> tuple[float, float, float]:
        """(monotonic now, Link beat now, tempo), read as close together as Python can."""
        best: tuple[float, float, float] | None = None
        for _ in range(3):
            t0 = time.monotonic()
            beat = float(self._link.beat)
            t1 = time.monotonic()
            # a wide bracket means the thread was preempted between the reads: retry
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, (t0 + t1) / 2.0, beat)
            if t1 - t0 < 20e-6:
                break
        assert best is not None
        return best[1], best[2], float(self._link.tempo)

    def beat_at(self, t: float) -> float:
        """Session beat position at monotonic time ``t``."""
        now, beat, tempo = self._now()
        return beat + (t - now) * tempo / 60.0

    def time_at(self, beat: float) -> float:
        """Monotonic time of session beat ``beat`` at the current tempo."""
        now, b, tempo = self._now()
        return now + (beat - b) * 60.0 / tempo

    def running(self) -> bool:
        """True while Link is enabled: a Link timeline never stops."""
        return bool(self._link.enabled)

    def set_bpm(self, bpm: float) -> None:
        """Propose a tempo to the session (every peer follows). ValueError outside 20..300."""
        self._link.tempo = _check_bpm(bpm)

    def num_peers(self) -> int:
        """Other Link apps in the session."""
        return int(self._link.num_peers)

    @property
    def quantum(self) -> float:
        """Beats per phase cycle (a bar of 4 by default) for phase alignment."""
        return float(self._link.quantum)

    def link_time_offset(self) -> float:
        """Link's clock minus ``time.monotonic()``, in seconds, measured now (diagnostics)."""
        t0 = time.monotonic()
        lt = self._link.time.total_seconds()  # a timedelta of whole microseconds
        t1 = time.monotonic()
        return float(lt) - (t0 + t1) / 2.0

    def close(self) -> None:
        """Leave the session; idempotent."""
        link, self._link = self._link, None
        if link is not None:
            link.enabled = False
            # dropping the last reference joins aalink's scheduler thread
            del link
        if self._private_loop is not None:
            self._private_loop.close()
            self._private_loop = None

    def __enter__(self) -> LinkClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_clock(source: str, *, bpm: float) -> Clock:
    """The clock for ``source`` ("internal", "midi" or "link") starting at ``bpm``.

    For "midi", ``bpm`` is the tempo assumed until the master's ticks say otherwise.
    """
    if source == "internal":
        return InternalClock(bpm=bpm)
    if source == "midi":
        return MidiClockFollower(fallback_bpm=bpm)
    if source == "link":
        return LinkClock(bpm=bpm)
    raise ValueError(f"unknown clock source {source!r}: choose one of {', '.join(CLOCK_SOURCES)}")
