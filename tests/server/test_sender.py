"""The precise output thread: timing through a real JACK peer, and note balance.

The timing tests send through a mido JACK virtual output to a separate process (a small
python-rtmidi script) that stamps ``time.monotonic()`` when each message arrives; both
processes read the same CLOCK_MONOTONIC, so arrival minus scheduled is the onset error.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.bridges.jack import XrunWatch
from divergent.server.sender import Sender, Sent
from tests.conftest import JACK_PERIOD_S as PERIOD_S
from tests.conftest import require_tool

JACK_BACKEND = "mido.backends.rtmidi/UNIX_JACK"

# The peer: a separate process with its own JACK MIDI input, printing one JSON line per
# message as [arrival time.monotonic(), [bytes]]. The stamp is taken first thing in the
# callback, which rtmidi runs on the peer's JACK process thread.
ROOT = Path(__file__).resolve().parents[2]

PEER_SCRIPT = r"""
import json, sys, threading, time
import rtmidi
from divergent.bridges.midi import ArrivalClock

# polled, not a callback: a Python callback runs in JACK's real-time thread and waits
# for the GIL there; arrival times are rtmidi's own stamps (CLOCK_MONOTONIC deltas)
midi_in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, sys.argv[1])
midi_in.open_virtual_port("in")
stop = threading.Event()

def poll():
    clock = ArrivalClock()
    while not stop.is_set():
        event = midi_in.get_message()
        if event is None:
            time.sleep(0.0005)
            continue
        t = clock.stamp(event[1], time.monotonic())
        sys.stdout.write(json.dumps([t, event[0]]) + "\n")
        sys.stdout.flush()

poller = threading.Thread(target=poll, daemon=True)
poller.start()
print("READY", flush=True)
sys.stdin.read()  # until the test closes our stdin
stop.set()
poller.join(timeout=1)
midi_in.close_port()
"""


class JackPeer:
    """A MIDI input in another process, connected to ``source`` (a JACK port name)."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.port = f"{client}:in"
        self.events: list[tuple[float, list[int]]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, client],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,  # the peer imports bridges.midi
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", f"peer failed to start: {line!r}"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, data = json.loads(line)
            with self._cond:
                self.events.append((float(t), [int(b) for b in data]))
                self._cond.notify_all()

    def wait_for(
        self, pred: Callable[[list[tuple[float, list[int]]]], bool], timeout: float
    ) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.events):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def clear(self) -> None:
        with self._cond:
            self.events.clear()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def jack_link(jack_server: Any) -> Iterator[tuple[Any, JackPeer]]:
    """A mido JACK virtual output connected to a peer process's input, probed end to end."""
    require_tool("jack_connect")
    pid = os.getpid()
    out = mido.Backend(JACK_BACKEND).open_output(
        "out", virtual=True, client_name=f"divergent-sender-test-{pid}"
    )
    peer = JackPeer(f"divergent-sender-peer-{pid}")
    try:
        src = f"divergent-sender-test-{pid}:out"
        subprocess.run(["jack_connect", src, peer.port], check=True, timeout=10)
        # The connection takes effect at a graph change: probe until a message gets through.
        probe = mido.Message("control_change", channel=15, control=3, value=1)
        for _ in range(50):
            out.send(probe)
            if peer.wait_for(lambda ev: len(ev) > 0, 0.1):
                break
        else:
            pytest.fail("no message reached the JACK peer")
        time.sleep(0.05)
        peer.clear()
        yield out, peer
    finally:
        out.close()
        peer.close()


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _measure(
    out: Any, peer: JackPeer, jack_server: Any, *, lead_s: float
) -> tuple[list[float], Sender, int] | None:
    """:func:`_onset_errors` and the xruns jackd logged meanwhile (an xrun: a JACK client
    that missed its cycle, whose MIDI events JACK then dropped or delayed): the first try
    with at most 3 xruns, else the try with the fewest, of three; None if every try lost
    notes. Notes may be lost only where JACK logged xruns: a try that lost some with no
    xrun is a sender fault, unless the sender dropped them itself as too late (the VM
    stalled it past ``late_drop_s``: it must drop, never play late)."""
    best: tuple[list[float], Sender, int] | None = None
    for _ in range(3):
        peer.clear()
        before = jack_server.xruns()
        res = _onset_errors(out, peer, lead_s=lead_s)
        xruns = jack_server.xruns() - before
        if res is None:  # the sender dropped late notes: a stall, measure again
            continue
        errors, sender, lost = res
        assert lost == 0 or xruns > 0, f"{lost} notes lost with no JACK xrun"
        if lost > 10:
            continue
        if best is None or xruns < best[2]:
            best = (errors, sender, xruns)
        if xruns <= 3:
            break
    return best


