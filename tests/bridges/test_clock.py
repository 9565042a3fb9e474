"""Clocks: internal tempo math, MIDI clock following on synthetic ticks, Ableton Link."""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import mido
import pytest

from divergent.bridges.clock import (
    Clock,
    InternalClock,
    LinkClock,
    MidiClockFollower,
    make_clock,
)

CLOCK = mido.Message("clock")
START = mido.Message("start")
STOP = mido.Message("stop")
CONTINUE = mido.Message("continue")

JACK_PERIOD = 64 / 48000  # MIDI arrives once per period: times snap to the period's start


# ---------------------------------------------------------------- internal


def test_internal_clock_math() -> None:
    c = InternalClock(bpm=120.0, start=100.0)
    assert c.source == "internal" and c.running() and c.bpm() == 120.0
    assert c.beat_at(100.0) == 0.0
    assert c.beat_at(101.0) == pytest.approx(2.0)
    assert c.time_at(3.0) == pytest.approx(101.5)
    assert c.beat_at(99.5) == pytest.approx(-1.0)
    # a tempo change keeps the beat continuous at the change
    c.set_bpm(60.0, at=101.0)
    assert c.beat_at(101.0) == pytest.approx(2.0)
    assert c.beat_at(102.0) == pytest.approx(3.0)
    assert c.time_at(4.0) == pytest.approx(103.0)
    for beat in (-3.0, 0.0, 2.5, 17.25):
        assert c.beat_at(c.time_at(beat)) == pytest.approx(beat)
    for bad in (19.9, 300.1, float("nan")):
        with pytest.raises(ValueError):
            c.set_bpm(bad)
    with pytest.raises(ValueError):
        InternalClock(bpm=400.0)
    now = time.monotonic()
    d = InternalClock(bpm=90.0)
    assert abs(d.beat_at(now)) < 0.01  # beat 0 is "now" by default


def test_make_clock_and_protocol() -> None:
    internal = make_clock("internal", bpm=100.0)
    midi = make_clock("midi", bpm=100.0)
    assert isinstance(internal, InternalClock) and internal.bpm() == 100.0
    assert isinstance(midi, MidiClockFollower) and midi.bpm() == pytest.approx(100.0)
    assert midi.source == "midi" and not midi.running()
    assert isinstance(internal, Clock) and isinstance(midi, Clock)
    with pytest.raises(ValueError, match="unknown clock source"):
        make_clock("ntp", bpm=120.0)


# ---------------------------------------------------------------- MIDI clock follower


def _tick_times(
    bpm: float, n: int, t0: float = 1000.0, jitter: bool = True, seed: int = 0
) -> list[float]:
    """Arrival times of ``n`` ticks as JACK delivers them: snapped to period starts."""
    rng = random.Random(seed)
    period = 60.0 / (bpm * 24)
    out = []
    phase = rng.random() * JACK_PERIOD
    for k in range(n):
        true = t0 + k * period
        # the tick is seen at the end of the period it fell into, plus a little GIL wait
        seen = true + (JACK_PERIOD - ((true + phase) % JACK_PERIOD)) if jitter else true
        out.append(seen + (rng.random() * 0.0002 if jitter else 0.0))
    return out


def test_follower_tempo_and_phase_with_jack_jitter() -> None:
    f = MidiClockFollower(fallback_bpm=120.0)
    times = _tick_times(137.0, 24 * 8 + 1)
    assert f.feed(times[0] - 0.0005, START) == "start"
    results = [f.feed(t, CLOCK) for t in times[: 24 * 6]]
    assert results[0] == "tempo" and set(results) <= {"tick", "tempo"}
    assert f.running(now=times[24 * 6 - 1])
    assert f.bpm() == pytest.approx(137.0, abs=0.1)
    # the first tick after Start is beat 0
    assert f.beat_at(times[0]) == pytest.approx(0.0, abs=0.02)
    # predict beats 7 and 8 (one and two beats ahead) from what was seen up to beat 6
    for beat in (7, 8):
        assert abs(f.time_at(beat) - times[24 * beat]) < 0.001
    assert f.beat_at(times[24 * 6]) == pytest.approx(6.0, abs=0.02)
    assert f.outliers == 0


def test_follower_ignores_late_ticks_and_follows_tempo_changes() -> None:
    f = MidiClockFollower(fallback_bpm=120.0)
    times = _tick_times(120.0, 24 * 4)
    f.feed(times[0], START)
    for t in times[:50]:
        f.feed(t, CLOCK)
    # a GIL stall: one tick 12 ms late, the next one on time. It must not bend the line
    f.feed(times[50] + 0.012, CLOCK)
    for t in times[51:]:
        f.feed(t, CLOCK)
    assert f.outliers == 1
    assert f.bpm() == pytest.approx(120.0, abs=0.1)
    assert f.beat_at(times[-1]) == pytest.approx((len(times) - 1) / 24, abs=0.01)
    # an absurd interval: 5 periods of silence, then ticks carry on at the old grid
    t_last = times[-1]
    late = t_last + 5 * 60.0 / (120 * 24)
    assert f.feed(late, CLOCK) in ("tick", "tempo")
    assert f.bpm() == pytest.approx(120.0, abs=0.1)
    # the master jumps to 150 BPM: a few outliers, then the line restarts at the new tempo
    t = late
    for _ in range(48):
        t += 60.0 / (150 * 24)
        f.feed(t, CLOCK)
    assert f.bpm() == pytest.approx(150.0, abs=0.5)
    assert abs(f.time_at(f.beat_at(t) + 1) - (t + 60.0 / 150)) < 0.001


