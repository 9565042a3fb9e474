"""Turn-taking through JACK: a real ``divergent serve`` process answers a phrase; the
performer (OSC notes, the OSC note transport) starts a new phrase while the answer plays;
a JACK MIDI peer process listens to what comes out. By default the machine yields at the
performer's first note; ``--yield off`` plays the answer out (the behaviour before)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from divergent.server.livepeer import ServeProcess, stuck_notes
from tests.server.test_live import ROOT, _name, _osc_notes, _wait_silent, serve_factory

__all__ = ["serve_factory"]  # the fixture, shared with test_live


def _wait_sounding(sp: ServeProcess, *, after: float, timeout: float = 4.0) -> None:
    """Return just after a note of the answer began (reported over OSC after ``after``)
    and while it still sounds: a fixed sleep could land in a rest, or after the end of
    a short note, and then there is nothing for the performer to interrupt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sounding: dict[tuple[int, int], float] = {}
        for when, _, args in sp.osc.since(0.0, "/divergent/out/note"):
            key = (int(args[0]), int(args[2]))
            if int(args[1]) > 0:
                sounding[key] = when
            else:
                sounding.pop(key, None)
        now = time.monotonic()
        if any(after < began and now - began < 0.03 for began in sounding.values()):
            return
        time.sleep(0.002)
    raise AssertionError(f"no note of the answer began after {after:.3f} s: {sp.log()}")


def _machine_note_on_after(sp: ServeProcess, t: float) -> bool:
    return any(int(args[1]) > 0 for _, _, args in sp.osc.since(t, "/divergent/out/note"))


def _interrupt(
    sp: ServeProcess, name: str, *, plays_on: bool
) -> tuple[float, float, dict[str, Any], list[Any]]:
    """A phrase, then a new one while the answer sounds: (when the performer came back in,
    when that note ended, the listening peer's result, the server's trace).

    ``plays_on``: the answer is expected to go on, so the window lasts past its next
    note-on (up to 4 s of the 8-s answer's rest): a sampled answer may rest for a beat or
    two, and a rest is not a yield (CI once saw no note-on in a 1-s window)."""
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "divergent.server.livepeer",
            "listen",
            "--server",
            name,
            *("--no-send", "--seconds", "10"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(0.5)  # the listener's ports are connected
    t = time.monotonic()
    _osc_notes(sp, [60, 62, 64, 67, 65, 64], gap=0.1)
    first = sp.osc.wait_for("/divergent/out/note", after=t, timeout=5)
    assert first is not None, sp.log()
    _wait_sounding(sp, after=first[0] + 0.3)  # well into the answer, a note sounding
    t_in = time.monotonic()
    sp.osc.send("/divergent/note", 72, 90, 1)  # the performer's next phrase begins (held)
    time.sleep(1.0)
    if plays_on:
        deadline = t_in + 4.0
        while not _machine_note_on_after(sp, t_in + 0.05) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # that note's way to the peer
    t_out = time.monotonic()
    # the window is over: silence the machine (mode off, a panic) so no answer to the new
    # phrase starts while the peer and the trace are read
    sp.osc.send("/divergent/mode", "off")
    sp.osc.send("/divergent/note", 72, 0, 1)
    out, _ = listener.communicate(timeout=30)
    _wait_silent(sp)
    return t_in, t_out, json.loads(out.strip().splitlines()[-1]), sp.trace_events()


def _ons(events: list[tuple[float, int]], lo: float, hi: float) -> int:
    return sum(1 for t, on in events if on and lo < t < hi)


@pytest.mark.parametrize("yield_mode", ["on", "off"])
def test_a_new_phrase_over_the_answer(serve_factory: Any, yield_mode: str) -> None:
    name = _name()
    sp = serve_factory(
        "--mode", "call", "--bpm", "120", "--bars", "4", "--phrase-silence", "0.25",
        "--yield", yield_mode, name=name,
    )  # fmt: skip
    t_in, t_out, peer, trace = _interrupt(sp, name, plays_on=yield_mode == "off")
    sent = [
        (e["actual"], e["type"] == "note_on")
        for e in trace
        if e.get("event") == "sent" and e["type"] in ("note_on", "note_off")
    ]
    heard = [(r[0], (r[1] & 0xF0) == 0x90 and r[3] > 0) for r in peer["received"]]
    assert _ons(sent, 0, t_in) > 0, "the answer was sounding when the performer came back"
    # nothing of it may stay on: every note-on has its note-off, at the server and the peer
    notes = [
        (e["actual"], 0x90 if e["type"] == "note_on" else 0x80, e["note"], 1)
        for e in trace
        if e.get("event") == "sent" and e["type"] in ("note_on", "note_off")
    ]
    assert stuck_notes(notes) == []
    assert peer["stuck"] == [], peer["received"]
    # (the performer's next phrase is still going until t_out: no new answer before it)
    if yield_mode == "on":
        # the turn is handed over at the first note: no note of the answer after it ...
        assert _ons(sent, t_in + 0.05, t_out) == 0, sent
        assert _ons(heard, t_in + 0.05, t_out) == 0, peer["received"]
        # ... and what sounded then ends at once (the server sent its note-offs)
        offs = [t for t, on in sent if not on and t > t_in]
        assert offs and offs[0] < t_in + 0.05, (t_in, sent)
        ends = [t for t, on in sent if t_in < t < t_out]
        assert ends and max(ends) < t_in + 0.05, (t_in, ends)
    else:
        # the answer plays on over the performer, as before
        assert _ons(sent, t_in + 0.05, t_out) > 0, sent
        assert _ons(heard, t_in + 0.05, t_out) > 0, peer["received"]