def _onset_errors(
    out: Any, peer: JackPeer, *, lead_s: float, n: int = 100, gap: float = 0.02
) -> tuple[list[float], Sender, int] | None:
    """Schedule ``n`` notes about ``gap`` apart through a Sender: arrival - scheduled of
    each note that arrived, the sender, how many did not arrive; None if the sender
    dropped notes as late.

    Each onset is shifted by a different fraction of a JACK period: 20 ms is a whole
    number of periods, and without the shift every note would land at the same phase of
    the cycle, measuring one point of the error distribution instead of all of it.
    """
    # SCHED_FIFO (below JACK's client threads at 5) as the server runs it: other processes
    # on a busy CI machine then cannot preempt the sender (refused quietly when not root).
    with Sender(sinks=[out.send], lead_s=lead_s, realtime_priority=3) as sender:
        t0 = time.monotonic() + 0.1
        times = [t0 + i * gap + (i * 0.618034 % 1.0) * PERIOD_S for i in range(n)]
        for i, t in enumerate(times):
            sender.schedule_note(on=t, off=t + gap / 2, pitch=36 + i % 60, velocity=100)
        peer.wait_for(
            lambda ev: sum(1 for _, d in ev if d[0] & 0xF0 == 0x80) >= n, times[-1] - t0 + 2.0
        )
        # the peer may have stopped waiting for a note-off JACK lost: the sender's own
        # account is read once it has sent everything (it holds nothing back for long)
        stats = _drained(sender, timeout=2.0)
    if stats.dropped_late:
        return None
    assert stats.notes_on == stats.notes_off == n, stats  # the sender sent every message
    ons = [(t, d[1]) for t, d in peer.events if d[0] & 0xF0 == 0x90 and d[2] > 0]
    # match arrivals to notes in order by pitch (consecutive pitches differ, so a note
    # JACK lost is passed over, never mistaken for the next one)
    errors: list[float] = []
    i = 0
    for arrival, pitch in ons:
        while i < n and 36 + i % 60 != pitch:
            i += 1
        assert i < n, f"pitch {pitch} arrived out of order"
        errors.append(arrival - times[i])
        i += 1
    return errors, sender, n - len(errors)


def _drained(sender: Sender, *, timeout: float) -> Any:
    """The sender's stats once nothing is pending or sounding (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    stats = sender.stats
    while (stats.pending or stats.sounding) and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = sender.stats
    assert stats.pending == stats.sounding == 0, f"the sender held notes back: {stats}"
    return stats


def _bounds_ms() -> tuple[float, float]:
    """Bounds on |onset error| p50 and p90 in ms: the half period JACK quantises to, plus
    0.55 ms (p50) and 1.33 ms (p90) of jitter (1.2 and 2.0 ms at 64 frames, 1.9 and 2.7 at
    128). A sender held up by CPython's 5 ms switch interval is 3 to 4 ms late at p50."""
    half = PERIOD_S / 2 * 1000
    return half + 0.55, half + 1.33


def test_onset_precision_through_jack(jack_link: tuple[Any, JackPeer], jack_server: Any) -> None:
    # Half a period of lead centres the error on zero (JACK delivers at the next period
    # boundary, so with no lead the error is uniform over a period): at 64 frames measured
    # p99 0.75 to 1.6 ms with it, 1.5 ms or more without.
    lead_s = PERIOD_S / 2
    out, peer = jack_link
    measured = _measure(out, peer, jack_server, lead_s=lead_s)
    if measured is None:
        pytest.fail("no try of 3 without late notes dropped or over 10 of 100 lost in JACK")
    errors, sender, xruns = measured
    ms = sorted(abs(e) * 1000 for e in errors)
    p50, p99 = _percentile(ms, 50), _percentile(ms, 99)
    signed = [e * 1000 for e in errors]
    print(
        f"\nlead {lead_s * 1000:.2f} ms: |arrival - scheduled| p50 {p50:.2f} ms, p99 {p99:.2f} ms,"
        f" signed min {min(signed):.2f} max {max(signed):.2f} ms; {xruns} xruns; {sender.stats}"
    )
    # JACK delivers MIDI once per period, so half a period of error is the floor. The
    # p99 target (1.8 ms) is `divergent bench live`'s to measure: on a shared CI machine a
    # single hiccup of JACK or the VM is the p99 of 100 notes, so this test bounds the
    # bulk (a sender that is systematically late, e.g. with CPython's 5 ms switch
    # interval, is 3-4 ms late at the median).
    _judge(p50)


