"""``divergent bench soak``: a long performance against a real server, measured per window.

A JACK dummy server of its own (named, so no other JACK work on the machine is touched),
a real ``divergent serve`` process recording every take, and a scripted performer in a
separate process (a JACK MIDI client through python-rtmidi, plus OSC controls) that plays
window after window (a minute each by default): phrases in call mode, then a jam, the
divergence knob swept 0 → 1 → 0 across the window, a concept switch at each mode change
when the server has concepts. The performer and this process take turns at each window's
end: it stops playing, reports what it sent and every machine note it received (arrival
on CLOCK_MONOTONIC), and waits while this process asks the server for its counters, so
"events sent" and "events the server received" are counted at the same instant.

Per window: the server's RSS, its event loop's lag p99, the onset error p99 of the
machine's notes at the performer, answers, stuck notes, dropped input events and xruns.
The summary compares the first and last windows (the first and last ``min(10, M/3)``
minutes) against issue 12's targets.

The performer runs as ``python -m divergent.server.bench_soak --server NAME ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from divergent.bridges.exceptions import BridgeError
from divergent.bridges.jack import JackServer
from divergent.server.bench_live import _call_server, onset_errors
from divergent.server.livepeer import ServeProcess, _jack_ports, _open_named
from divergent.server.telemetry import REPLIES, STATUS

__all__ = ["run_bench_soak", "run_performer", "summarize", "window_lengths"]

log = logging.getLogger(__name__)

#: A machine note-on with no note-off after this long is stuck: the sender ends every
#: note within ``--max-note-s`` (8 s by default), so only a lost note-off leaves one open.
HANGING_S = 30.0
#: Seconds between ``/divergent/stats`` samples. Its loop lag p99 covers the last 2,000
#: lag samples, taken every 5 ms (about 10 s): samples this far apart barely overlap.
LAG_SAMPLE_S = 10.0
#: The performer's pause before each window's report: its last events reach the server
#: (one JACK period, then the input queue) before the server is asked how many it got.
SETTLE_S = 0.3
#: The performer's MIDI channel (0-based: channel 2). The machine answers on channel 1, so
#: the server's echo guard (its own note coming back in) never swallows a performer note.
PERFORMER_CHANNEL = 1
#: How often the performer moves the knob while it sweeps it.
KNOB_EVERY_S = 0.5
#: Issue 12's targets for a 60-minute soak.
RSS_GROWTH_MAX_MB = 5.0
RATIO_MAX = 1.2

_MOTIFS = ((60, 62, 64, 67), (64, 65, 67, 72, 71), (57, 60, 64, 62), (67, 65, 64, 60, 62, 59))
_JAM_SCALE = (60, 62, 64, 65, 67, 69, 71, 72, 69, 67, 64, 62)


def window_lengths(seconds: float, window_s: float) -> list[float]:
    """The soak cut into windows of ``window_s`` (the last one shorter when it must)."""
    if seconds <= 0 or window_s <= 0:
        raise ValueError("the soak and its windows must last more than 0 s")
    n = max(1, math.ceil(seconds / window_s - 1e-9))
    return [min(window_s, seconds - i * window_s) for i in range(n)]


# ------------------------------------------------------------------ the performer process


class _Listener:
    """The performer's MIDI input, polled on a thread of its own: every machine note-on
    and note-off with its arrival on CLOCK_MONOTONIC (the clock the server's trace uses)."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self.last = 0.0  # arrival of the latest note event
        self.sounding = 0  # note-ons not yet followed by their note-off
        self._events: list[tuple[float, int, int, int]] = []
        self._open: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="soak-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def take(self) -> list[tuple[float, int, int, int]]:
        """The events received since the last call."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def _poll(self) -> None:
        # polled, not rtmidi's callback: a callback runs Python in JACK's real-time thread,
        # where waiting for the GIL makes xruns for every client (see bridges.midi)
        from divergent.bridges.midi import ArrivalClock

        clock = ArrivalClock()
        while not self._stop.is_set():
            event = self.port.get_message()
            if event is None:
                time.sleep(0.001)
                continue
            msg, delta = event
            t = clock.stamp(delta, time.monotonic())
            if len(msg) >= 3 and msg[0] & 0xF0 in (0x80, 0x90):
                self._note(t, msg[0], msg[1], msg[2])

    def _note(self, t: float, status: int, note: int, vel: int) -> None:
        key = (status & 0x0F, note)
        with self._lock:
            self._events.append((t, status, note, vel))
            if status & 0xF0 == 0x90 and vel > 0:
                self._open[key] = self._open.get(key, 0) + 1
            elif self._open.get(key, 0) > 0:
                self._open[key] -= 1
            self.sounding = sum(self._open.values())
            self.last = t


class _Player:
    """The scripted performer: MIDI notes into the server's input port, controls over OSC."""

    def __init__(self, out: Any, osc_port: int, concepts: Sequence[str], ears: _Listener) -> None:
        self.out = out
        self.ears = ears
        self.server = ("127.0.0.1", osc_port)
        self.osc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # every concept in turn, then back to the base model
        self.concepts: Iterator[str] | None = (
            itertools.cycle([*concepts, "none"]) if concepts else None
        )
        self.rng = random.Random(12)
        self.counts: dict[str, int] = {}
        self._sweep = (0.0, 1.0)  # the window's start and length, for the knob
        self._knob_at = 0.0

    def window(self, index: int, length: float) -> dict[str, Any]:
        """Play one window (call, then jam) and say what was sent and received."""
        self.counts = dict.fromkeys(("sent", "note_ons", "modes", "concepts", "knob"), 0)
        t0 = time.monotonic()
        self._sweep, self._knob_at = (t0, length), t0
        self._phase("call")
        self._call(index, until=t0 + length / 2)
        self._phase("jam")
        self._jam(until=t0 + length)
        t1 = time.monotonic()
        time.sleep(SETTLE_S)
        return {"window": index, "t0": t0, "t1": t1, **self.counts, "received": self.ears.take()}

    def _send(self, address: str, *args: Any) -> None:
        from pythonosc.osc_message_builder import OscMessageBuilder

        b = OscMessageBuilder(address=address)
        for a in args:
            b.add_arg(a)
        self.osc.sendto(b.build().dgram, self.server)

    def _phase(self, mode: str) -> None:
        self._send("/divergent/mode", mode)
        self.counts["modes"] += 1
        if self.concepts is not None:
            self._send("/divergent/concept", next(self.concepts))
            self.counts["concepts"] += 1

    def _note(self, pitch: int, on: bool) -> None:
        status = (0x90 if on else 0x80) | PERFORMER_CHANNEL
        self.out.send_message([status, pitch, 88 + self.rng.randrange(16) if on else 0])
        self.counts["sent"] += 1
        self.counts["note_ons"] += on

    def _wait(self, seconds: float) -> None:
        """Sleep, moving the knob when it is due: a sweep 0 → 1 → 0 across the window."""
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            if now >= self._knob_at:
                t0, length = self._sweep
                pos = min(1.0, (now - t0) / length)
                self._send("/divergent/divergence", round(1.0 - abs(2.0 * pos - 1.0), 3))
                self.counts["knob"] += 1
                self._knob_at = now + KNOB_EVERY_S
            time.sleep(min(0.01, max(0.0, end - now)))

    def _call(self, index: int, *, until: float) -> None:
        """Phrases, each followed by the machine's answer (or 4 s), until ``until``."""
        for n in itertools.count():
            if time.monotonic() > until - 1.5:
                break  # no phrase whose answer would spill into the jam
            shift = (index + n) % 5
            for pitch in _MOTIFS[n % len(_MOTIFS)]:
                self._note(pitch + shift, True)
                self._wait(0.09)
                self._note(pitch + shift, False)
                self._wait(0.03)
            self._await_answer(time.monotonic(), min(until, time.monotonic() + 4.0))
            self._wait(0.1)
        self._wait(max(0.0, until - time.monotonic()))

    def _await_answer(self, t_end: float, deadline: float) -> None:
        """Until the machine answered and fell silent for 0.4 s, or ``deadline``."""
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self.ears.last
            if self.ears.last > t_end and quiet > 0.4 and self.ears.sounding == 0:
                return
            self._wait(0.01)

    def _jam(self, *, until: float) -> None:
        """Notes without a break (0.1 s on, 0.15 s apart): the jam goes on bar by bar."""
        for n in itertools.count():
            if time.monotonic() >= until - 0.25:
                break
            pitch = _JAM_SCALE[n % len(_JAM_SCALE)] + (n // len(_JAM_SCALE)) % 3 * 2
            self._note(pitch, True)
            self._wait(0.1)
            self._note(pitch, False)
            self._wait(0.15)
        self._wait(max(0.0, until - time.monotonic()))


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def run_performer(argv: Sequence[str] | None = None) -> int:
    """The performer process: plays each window, prints its report as one JSON line and
    waits for a line on stdin before the next; after the last, one more line (the server
    was stopped and is silent) makes it print the notes received since and exit."""
    p = argparse.ArgumentParser(prog="python -m divergent.server.bench_soak")
    p.add_argument("--server", required=True, help="the server's JACK client name")
    p.add_argument("--osc-port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--concepts", default="", help="comma-separated names to switch between")
    a = p.parse_args(argv)
    client = f"soak{os.getpid()}"
    out, inp = _jack_ports(client, timing=False)
    ears = _Listener(inp)
    ears.start()
    _open_named(inp, a.server, ":divergent out", "input")
    _open_named(out, a.server, ":divergent in", "output")
    time.sleep(0.2)  # JACK connections settle within a few periods
    player = _Player(out, a.osc_port, [c for c in a.concepts.split(",") if c], ears)
    for i, length in enumerate(window_lengths(a.seconds, a.window_s)):
        _emit(player.window(i, length))
        if not sys.stdin.readline():
            return 1  # the bench went away
    _emit({"tail": True, "received": ears.take()})
    ears.stop()
    inp.close_port()
    out.close_port()
    return 0


# ------------------------------------------------------------------ the bench's side


class _OpenNotes:
    """Machine notes sounding at the performer: note-ons not yet followed by their
    note-off (per channel and pitch, first in first out), with their arrival times."""

    def __init__(self) -> None:
        self._on: dict[tuple[int, int], deque[float]] = {}

    def feed(self, events: Sequence[Sequence[float]]) -> None:
        for t, status, note, vel in events:
            key = (int(status) & 0x0F, int(note))
            if int(status) & 0xF0 == 0x90 and vel > 0:
                self._on.setdefault(key, deque()).append(float(t))
            elif self._on.get(key):
                self._on[key].popleft()

    def older_than(self, t: float) -> int:
        """Notes still open that began before ``t``."""
        return sum(1 for q in self._on.values() for x in q if x < t)

    def count(self) -> int:
        return sum(len(q) for q in self._on.values())


class _TraceTail:
    """The server's trace read as it grows (whole lines only): its ``sent`` events."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def sent(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        events = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                e = json.loads(line)
                if e.get("event") == "sent":
                    events.append(e)
        return events


@dataclass
class _Measured:
    """One window as measured: its JSON row and the raw samples the summary pools."""

    row: dict[str, Any]
    onset_errors_ms: list[float] = field(default_factory=list)
    lag_p99s_ms: list[float] = field(default_factory=list)


def _num(x: float | None) -> float | None:
    """JSON has no NaN: a value that could not be measured is null."""
    return None if x is None or math.isnan(x) else round(float(x), 3)


def _p(xs: Sequence[float], q: int) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return _num(xs[0])
    return _num(statistics.quantiles(xs, n=100, method="inclusive")[q - 1])


#: The performer's stdout lines as they come; None when it closed.
_Lines = queue.Queue[str | None]


class _Soak:
    """The bench's side of a soak: the server, the performer process and what they say."""

    def __init__(self, serve: ServeProcess, jack: JackServer, lengths: list[float]) -> None:
        self.serve = serve
        self.jack = jack
        self.lengths = lengths
        self.open = _OpenNotes()
        self.trace = _TraceTail(serve.trace)
        self.sched: list[dict[str, Any]] = []  # the machine's notes of the last windows
        self.errors: list[str] = []  # the first distinct /divergent/error messages
        self.heard = {"performer_note_ons_sent": 0, "machine_note_ons": 0}
        self._last = self._counters()
        self._t0 = time.monotonic()

    def _ask(self, reply: Any) -> dict[str, Any]:
        """A reply by its declared argument names (the heartbeat's status will do)."""
        got = self.serve.ask(reply.address, reply.address)
        return dict(zip([a.name for a in reply.args], got, strict=True))

    def stats(self) -> dict[str, Any]:
        return self._ask(next(r for r in REPLIES if r.address == "/divergent/stats"))

    def _counters(self) -> dict[str, float]:
        stats = self.stats()
        return {
            "midi_in": stats["midi_in"],
            "dropped": stats["dropped"],
            "answers": self._ask(STATUS)["answers"],
            "xruns": self.jack.xruns(),
            "lag": stats["loop_lag_ms_p99"],
        }

    def run(self, performer: subprocess.Popen[str], lines: _Lines) -> list[_Measured]:
        """Every window: the lag sampled while it plays, then its row; the performer
        waits for a line before the next (after the last: see :meth:`finish`)."""
        assert performer.stdin is not None
        measured: list[_Measured] = []
        for i, length in enumerate(self.lengths):
            t_start = time.monotonic()
            lags = self._sample_lags(lines, t_start, length)
            report = _line(lines, performer, t_start + length + 60)
            measured.append(self._window(report, lags))
            self._log(i, measured[-1].row)
            if i + 1 < len(self.lengths):
                performer.stdin.write("go\n")
                performer.stdin.flush()
        return measured

    def _sample_lags(self, lines: _Lines, t_start: float, length: float) -> list[float]:
        """The loop lag p99 every LAG_SAMPLE_S while the window plays (none in its last
        half sample: the window's own end reading covers it)."""
        lags = []
        t = t_start + LAG_SAMPLE_S
        while t < t_start + length - LAG_SAMPLE_S / 2:
            time.sleep(max(0.0, t - time.monotonic()))
            if not lines.empty():
                break  # the performer is done early (it failed): no more samples
            lags.append(float(self.stats()["loop_lag_ms_p99"]))
            t += LAG_SAMPLE_S
        return lags

    def _window(self, report: dict[str, Any], lags: list[float]) -> _Measured:
        """One window's row, read while the performer waits."""
        now = self._counters()
        last, self._last = self._last, now
        lags.append(float(now["lag"]))
        errs = self._onsets(report)
        row = {
            "window": int(report["window"]),
            "t_s": round(float(report["t0"]) - self._t0, 2),
            "seconds": round(float(report["t1"]) - float(report["t0"]), 2),
            "rss_mb": round(self.serve.rss_mb(), 2),
            # private memory, where a leak would show: VmRSS also counts the JACK port
            # table shared with jackd and the pages of shared libraries the server touched
            "rss_anon_mb": round(self.serve.rss_mb("RssAnon"), 2),
            "loop_lag_p99_ms": _num(statistics.median(lags)),
            "loop_lag_p99_max_ms": _num(max(lags)),
            "onset_error_p50_ms": _p(errs, 50),
            "onset_error_p99_ms": _p(errs, 99),
            "onsets": len(errs),
            "answers": int(now["answers"] - last["answers"]),
            **self._notes(report, now, last),
        }
        # every reply of this window is read: a long run keeps none of them
        self.serve.osc.forget(time.monotonic())
        return _Measured(row, errs, lags)

    def _onsets(self, report: dict[str, Any]) -> list[float]:
        """Onset errors of the window's machine notes at the performer (ms)."""
        time.sleep(0.1)  # the server flushes its trace every 50 ms
        t0 = float(report["t0"])
        # a note scheduled just before the window may arrive in it: keep a few seconds
        self.sched = [e for e in self.sched if e["scheduled"] > t0 - 5.0]
        self.sched.extend(self.trace.sent())
        return onset_errors(self.sched, report["received"])

    def _notes(
        self, report: dict[str, Any], now: dict[str, float], last: dict[str, float]
    ) -> dict[str, int]:
        """Stuck notes, dropped input events and what else was sent, heard and refused."""
        received = report["received"]
        self.open.feed(received)
        ons = _note_ons(received)
        self.heard["performer_note_ons_sent"] += int(report["note_ons"])
        self.heard["machine_note_ons"] += ons
        t0 = float(report["t0"])
        return {
            "stuck_notes": self.open.older_than(time.monotonic() - HANGING_S),
            # the performer sent these; the server counted what reached its input queue
            "dropped_events": int(report["sent"] - (now["midi_in"] - last["midi_in"])),
            "events_sent": int(report["sent"]),
            "input_queue_dropped": int(now["dropped"] - last["dropped"]),
            "machine_notes": ons,
            "xruns": int(now["xruns"] - last["xruns"]),
            "errors": self._errors(t0),
            "modes": int(report["modes"]),
            "concept_switches": int(report["concepts"]),
            "concepts_applied": len(self.serve.osc.since(t0, "/divergent/concept")),
            "knob_moves": int(report["knob"]),
        }

    def _errors(self, since: float) -> int:
        """``/divergent/error`` replies since ``since`` (the first 10 distinct kept)."""
        got = [str(m[2][0]) for m in self.serve.osc.since(since, "/divergent/error") if m[2]]
        for e in got:
            if e not in self.errors and len(self.errors) < 10:
                self.errors.append(e)
        return len(got)

    def _log(self, i: int, row: dict[str, Any]) -> None:
        log.info(
            "soak window %d/%d: rss %.1f MB, loop lag p99 %s ms, onset error p99 %s ms, "
            "%d answers, %d stuck, %d dropped, %d xruns",
            i + 1,
            len(self.lengths),
            row["rss_mb"],
            row["loop_lag_p99_ms"],
            row["onset_error_p99_ms"],
            row["answers"],
            row["stuck_notes"],
            row["dropped_events"],
            row["xruns"],
        )

    def finish(self, performer: subprocess.Popen[str], lines: _Lines) -> int:
        """``/divergent/stop`` after the last window; once the server sounds nothing, the
        performer's last notes: the notes left open then are stuck."""
        assert performer.stdin is not None
        self.serve.osc.send("/divergent/mode", "off")
        self.serve.osc.send("/divergent/stop")
        deadline = time.monotonic() + 10.0
        while self.stats()["sounding"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(SETTLE_S)  # the last note-offs cross JACK to the performer
        performer.stdin.write("end\n")
        performer.stdin.flush()
        tail = _line(lines, performer, time.monotonic() + 30)
        self.open.feed(tail["received"])
        # the answer playing when the last window closed is in the take: count it as heard
        self.heard["machine_note_ons"] += _note_ons(tail["received"])
        return self.open.count()


def _note_ons(received: list[list[float]]) -> int:
    """How many of the performer's received messages are note-ons."""
    return sum(1 for r in received if int(r[1]) & 0xF0 == 0x90 and r[3] > 0)


def _line(lines: _Lines, performer: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    """The performer's next report (it failed or hangs: an error)."""
    try:
        line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
    except queue.Empty:
        line = None
    if line is None:
        performer.kill()
        raise RuntimeError(f"the performer stopped (exit {performer.wait()})")
    report: dict[str, Any] = json.loads(line)
    return report


def summarize(
    measured: Sequence[_Measured], *, minutes: float, window_s: float, stuck: int
) -> dict[str, Any]:
    """The first and last ``min(10, minutes / 3)`` minutes compared (at least one window
    each): RSS growth, loop lag p99 and onset error p99 ratios; totals."""
    k = max(1, round(min(10.0, minutes / 3) * 60 / window_s))
    first, last = measured[:k], measured[-k:]
    rows = [m.row for m in measured]

    def pooled_lag(ms: Sequence[_Measured]) -> float | None:
        return _num(statistics.median([x for m in ms for x in m.lag_p99s_ms]))

    def pooled_onset(ms: Sequence[_Measured]) -> float | None:
        return _p([x for m in ms for x in m.onset_errors_ms], 99)

    lag = (pooled_lag(first), pooled_lag(last))
    onset = (pooled_onset(first), pooled_onset(last))
    rss_growth = round(rows[-1]["rss_mb"] - rows[0]["rss_mb"], 2)
    dropped = sum(r["dropped_events"] for r in rows)
    summary = {
        "windows_compared": k,
        "rss_growth_mb": rss_growth,
        "rss_max_mb": max(r["rss_mb"] for r in rows),
        "rss_anon_growth_mb": round(rows[-1]["rss_anon_mb"] - rows[0]["rss_anon_mb"], 2),
        "loop_lag_p99_ms_first_last": list(lag),
        "loop_lag_p99_ratio_last_vs_first": _ratio(*lag),
        "onset_error_p99_ms_first_last": list(onset),
        "onset_error_p99_ratio_last_vs_first": _ratio(*onset),
        "stuck_notes": stuck,
        "dropped_events": dropped,
        "answers": sum(r["answers"] for r in rows),
        "xruns": sum(r["xruns"] for r in rows),
    }
    summary["within_targets"] = {
        "rss_growth": rss_growth <= RSS_GROWTH_MAX_MB,
        "loop_lag": _within(summary["loop_lag_p99_ratio_last_vs_first"]),
        "onset_error": _within(summary["onset_error_p99_ratio_last_vs_first"]),
        "stuck_notes": stuck == 0,
        "dropped_events": dropped == 0,
    }
    return summary


def _ratio(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or first <= 0:
        return None
    return round(last / first, 3)


def _within(ratio: float | None) -> bool | None:
    return None if ratio is None else ratio <= RATIO_MAX


def _reader(stream: IO[str], lines: _Lines) -> None:
    """The performer's stdout, line by line, then None at its end."""
    for line in stream:
        if line.strip():
            lines.put(line)
    lines.put(None)


def _performer(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[str]:
    """Start the performer process (stdin and stdout piped: the turns at each window)."""
    with log_path.open("w") as err:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "divergent.server.bench_soak", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=Path(__file__).parent.parent,
        )


def _close(performer: subprocess.Popen[str], reader: threading.Thread) -> None:
    """The performer ended (killed if it must be), its output read, its pipes closed."""
    if performer.poll() is None:
        performer.kill()
        performer.wait()
    reader.join(timeout=5)  # the pipe's end reached: the reader is done with it
    for pipe in (performer.stdin, performer.stdout):
        if pipe is not None:
            pipe.close()


def _take(sessions: Path) -> dict[str, int]:
    """What the takes recorded (written when the server stopped)."""
    from divergent.server.takefile import list_takes

    takes = list_takes(sessions)
    return {
        "takes": len(takes),
        "performer_notes": sum(t.performer_notes for t in takes),
        "machine_notes": sum(t.machine_notes for t in takes),
    }


def _soak(
    serve: ServeProcess, jack: JackServer, name: str, minutes: float, window_s: float
) -> dict[str, Any]:
    """The performer against the running server: the rows, the summary, what was heard."""
    concepts = [str(c) for c in serve.ask("/divergent/concepts", "/divergent/concepts")]
    rss_start = serve.rss_mb()
    soak = _Soak(serve, jack, window_lengths(minutes * 60.0, window_s))
    args = ["--server", name, "--osc-port", str(serve.osc_port), "--seconds", str(minutes * 60)]
    args += ["--window-s", str(window_s), "--concepts", ",".join(concepts)]
    performer = _performer(args, jack.env(), serve.workdir / "performer.log")
    lines: _Lines = queue.Queue()
    assert performer.stdout is not None
    reader = threading.Thread(target=_reader, args=(performer.stdout, lines), daemon=True)
    reader.start()
    try:
        measured = soak.run(performer, lines)
        stuck = soak.finish(performer, lines)
        performer.wait(timeout=10)
    except BaseException:
        log.error("performer:\n%s", (serve.workdir / "performer.log").read_text()[-3000:])
        raise
    finally:
        _close(performer, reader)
    return {
        "minutes": minutes,
        "window_s": window_s,
        "per_minute": [m.row for m in measured],
        "summary": summarize(measured, minutes=minutes, window_s=window_s, stuck=stuck),
        "rss_start_mb": round(rss_start, 2),
        "concepts": concepts,
        "errors": soak.errors,
        "heard": soak.heard,
    }


def _own_jack(period: int, name: str, tries: int = 3) -> JackServer:
    """The bench's own named JACK dummy server (48 kHz), started. jackd sometimes refuses
    to start on a busy machine ("Failed to open server", seen once while another
    engineer's test suite started named servers of its own): then another name, after a
    second, ``tries`` times in all; the last failure is raised."""
    for attempt in range(tries):
        # the JACK server's name must not be a client's: a client named as its server
        # takes over the server's socket and every later client fails (jackd 1.9.21)
        jack = JackServer(rate=48000, period=period, name=f"{name}jack{attempt or ''}")
        try:
            return jack.start()
        except BridgeError as e:
            if attempt == tries - 1:
                raise
            log.warning("JACK server %s did not start (%s); trying another", jack.name, e)
            time.sleep(1.0)
    raise AssertionError("unreachable: the loop returns or raises")


def run_bench_soak(
    *,
    minutes: float,
    window_s: float = 60.0,
    jack_period: int = 64,
    concepts: Path | None = None,
    warm_prefills: int | None = None,
) -> dict[str, Any]:
    """Soak ``divergent serve`` for ``minutes`` with a scripted performer; one row per
    ``window_s`` and a summary against issue 12's targets. ``concepts``: the server's
    concepts folder (default: the server's own default); the performer switches between
    the concepts the server lists. ``jack_period``: frames per period of the JACK dummy
    server it starts (48 kHz), a named one of its own. ``warm_prefills``: the server's
    ``--warm-prefills`` (None: its default)."""
    from divergent.model.host import cpu_model

    window_lengths(minutes * 60.0, window_s)  # a soak of no time is refused before it starts
    name = f"divsoak{os.getpid() % 100000}x{random.randrange(10**6)}"
    jack = _own_jack(jack_period, name)
    with contextlib.ExitStack() as stack:
        stack.callback(jack.stop)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        work = Path(tmp)
        extra = ["--record", "--no-web", *(["--concepts", str(concepts)] if concepts else [])]
        if warm_prefills is not None:
            extra += ["--warm-prefills", str(warm_prefills)]
        serve = _call_server(work, name, *extra, env=jack.env())
        try:
            serve.start(timeout=60)
            result = _soak(serve, jack, name, minutes, window_s)
        finally:
            rc = serve.stop()
            xruns = jack.xruns()  # read while jackd runs: its log goes when it stops
        result["take"] = _take(serve.sessions)
    result["cpu"] = cpu_model()
    result["jack"] = {"period": jack_period, "rate": 48000, "xruns": xruns}
    result["cold_start_s"] = round(serve.cold_start_s, 3)
    result["serve_args"] = extra
    result["exit_code"] = rc
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(run_performer())