def test_follower_start_stop_continue_songpos() -> None:
    f = MidiClockFollower(fallback_bpm=120.0, window_ticks=48)
    period = 60.0 / (120 * 24)
    t = 50.0
    # ticks before Start: tempo is tracked, the position is not
    for _ in range(30):
        f.feed(t, CLOCK)
        t += period
    assert not f.running(now=t) and f.beat_at(t) == 0.0
    assert f.bpm() == pytest.approx(120.0, abs=0.01)
    f.feed(t - period / 2, START)
    assert f.running(now=t)  # Start itself says the master runs
    # Start: the next tick is beat 0, and with a running line we already know when
    assert f.time_at(0.0) == pytest.approx(t, abs=1e-6)
    for _ in range(24 * 2 + 1):  # ticks 0..48: beat 2 has just been played
        f.feed(t, CLOCK)
        t += period
    assert f.beat_at(t - period) == pytest.approx(2.0)
    assert f.feed(t, STOP) == "stop"
    assert not f.running(now=t)
    assert f.beat_at(t + 10) == pytest.approx(49 / 24)  # frozen where Continue resumes
    # Song Position Pointer counts sixteenths: 10 sixteenths = 2.5 beats
    assert f.feed(t + 0.1, mido.Message("songpos", pos=10)) == "songpos"
    assert f.beat_at(t + 0.2) == pytest.approx(2.5)
    t += 1.0  # a pause longer than the timeout: the line restarts at Continue
    assert f.feed(t, CONTINUE) == "continue"
    assert f.time_at(2.5) == pytest.approx(t, abs=1e-6)
    for _ in range(24):
        f.feed(t, CLOCK)
        t += period
    assert f.beat_at(t - period) == pytest.approx(2.5 + 23 / 24)
    assert f.bpm() == pytest.approx(120.0, abs=0.01)
    # no tick for longer than the timeout: not running, though never stopped
    assert f.running(now=t) and not f.running(now=t + 0.6)
    assert f.feed(t, mido.Message("note_on", note=60)) is None


def test_follower_first_ticks_without_history_use_the_fallback() -> None:
    f = MidiClockFollower(fallback_bpm=90.0)
    assert f.bpm() == pytest.approx(90.0)
    f.feed(10.0, START)
    assert f.time_at(1.0) == pytest.approx(10.0 + 60.0 / 90)
    f.feed(10.0, CLOCK)
    f.feed(10.0 + 60.0 / (140 * 24), CLOCK)
    assert f.bpm() == pytest.approx(140.0, rel=1e-6)
    with pytest.raises(ValueError):
        MidiClockFollower(fallback_bpm=10.0)


# ---------------------------------------------------------------- Ableton Link

_PEER = textwrap.dedent(
    """
    import asyncio, sys, time
    import aalink

    async def main():
        link = aalink.Link(120)
        link.quantum = 4
        link.enabled = True
        deadline = time.monotonic() + 5
        while link.num_peers < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        link.tempo = 133
        await asyncio.sleep(0.2)
        print("ready", flush=True)
        # one (time.monotonic(), beat) pair a line, on request, to compare grids
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
            t0 = time.monotonic(); beat = link.beat; t1 = time.monotonic()
            print(repr((t0 + t1) / 2), repr(beat), repr(link.tempo), flush=True)
        link.enabled = False

    asyncio.run(main())
    """
)