def _judge(p50: float) -> None:
    """The bulk, on every run: the median onset error. Each xrun disturbs a note or two of
    100, so the median holds on a VM whose JACK misses cycles; the tail (p90, p99) is
    ``divergent bench live``'s to measure, reported with the xruns of the run."""
    p50_max, _ = _bounds_ms()
    assert p50 <= p50_max, f"onset error p50 {p50:.2f} ms"


def test_onset_precision_with_a_busy_python_thread(
    jack_link: tuple[Any, JackPeer], jack_server: Any
) -> None:
    """The server's situation: a sampler thread running pure Python beside the sender.

    It holds the GIL except when forced to hand it over, once per switch interval: with
    CPython's default 5 ms the onset error p99 is 6 to 12 ms, so the server lowers it, as
    this test does.
    """
    out, peer = jack_link
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            x = 0
            for i in range(2000):
                x += i * i

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    worker = threading.Thread(target=sampler, daemon=True)
    worker.start()
    try:
        measured = _measure(out, peer, jack_server, lead_s=PERIOD_S / 2)
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(old)
    if measured is None:
        pytest.fail("no try of 3 without late notes dropped or over 10 of 100 lost in JACK")
    errors, sender, xruns = measured
    ms = sorted(abs(e) * 1000 for e in errors)
    p50, p99 = _percentile(ms, 50), _percentile(ms, 99)
    print(f"\nbusy thread: p50 {p50:.2f} ms, p99 {p99:.2f} ms; {xruns} xruns; {sender.stats}")
    # the bulk, as above (bench live measures the p99)
    _judge(p50)


HOG_SCRIPT = r"""
import sys, threading, time
import jack

# a JACK client that overruns its cycle now and then: JACK reports xruns and drops MIDI
client = jack.Client(sys.argv[1], no_start_server=True)
hogging = threading.Event()
cycles = 0

@client.set_process_callback
def process(frames):
    global cycles
    cycles += 1
    if hogging.is_set() and cycles % 40 == 0:
        time.sleep(0.015)

client.activate()
print("READY", flush=True)
for line in sys.stdin:
    (hogging.set if line.strip() == "on" else hogging.clear)()
client.deactivate()
client.close()
"""


@pytest.fixture
def xrun_watch(jack_server: Any) -> Iterator[XrunWatch]:
    """The product's xrun watch; a test points ``on_xrun`` at its sender."""
    handlers: list[Callable[[], object]] = []
    watch = XrunWatch(
        client_name=f"divergent-xrun-test-{os.getpid()}",
        on_xrun=lambda: [h() for h in handlers],
    )
    watch.handlers = handlers  # type: ignore[attr-defined]
    with watch:
        yield watch


def _balance(events: list[tuple[float, list[int]]]) -> Counter[tuple[int, int]]:
    """Notes left on per (channel, key), as a synth counts them: a note-off for a note that
    is not on (a repeat of one JACK may have dropped) changes nothing."""
    balance: Counter[tuple[int, int]] = Counter()
    for _, d in events:
        key = (d[0] & 0x0F, d[1])
        if d[0] & 0xF0 == 0x90 and d[2] > 0:
            balance[key] += 1
        elif (d[0] & 0xF0 == 0x80 or (d[0] & 0xF0 == 0x90 and d[2] == 0)) and balance[key]:
            balance[key] -= 1
    return +balance


def _panic_once(
    out: Any, peer: JackPeer, watch: XrunWatch
) -> tuple[Counter[tuple[int, int]], set[Any], int]:
    """Overlapping notes, some still pending, then panic: what the peer saw (the notes
    left on per key, the CCs) and how many notes were cancelled."""
    peer.clear()
    sender = Sender(sinks=[out.send])
    watch.handlers[:] = [sender.resend_lost_offs]  # type: ignore[attr-defined]
    sender.start()
    t0 = time.monotonic() + 0.02
    # Overlapping long notes, repeated pitches across two channels, some still pending.
    for i in range(40):
        on = t0 + i * 0.005
        sender.schedule_note(
            on=on, off=on + 0.5, pitch=60 + i % 7, velocity=90, channel=i % 2, tag=i
        )
    time.sleep(0.12)
    assert sender.sounding() > 0
    assert sender.panic(wait=1.0)
    assert sender.sounding() == 0
    # an xrun notification comes a few cycles after the xrun: leave the window open
    time.sleep(0.3)
    sender.close()
    peer.wait_for(lambda ev: sum(1 for _, d in ev if d[0] & 0xF0 == 0xB0 and d[1] == 123) >= 2, 2.0)
    time.sleep(0.05)
    ccs = {(d[0] & 0x0F, d[1], d[2]) for _, d in peer.events if d[0] & 0xF0 == 0xB0}
    return _balance(peer.events), ccs, sender.stats.cancelled


def test_panic_through_jack_leaves_nothing_stuck(
    jack_link: tuple[Any, JackPeer], xrun_watch: XrunWatch
) -> None:
    out, peer = jack_link
    balance, ccs, cancelled = _panic_once(out, peer, xrun_watch)
    assert not balance, f"stuck notes: {balance} ({xrun_watch.xruns} xruns)"
    assert ccs == {(0, 123, 0), (1, 123, 0), (0, 64, 0), (1, 64, 0)}, ccs
    assert cancelled > 0  # some notes were still pending at the panic


def test_note_offs_jack_drops_in_xruns_are_sent_again(
    jack_link: tuple[Any, JackPeer], xrun_watch: XrunWatch
) -> None:
    """The note-off guarantee: a JACK client that overruns its cycle makes JACK drop MIDI
    events; the sender repeats its recent note-offs on each xrun, so nothing sticks."""
    out, peer = jack_link
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG_SCRIPT, f"divergent-hog-{os.getpid()}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None and hog.stdin is not None
        assert hog.stdout.readline().strip() == "READY"
        with Sender(sinks=[out.send]) as sender:
            xrun_watch.handlers[:] = [sender.resend_lost_offs]  # type: ignore[attr-defined]
            hog.stdin.write("on\n")
            hog.stdin.flush()
            t0 = time.monotonic() + 0.05
            n = 300
            for i in range(n):  # 3 s of short notes, 4 channels
                on = t0 + i * 0.01
                sender.schedule_note(
                    on=on, off=on + 0.006, pitch=40 + i % 48, velocity=90, channel=i % 4
                )
            time.sleep(n * 0.01 + 0.1)
            hog.stdin.write("off\n")
            hog.stdin.flush()
            stats = _drained(sender, timeout=2.0)
            time.sleep(0.4)  # the last xrun's notification and its repeats
            stats = sender.stats
    finally:
        if hog.stdin is not None:
            hog.stdin.close()
        hog.wait(timeout=10)
        if hog.stdout is not None:
            hog.stdout.close()
    assert xrun_watch.xruns > 0, "the hog provoked no xrun: nothing was tested"
    assert stats.resent > 0
    # repeats are not counted as note-offs (a note the stalled sender found too late to
    # play is dropped whole, never played late)
    assert stats.notes_on == stats.notes_off == n - stats.dropped_late, stats
    assert not _balance(peer.events), (
        f"stuck at the receiver: {_balance(peer.events)}; {xrun_watch.xruns} xruns, {stats}"
    )


# --- balance and robustness, with a plain list as the sink -------------------------------


class ListSink:
    """A real sink: keeps every message with the time it was handed over."""

    def __init__(self) -> None:
        self.got: list[tuple[float, mido.Message]] = []

    def __call__(self, msg: mido.Message) -> None:
        self.got.append((time.monotonic(), msg))

    def messages(self) -> list[mido.Message]:
        return [m for _, m in self.got]

    def notes(self) -> list[tuple[str, int, int]]:
        return [
            (m.type, m.channel, m.note)
            for m in self.messages()
            if m.type in ("note_on", "note_off")
        ]