def test_link_follows_a_peer_in_another_process() -> None:
    with LinkClock(bpm=120.0) as clock:
        assert clock.source == "link" and clock.running() and isinstance(clock, Clock)
        # Link's clock on Linux is CLOCK_MONOTONIC_RAW: its offset to time.monotonic()
        offset = clock.link_time_offset()
        if sys.platform.startswith("linux"):
            raw = time.clock_gettime(time.CLOCK_MONOTONIC_RAW) - time.monotonic()
            assert abs(offset - raw) < 0.001
        peer = subprocess.Popen(
            [sys.executable, "-c", _PEER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdout is not None and peer.stdin is not None
            assert peer.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 1.0
            while abs(clock.bpm() - 133.0) > 0.01 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert clock.bpm() == pytest.approx(133.0, abs=0.01)
            assert clock.num_peers() >= 1
            # same beat grid (modulo the quantum) at the same monotonic instant
            for _ in range(3):
                peer.stdin.write("beat\n")
                peer.stdin.flush()
                t_s, beat_s, _tempo = peer.stdout.readline().split()
                t, beat = float(t_s), float(beat_s)
                ours = clock.beat_at(t)
                diff = (ours - beat + 2.0) % 4.0 - 2.0
                assert abs(diff) * 60.0 / 133.0 < 0.002, diff
                # two separate reads of Link's microsecond clock: equal within microseconds
                assert clock.time_at(ours) == pytest.approx(t, abs=5e-5)
            peer.stdin.write("\n")
            peer.stdin.flush()
            assert peer.wait(timeout=5) == 0
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
            if peer.stdout is not None:
                peer.stdout.close()
            if peer.stdin is not None:
                peer.stdin.close()


def test_link_in_a_running_loop_and_set_bpm() -> None:
    async def main() -> None:
        a = LinkClock(bpm=120.0, quantum=4.0)
        b = LinkClock(bpm=120.0)
        try:
            assert a.quantum == 4.0
            # a tempo proposed before the two meet could lose to the other session's
            # when the sessions merge: wait until they see each other
            deadline = time.monotonic() + 3.0
            while min(a.num_peers(), b.num_peers()) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert min(a.num_peers(), b.num_peers()) >= 1
            a.set_bpm(97.0)
            deadline = time.monotonic() + 2.0
            while abs(b.bpm() - 97.0) > 0.01 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert b.bpm() == pytest.approx(97.0, abs=0.01)
            now = time.monotonic()
            assert a.beat_at(now + 60.0 / 97.0) - a.beat_at(now) == pytest.approx(1.0, abs=1e-3)
            with pytest.raises(ValueError):
                a.set_bpm(500.0)
        finally:
            a.close()
            b.close()
        assert not hasattr(a, "_private_loop") or a._private_loop is None

    asyncio.run(main())


# ---------------------------------------------------------------- readers on another thread


class _Torn(Exception):
    """A reader saw a state that is neither the one before a write call nor the one after."""


def _probed(cls: type[Any], view: Callable[[Any], tuple[float, ...]]) -> Any:
    """A subclass of ``cls`` whose every attribute write lets a "reader" look at it.

    The worker thread may be scheduled between any two bytecodes of the loop's
    ``feed``/``set_bpm``; what it can observe only changes at attribute writes, so
    reading at every write is every interleaving a reader thread could hit, found
    deterministically. Each view seen mid-call must equal the view before the call or
    the one after it (what one atomic swap gives); anything else is a torn read.
    """

    class Probe(cls):
        seen: list[tuple[float, ...]]

        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if self.__dict__.get("_probing"):
                self.seen.append(view(self))

        def call(self, method: str, *args: object) -> None:
            before = view(self)
            object.__setattr__(self, "seen", [])
            object.__setattr__(self, "_probing", True)
            try:
                getattr(self, method)(*args)
            finally:
                object.__setattr__(self, "_probing", False)
            after = view(self)
            for mid in self.seen:
                if mid != before and mid != after:
                    raise _Torn(f"{method}: {mid} is neither {before} nor {after}")

    return Probe


def _view(clock: Any, t: float) -> tuple[float, ...]:
    """Everything a reader thread asks a clock, at probe times near ``t``."""
    return (clock.bpm(), clock.beat_at(t), clock.time_at(clock.beat_at(t) + 1.0))


def test_follower_readers_never_see_a_half_written_fit() -> None:
    t_probe = 1000.5
    follower = _probed(MidiClockFollower, lambda c: (*_view(c, t_probe), c.running(t_probe)))
    f = follower(fallback_bpm=120.0)
    times = _tick_times(131.0, 24 * 4)
    f.call("feed", times[0], START)
    for t in times:  # every tick after the first few moves both slope and offset
        f.call("feed", t, CLOCK)
    f.call("feed", times[-1], STOP)
    f.call("feed", times[-1] + 0.01, mido.Message("songpos", pos=8))
    f.call("feed", times[-1] + 1.0, CONTINUE)  # restarts the line: phase and position move
    assert f.bpm() == pytest.approx(131.0, abs=0.2)


def test_internal_clock_readers_never_see_a_half_set_tempo() -> None:
    c = _probed(InternalClock, lambda c: _view(c, 101.25))(bpm=120.0, start=100.0)
    for bpm, at in ((90.0, 100.5), (140.0, 101.0), (60.0, 101.1)):
        c.call("set_bpm", bpm, at)
    assert c.bpm() == 60.0


def test_follower_holds_a_steady_master_stamped_once_per_large_jack_period() -> None:
    """At 512 frames (10.7 ms) JACK stamps every tick with its period's start, up to 10.7 ms
    early: the line averages that, and a steady master is never taken for a tempo change
    (a fixed 4.6 ms bound at 137 BPM restarted the line again and again: 117 BPM)."""
    period = 512 / 48000
    tick = 60.0 / (137 * 24)
    follower = MidiClockFollower(fallback_bpm=100.0)
    t0 = 1000.0
    follower.feed(t0, mido.Message("start"))
    for k in range(24 * 8):
        t = t0 + 0.003 + k * tick
        follower.feed(math.floor(t / period) * period, mido.Message("clock"))
    assert follower.restarts == 0
    assert abs(follower.bpm() - 137.0) < 0.5, follower.bpm()