# A sender thread starved past the live 20 ms (a loaded CI machine) plays a note late
# instead of dropping it: the tests that pass this are not about dropping, and one of them
# failed in CI when a stall dropped a note it waited for.
_NEVER_DROP = 60.0


def _wait_until(pred: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return pred()


def _assert_balanced(notes: list[tuple[str, int, int]]) -> None:
    on: Counter[tuple[int, int]] = Counter()
    for kind, ch, pitch in notes:
        if kind == "note_on":
            assert on[(ch, pitch)] == 0, f"note-on for sounding {(ch, pitch)}"
            on[(ch, pitch)] += 1
        else:
            assert on[(ch, pitch)] == 1, f"note-off for silent {(ch, pitch)}"
            on[(ch, pitch)] -= 1
    assert sum(on.values()) == 0


def test_overlapping_same_pitch_sends_note_off_first() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], late_drop_s=_NEVER_DROP) as sender:
        t0 = time.monotonic() + 0.02
        sender.schedule_note(on=t0, off=t0 + 0.2, pitch=60, velocity=80, tag="a")
        sender.schedule_note(on=t0 + 0.05, off=t0 + 0.1, pitch=60, velocity=90, tag="b")
        assert _wait_until(lambda: len(sink.got) >= 4)
        time.sleep(0.15)  # past a's own note-off time: it must not be sent again
        assert sender.sounding() == 0
        stats = sender.stats
    assert sink.notes() == [
        ("note_on", 0, 60),
        ("note_off", 0, 60),
        ("note_on", 0, 60),
        ("note_off", 0, 60),
    ]
    assert [m.velocity for m in sink.messages() if m.type == "note_on"] == [80, 90]
    assert stats.retriggered == 1
    assert stats.notes_on == stats.notes_off == 2
    # the re-trigger note-off goes at b's onset, b's own off at its time
    times = [t for t, _ in sink.got]
    assert times[1] - t0 == pytest.approx(0.05, abs=0.01)
    assert times[3] - t0 == pytest.approx(0.1, abs=0.01)


def test_max_note_length_is_enforced() -> None:
    sink = ListSink()
    sent: list[Sent] = []
    with Sender(
        sinks=[sink], on_sent=sent.append, max_note_s=0.05, late_drop_s=_NEVER_DROP
    ) as sender:
        on = time.monotonic() + 0.01
        sender.schedule_note(on=on, off=on + 60.0, pitch=64, velocity=100, channel=2)
        assert _wait_until(lambda: len(sent) >= 2, 1.0)
        assert sender.stats.clipped == 1
    assert [s.message.type for s in sent[:2]] == ["note_on", "note_off"]
    assert sent[1].scheduled - sent[0].scheduled == pytest.approx(0.05)
    assert sent[1].actual - sent[0].actual == pytest.approx(0.05, abs=0.01)


def test_cancel_by_tag_keeps_notes_balanced() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], late_drop_s=_NEVER_DROP) as sender:
        t0 = time.monotonic() + 0.01
        for i in range(10):
            on = t0 + i * 0.03
            sender.schedule_note(on=on, off=on + 0.1, pitch=50 + i, velocity=70, tag="phrase")
            sender.schedule_note(on=on, off=on + 0.02, pitch=80 + i, velocity=70, tag="drums")
        time.sleep(0.1)  # a few phrase notes are sounding now, with pending note-offs
        assert sender.sounding() > 0
        dropped = sender.cancel("phrase")
        assert 0 < dropped < 10
        assert sender.cancel("nothing-with-this-tag") == 0
        assert _wait_until(lambda: sender.sounding() == 0 and sender.stats.pending == 0)
        stats = sender.stats
    notes = sink.notes()
    _assert_balanced(notes)
    played_phrase = sum(1 for k, _, p in notes if k == "note_on" and p < 80)
    assert played_phrase == 10 - dropped
    assert sum(1 for k, _, p in notes if k == "note_on" and p >= 80) == 10  # untouched
    assert stats.cancelled == dropped


def test_cancel_all_pending() -> None:
    sink = ListSink()
    with Sender(sinks=[sink]) as sender:
        t0 = time.monotonic() + 0.5
        for i in range(5):
            sender.schedule_note(on=t0 + i, off=t0 + i + 0.1, pitch=40 + i, velocity=1, tag=i)
        assert sender.cancel() == 5
        assert sender.stats.pending == 0
    assert sink.notes() == []


def test_panic_sends_note_offs_then_all_notes_off_on_used_channels() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], late_drop_s=_NEVER_DROP) as sender:
        t0 = time.monotonic() + 0.01
        sender.schedule_note(on=t0, off=t0 + 5, pitch=60, velocity=100, channel=0)
        sender.schedule_note(on=t0, off=t0 + 5, pitch=67, velocity=100, channel=9)
        sender.schedule_note(on=t0 + 1, off=t0 + 2, pitch=72, velocity=100, channel=3)
        assert _wait_until(lambda: sender.sounding() == 2)
        assert sender.panic(wait=1.0)
        assert sender.sounding() == 0
        stats = sender.stats
    msgs = sink.messages()
    notes = sink.notes()
    _assert_balanced(notes)
    assert sorted(notes) == sorted(
        [("note_on", 0, 60), ("note_on", 9, 67), ("note_off", 0, 60), ("note_off", 9, 67)]
    )
    ccs = [(m.channel, m.control, m.value) for m in msgs if m.type == "control_change"]
    # all notes off and sustain off on every channel used (3 had a note scheduled), after
    # the note-offs; close() sends them once more
    assert set(ccs) == {(ch, cc, 0) for ch in (0, 3, 9) for cc in (123, 64)}
    last_off = max(i for i, m in enumerate(msgs) if m.type == "note_off")
    first_cc = min(i for i, m in enumerate(msgs) if m.type == "control_change")
    assert last_off < first_cc
    assert stats.cancelled == 1
    assert not any(m.type == "note_on" and m.note == 72 for m in msgs)


def test_panic_all_channels() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], panic_all_channels=True) as sender:
        assert sender.panic(wait=1.0)
    ccs = {(m.channel, m.control) for m in sink.messages()}
    assert ccs == {(ch, cc) for ch in range(16) for cc in (123, 64)}


def test_late_notes_are_dropped_not_played() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], late_drop_s=0.02) as sender:
        now = time.monotonic()
        sender.schedule_note(on=now - 0.1, off=now + 0.05, pitch=61, velocity=100)
        sender.schedule_note(on=now - 0.005, off=now + 0.05, pitch=62, velocity=100)
        assert _wait_until(lambda: sender.stats.pending == 0 and sender.sounding() == 0)
        stats = sender.stats
    assert sink.notes() == [("note_on", 0, 62), ("note_off", 0, 62)]
    assert stats.dropped_late == 1
    assert stats.late >= 1


def test_the_lead_follows_a_new_period_while_running() -> None:
    """The lead is set again when the MIDI system (re)appears with its period (JACK that
    was not running at start): a note already waited for goes out that much earlier,
    and so does its note-off."""
    sink = ListSink()
    sent: list[Sent] = []
    # late_drop_s: a thread starved on a busy machine plays late here, it drops nothing
    with Sender(sinks=[sink], on_sent=sent.append, late_drop_s=1.0) as sender:
        assert sender.lead_s == 0.0
        t = time.monotonic() + 0.4
        sender.schedule_note(on=t, off=t + 0.2, pitch=60, velocity=90)
        time.sleep(0.05)  # the thread waits for t with no lead
        sender.lead_s = 0.1  # the ports opened on a period of 200 ms
        assert _wait_until(lambda: len(sent) >= 2, 2.0), (sent, sender.stats)
        with pytest.raises(ValueError):
            sender.lead_s = -0.001
        assert sender.lead_s == 0.1
    on, off = (s for s in sent if s.message.type in ("note_on", "note_off"))
    assert on.scheduled == t and off.scheduled == pytest.approx(t + 0.2)
    for s in (on, off):
        # never before its time minus the lead (at its time without one), and a wake-up
        # late by up to 30 ms still counts as early
        assert -0.1 - 1e-4 <= s.actual - s.scheduled < -0.07, (s, sender.stats)


def test_notes_scheduled_before_start_wait_for_it() -> None:
    sink = ListSink()
    sender = Sender(sinks=[sink], late_drop_s=_NEVER_DROP)
    t = time.monotonic() + 0.05
    sender.schedule_note(on=t, off=t + 0.01, pitch=70, velocity=10)
    sender.start()
    assert _wait_until(lambda: len(sink.got) == 2)
    sender.close()
    assert sink.notes() == [("note_on", 0, 70), ("note_off", 0, 70)]
    assert sink.got[0][0] >= t


def test_raising_sink_does_not_kill_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    sink = ListSink()
    calls = 0

    def broken(msg: mido.Message) -> None:
        nonlocal calls
        calls += 1
        raise OSError("port went away")

    caplog.set_level(logging.ERROR, logger="divergent.server.sender")
    with Sender(sinks=[broken, sink], late_drop_s=_NEVER_DROP) as sender:
        t0 = time.monotonic() + 0.01
        for i in range(5):
            on = t0 + i * 0.01
            sender.schedule_note(on=on, off=on + 0.005, pitch=60 + i, velocity=64)
        assert _wait_until(lambda: len(sink.got) == 10)
        # still alive: a later note goes out too
        t1 = time.monotonic() + 0.01
        sender.schedule_note(on=t1, off=t1 + 0.005, pitch=72, velocity=64)
        assert _wait_until(lambda: sender.stats.sink_errors == 12)
        assert len(sink.got) == calls == 12
    _assert_balanced(sink.notes())
    assert calls == 14  # and close() tried its CC 123 / CC 64 on the broken sink too
    # rate-limited: one report, not twelve
    assert len([r for r in caplog.records if "port went away" in r.getMessage()]) == 1


def test_on_sent_reports_every_message_and_may_raise() -> None:
    sent: list[Sent] = []

    def on_sent(s: Sent) -> None:
        sent.append(s)
        raise RuntimeError("callback bug")

    sink = ListSink()
    with Sender(sinks=[sink], on_sent=on_sent, late_drop_s=_NEVER_DROP) as sender:
        t = time.monotonic() + 0.01
        sender.schedule_note(on=t, off=t + 0.01, pitch=55, velocity=33, tag=("phrase", 7))
        sender.send_now(mido.Message("control_change", channel=1, control=1, value=5))
        # counters are updated after the callbacks of a batch
        assert _wait_until(lambda: sender.stats.callback_errors == 3)
        assert len(sent) == 3
    assert [s.message.type for s in sent[:3]] == ["control_change", "note_on", "note_off"]
    assert [s.tag for s in sent[:3]] == [None, ("phrase", 7), ("phrase", 7)]
    assert all(s.actual >= s.scheduled - 0.0005 for s in sent[1:3])


@pytest.mark.parametrize("how", ["panic", "close", "passed_through_off"])
def test_a_note_off_is_never_reported_before_its_lead_early_note_on(how: str) -> None:
    """A note-on leaves up to a lead early; a release right after it still reports its
    note-off at or after the on's time, or the take holds an off before its on (and a
    note hanging to the end: CI saw 4 on / 5 off in a take)."""
    sent: list[Sent] = []
    # late_drop_s: a note due a lead minus 50 ms ahead is not "late" for this test
    sender = Sender(sinks=[ListSink()], on_sent=sent.append, lead_s=0.3, late_drop_s=1.0)
    sender.start()
    try:
        on = time.monotonic() + 0.25  # inside the lead: sent now, a quarter second early
        sender.schedule_note(on=on, off=on + 1.0, pitch=64, velocity=90)
        assert _wait_until(lambda: sender.sounding() == 1)
        if how == "panic":
            assert sender.panic(wait=1.0)
        elif how == "close":
            sender.close(panic=True)
        else:
            sender.send_now(mido.Message("note_off", channel=0, note=64))
            assert _wait_until(lambda: sender.sounding() == 0)
    finally:
        sender.close()
    notes = [s for s in sent if s.message.type in ("note_on", "note_off")]
    assert [s.message.type for s in notes] == ["note_on", "note_off"]
    assert notes[0].scheduled == on
    assert notes[1].scheduled >= notes[0].scheduled
    assert notes[1].actual < on  # it did leave early: the case this test is about


def test_passed_through_notes_are_tracked_and_released_on_close() -> None:
    sink = ListSink()
    sender = Sender(sinks=[sink])
    sender.start()
    sender.send_now(mido.Message("note_on", channel=4, note=48, velocity=100))
    sender.send_now(mido.Message("note_on", channel=4, note=50, velocity=100))
    sender.send_now(mido.Message("note_off", channel=4, note=50))
    assert _wait_until(lambda: len(sink.got) == 3)
    assert sender.sounding() == 1
    sender.close(panic=False)  # still sends note-offs, just no CC 123/64
    sender.schedule_note(on=time.monotonic(), off=time.monotonic() + 1, pitch=1, velocity=1)
    sender.send_now(mido.Message("note_on", channel=4, note=52, velocity=100))
    assert sink.notes() == [
        ("note_on", 4, 48),
        ("note_on", 4, 50),
        ("note_off", 4, 50),
        ("note_off", 4, 48),
    ]
    assert all(m.type != "control_change" for m in sink.messages())
    assert sender.stats.refused == 2
    assert sender.sounding() == 0


def test_close_without_start_and_twice() -> None:
    sink = ListSink()
    sender = Sender(sinks=[sink])
    sender.schedule_note(on=time.monotonic() + 1, off=time.monotonic() + 2, pitch=5, velocity=5)
    sender.close()
    sender.close()
    # nothing was ever on, so only the all-notes-off/sustain-off pair on channel 0
    assert [(m.control, m.channel) for m in sink.messages()] == [(123, 0), (64, 0)]
    with pytest.raises(RuntimeError):
        sender.start()


def test_invalid_notes_are_rejected() -> None:
    sender = Sender(sinks=[])
    t = time.monotonic()
    with pytest.raises(ValueError):
        sender.schedule_note(on=t, off=t + 1, pitch=128, velocity=1)
    with pytest.raises(ValueError):
        sender.schedule_note(on=t, off=t + 1, pitch=1, velocity=0)
    with pytest.raises(ValueError):
        sender.schedule_note(on=t, off=t + 1, pitch=1, velocity=1, channel=16)
    with pytest.raises(ValueError):
        sender.schedule_note(on=float("nan"), off=t + 1, pitch=1, velocity=1)
    sender.close()


def test_resend_lost_offs_repeats_recent_note_offs_once() -> None:
    sink = ListSink()
    sent: list[Sent] = []
    with Sender(sinks=[sink], on_sent=sent.append, late_drop_s=_NEVER_DROP) as sender:
        t = time.monotonic() + 0.01
        sender.schedule_note(on=t, off=t + 0.02, pitch=60, velocity=90, channel=0)
        sender.schedule_note(on=t, off=t + 0.02, pitch=64, velocity=90, channel=1)
        assert _wait_until(lambda: sender.stats.notes_off == 2)
        assert sender.resend_lost_offs() == 2
        assert _wait_until(lambda: sender.stats.resent == 2)
        time.sleep(0.05)
        stats = sender.stats
    offs = [n for n in sink.notes() if n[0] == "note_off"]
    assert sorted(offs) == sorted([("note_off", 0, 60), ("note_off", 1, 64)] * 2)
    # counted once, reported once (the take and the trace hold each note-off once)
    assert stats.notes_off == 2 and stats.resent == 2
    assert sum(1 for s in sent if s.message.type == "note_off") == 2


def test_resend_leaves_out_a_pitch_that_sounds_again_and_old_offs() -> None:
    sink = ListSink()
    with Sender(sinks=[sink], late_drop_s=_NEVER_DROP) as sender:
        t = time.monotonic() + 0.01
        sender.schedule_note(on=t, off=t + 0.01, pitch=60, velocity=90)
        sender.schedule_note(on=t, off=t + 0.01, pitch=62, velocity=90)
        assert _wait_until(lambda: sender.stats.notes_off == 2)
        # 60 sounds again: repeating its old note-off would cut the new note
        sender.schedule_note(on=time.monotonic(), off=time.monotonic() + 1.0, pitch=60, velocity=90)
        assert _wait_until(lambda: sender.sounding() == 1)
        sender.resend_lost_offs()
        assert _wait_until(lambda: sender.stats.resent == 1)
        assert sender.sounding() == 1
        time.sleep(0.05)
        assert sender.resend_lost_offs(window_s=0.01) == 0  # older than the window
        sender.panic(wait=1.0)
    offs = [n for n in sink.notes() if n[0] == "note_off"]
    assert offs.count(("note_off", 0, 62)) == 2  # the repeat
    assert offs.count(("note_off", 0, 60)) == 2  # its own off, then the panic's: no repeat
