"""The live server end to end: a real ``divergent serve`` process, real JACK MIDI peers in
other processes, liblo's oscsend, real UDP, real files.

Bounds here are looser than the issue's targets (CI machines are shared and noisy);
``divergent bench live --json`` measures the targets themselves.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.server.bench_live import onset_errors, response_times, run_peer_process
from divergent.server.livepeer import ServeProcess, stuck_notes
from tests.conftest import JACK_PERIOD_S, require_tool

ROOT = Path(__file__).resolve().parents[2]


def _name() -> str:
    return f"dv{os.getpid() % 10000}x{random.randrange(10**6)}"


@pytest.fixture
def serve_factory(tmp_path: Path, jack_server: Any):  # type: ignore[no-untyped-def]
    started: list[ServeProcess] = []

    def start(*extra: str, name: str | None = None) -> ServeProcess:
        sp = ServeProcess(
            ["--midi-backend", "jack", *extra],
            workdir=tmp_path / f"s{len(started)}",
            name=name or _name(),
        )
        sp.workdir.mkdir(parents=True, exist_ok=True)
        started.append(sp)
        return sp.start()

    yield start
    for sp in started:
        sp.stop(signal.SIGKILL if sp.proc and sp.proc.poll() is None else signal.SIGTERM)


def _osc_notes(sp: ServeProcess, pitches: list[int], gap: float = 0.08, velocity: int = 90) -> None:
    for p in pitches:
        sp.osc.send("/divergent/note", p, velocity, 1)
        time.sleep(gap)
        sp.osc.send("/divergent/note", p, 0, 1)
        time.sleep(0.02)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _sent(trace: list[dict[str, Any]]) -> list[list[float]]:
    """The server's own note messages from its trace, shaped like a peer's received list
    (time sent, status, note, velocity 1 for a note-on)."""
    return [
        [e["actual"], 0x90 if e["type"] == "note_on" else 0x80, e["note"], 1]
        for e in trace
        if e.get("event") == "sent" and e["type"] in ("note_on", "note_off")
    ]


def _sent_stuck(trace: list[dict[str, Any]]) -> list[int]:
    """Notes the server itself left on: its trace of sent note-ons without a note-off."""
    return stuck_notes([(t, int(st), int(n), int(v)) for t, st, n, v in _sent(trace)])


def _stats(sp: ServeProcess) -> list[Any]:
    """The server's ``/divergent/stats`` reply."""
    t = time.monotonic()
    sp.osc.send("/divergent/stats")
    got = sp.osc.wait_for("/divergent/stats", after=t)
    assert got is not None, sp.log()[-3000:]
    return got[2]


def _wait_silent(sp: ServeProcess, timeout: float = 10.0) -> None:
    """Until the server's sender has no note sounding (``/divergent/stats``), and its trace
    has been flushed: a peer that lost a note-on in JACK stops listening before the
    server sends that note's note-off."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _stats(sp)[5] == 0:  # sounding
            time.sleep(0.2)  # the trace is flushed every 50 ms
            return
        time.sleep(0.1)
    raise AssertionError(f"the server still sounds notes after {timeout} s")


def _call_exchange(serve_factory: Any) -> tuple[int, dict[str, Any], list[Any], str]:
    """Four phrases from a MIDI peer process to a server in call mode: the answers it
    announced, the peer's result, the server's trace and log."""
    name = _name()
    sp = serve_factory(
        "--mode",
        "call",
        "--quantize",
        "off",
        "--bpm",
        "240",
        "--bars",
        "1",
        "--phrase-silence",
        "0.25",
        name=name,
    )
    peer = run_peer_process(["phrases", "--server", name, "--phrases", "4"], timeout=60)
    _wait_silent(sp)
    answers = len(sp.osc.since(0, "/divergent/answer"))
    sp.stop()  # a retry must not share the machine with this one
    # read after the stop: the server closes its trace on exit, so every note-off it sent
    # is there (a busy loop can flush later than _wait_silent waits; seen once in CI)
    return answers, peer, sp.trace_events(), sp.log()[-3000:]


def test_call_mode_answers_each_phrase_through_jack(serve_factory: Any, jack_server: Any) -> None:
    xruns = jack_server.xruns()
    answers, peer, trace, log = _call_exchange(serve_factory)
    xruns = jack_server.xruns() - xruns
    # the server's own account: a note-off for every note-on it sent
    assert _sent_stuck(trace) == [], "the server sent a note-on without its note-off"
    # at the peer, whatever JACK dropped: the server repeats note-offs lost in an xrun
    stuck = [r for r in peer["received"] if r[2] in peer["stuck"]]
    assert peer["stuck"] == [], (stuck, f"{xruns} xruns")
    answered = sum(p["count"] > 0 for p in peer["phrases"])
    assert answered == 4, (peer["phrases"], f"{xruns} xruns", log)
    assert answers == 4, log
    resp = sorted(response_times(trace, peer["received"]))
    errs = onset_errors(trace, peer["received"])
    assert len(resp) >= 4 and len(errs) >= 8, (resp, errs)
    # the bulk on every run; the tails (targets: response p99 <= 20 ms, onset p99 <= 1.8 ms
    # at 64 frames) are `divergent bench live`'s, reported with JACK's xruns
    assert _pct(resp, 0.5) <= 60.0, resp
    assert _pct(errs, 0.5) <= JACK_PERIOD_S * 1000 / 2 + 2.0, errs


def test_divergence_from_oscsend_reaches_readout_and_take(serve_factory: Any) -> None:
    require_tool("oscsend")
    sp = serve_factory("--mode", "off", "--bars", "2", "--bpm", "240")
    subprocess.run(
        ["oscsend", "localhost", str(sp.osc_port), "/divergent/divergence", "f", "0.7"],
        check=True,
    )
    _osc_notes(sp, [60, 64, 67, 72, 71, 67], velocity=50)
    t = time.monotonic()
    sp.osc.send("/divergent/generate")
    ans = sp.osc.wait_for("/divergent/answer", after=t, timeout=10)
    assert ans is not None, sp.log()
    assert ans[2][7] == pytest.approx(0.7, abs=1e-6)
    assert ans[2][5] > 0  # notes
    assert ans[2][1] > 0  # surprisal, bits per note
    # the readout comes when the answer is generated; its notes play from the next beat
    assert sp.osc.wait_for("/divergent/out/note", after=t, timeout=5) is not None, (
        "the answer's notes also travel over OSC"
    )
    outs = sp.osc.since(t, "/divergent/out/note")
    # a soft phrase gets a soft answer (velocity follows the performer by default)
    assert {m[2][1] for m in outs if m[2][1] > 0} == {50}
    sp.osc.send("/divergent/record/stop")
    time.sleep(0.5)
    takes = list(sp.sessions.glob("*.mid"))
    assert len(takes) == 1
    mid = mido.MidiFile(takes[0], charset="utf-8")
    texts = [m.text for tr in mid.tracks for m in tr if m.type in ("text", "marker")]
    assert any(s.startswith("divergence=0.7") for s in texts), texts
    assert any("d=0.70" in s for s in texts), "a marker at the answer"
    ccs = [
        m.value for tr in mid.tracks for m in tr if m.type == "control_change" and m.control == 20
    ]
    assert round(0.7 * 127) in ccs
    names = [tr.name for tr in mid.tracks]
    assert "performer" in names and "machine" in names
    perf = next(tr for tr in mid.tracks if tr.name == "performer")
    assert sum(1 for m in perf if m.type == "note_on" and m.velocity > 0) == 6


def test_ten_thousand_bad_packets_and_every_wrong_message_answered(serve_factory: Any) -> None:
    sp = serve_factory("--mode", "off")
    from pythonosc.osc_message_builder import OscMessageBuilder

    rng = random.Random(1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", sp.osc_port)
    t0 = time.monotonic()
    for i in range(10_000):
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif i % 3 == 1:
            data = b"/divergent/divergence\x00\x00\x00,f\x00\x00" + bytes(
                rng.randrange(256) for _ in range(3)
            )
        else:
            data = b"#bundle\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(30)))
        sock.sendto(data, addr)
        if i % 500 == 0:
            time.sleep(0.01)  # a burst, not a kernel-buffer overflow test
    # well-formed but wrong: unknown address, wrong type, wrong count, out of range
    wrong: list[tuple[str, list[Any]]] = [
        ("/divergent/nope", [1]),
        ("/divergent/divergence", ["high"]),
        ("/divergent/divergence", []),
        ("/divergent/mode", ["dance"]),
        ("/divergent/note", [200, 90]),
        ("/divergent/bars", [2.5]),
        ("/divergent/clock", [3]),
        ("/divergent/divergence", [0.1, 0.2]),
    ] * 25
    sock.close()
    # the flood is behind the server once it answers a ping (it reads in order); only then
    # the wrong messages, one at a time, each waiting for its own answer: a datagram lost
    # in a full kernel buffer on this 2-core VM is the network's doing, not the server's,
    # and must not decide this test
    # (a ping sent while the server's receive buffer is still full is lost: ping again)
    deadline = time.monotonic() + 10
    while True:
        t = time.monotonic()
        sp.osc.send("/divergent/ping")
        if sp.osc.wait_for("/divergent/pong", after=t, timeout=0.5) is not None:
            break
        assert time.monotonic() < deadline, "no pong after the flood"
    time.sleep(0.3)  # the flood's own replies (clamps, NaN rejections) arrive meanwhile
    for address, args in wrong:
        b = OscMessageBuilder(address=address)
        for a in args:
            b.add_arg(a)
        t = time.monotonic()
        sp.osc.out.sendto(b.build().dgram, addr)
        deadline = t + 5
        while not (got := [e[2][0] for e in sp.osc.since(t, "/divergent/error")]):
            assert time.monotonic() < deadline, f"no answer to {address} {args}"
            time.sleep(0.002)
        assert got[0].startswith(f"{address}: ") and got[0].endswith("(rejected)"), got
    assert len(sp.osc.since(t0, "/divergent/error")) > len(wrong)  # the flood's NaNs too
    assert sp.proc is not None and sp.proc.poll() is None


def test_flood_of_input_events_loses_nothing(serve_factory: Any, jack_server: Any) -> None:
    name = _name()
    sp = serve_factory("--mode", "off", name=name)

    def flood() -> tuple[int, int, list[Any]]:
        before = _stats(sp)
        res = run_peer_process(
            ["flood", "--server", name, "--rate", "2000", "--seconds", "3"], timeout=30
        )
        time.sleep(0.3)
        after = _stats(sp)
        return after[0] - before[0], res["sent"], after

    xruns = jack_server.xruns()
    received, sent, after = flood()
    xruns = jack_server.xruns() - xruns
    assert after[1] == 0  # nothing dropped by the server's own queue, ever
    assert sent == 6000 and received <= sent
    # all of them, but what JACK dropped: a missed cycle loses that cycle's events (about
    # 5 at 2,000/s and 2.7 ms, up to ~11 after a stall, when the peer catches up)
    assert sent - received <= 12 * xruns, (received, sent, xruns)
    # the loop lag p99 (target <= 2 ms) is `divergent bench live`'s; here, no stall
    assert after[2] <= 50.0, after


def test_sigterm_mid_answer_leaves_no_stuck_notes_and_a_complete_take(
    serve_factory: Any, jack_server: Any
) -> None:
    xruns = jack_server.xruns()
    name = _name()
    sp = serve_factory("--mode", "off", "--bars", "8", "--bpm", "120", name=name)
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "divergent.server.livepeer",
            "listen",
            "--server",
            name,
            "--no-send",
            "--seconds",
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(0.5)
    _osc_notes(sp, [62, 65, 69, 72, 74, 72, 69, 65], gap=0.1)
    t = time.monotonic()
    sp.osc.send("/divergent/generate")
    assert sp.osc.wait_for("/divergent/out/note", after=t, timeout=5) is not None
    time.sleep(0.6)
    assert sp.stop(signal.SIGTERM) == 0
    out, _ = listener.communicate(timeout=20)
    res = json.loads(out.strip().splitlines()[-1])
    ons = [r for r in res["received"] if (r[1] & 0xF0) == 0x90 and r[3] > 0]
    assert ons, "the answer was playing"
    # whatever JACK dropped: the server repeats note-offs lost in an xrun
    assert res["stuck"] == [], (res["stuck"], f"{jack_server.xruns() - xruns} xruns")
    takes = list(sp.sessions.glob("*.mid"))
    assert len(takes) == 1 and not list(sp.sessions.glob("*.journal*"))
    mid = mido.MidiFile(takes[0])
    machine = next(tr for tr in mid.tracks if tr.name == "machine")
    n_on = sum(1 for m in machine if m.type == "note_on" and m.velocity > 0)
    n_off = sum(
        1 for m in machine if m.type == "note_off" or (m.type == "note_on" and m.velocity == 0)
    )
    # every note the listener heard is in the take, each with its note-off
    assert n_on == n_off == len(ons), (
        f"take: {n_on} on / {n_off} off; heard {len(ons)} on",
        [(r[0] - res["received"][0][0], r[1], r[2], r[3]) for r in res["received"]],
        [m for m in machine if not m.is_meta],
        f"{jack_server.xruns() - xruns} xruns",
    )


def test_sigkill_leaves_a_take_with_everything_older_than_a_second(serve_factory: Any) -> None:
    sp = serve_factory("--mode", "off")
    sent: list[float] = []
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:
        sp.osc.send("/divergent/note", 60 + len(sent) % 12, 80, 1)
        sent.append(time.monotonic())
        time.sleep(0.05)
    assert sp.proc is not None
    os.kill(sp.proc.pid, signal.SIGKILL)
    sp.proc.wait()
    t_kill = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "divergent", "sessions", "--sessions", str(sp.sessions), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    takes = json.loads(r.stdout)
    assert len(takes) == 1 and takes[0]["recovered"]
    older = sum(1 for t in sent if t < t_kill - 1.0)
    assert takes[0]["performer_notes"] >= older
    mido.MidiFile(takes[0]["path"])  # reloads


def test_link_peer_sets_the_tempo(serve_factory: Any) -> None:
    """An aalink peer in another process sets 133 BPM: the server follows within a beat."""
    sp = serve_factory("--clock", "link", "--bpm", "120", "--mode", "off")
    peer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import asyncio, time, aalink\n"
                "async def main():\n"
                "    link = aalink.Link(120)\n"
                "    link.enabled = True\n"
                "    while link.num_peers < 1:\n"
                "        await asyncio.sleep(0.01)\n"
                "    await asyncio.sleep(0.2)\n"
                "    link.tempo = 133.0\n"
                "    print(time.monotonic(), flush=True)\n"
                "    await asyncio.sleep(5.0)\n"
                "asyncio.run(main())\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout is not None
        t_set = float(peer.stdout.readline())
        tempo, followed = 0.0, None
        while time.monotonic() < t_set + 3.0:
            t = time.monotonic()
            sp.osc.send("/divergent/status")
            st = sp.osc.wait_for("/divergent/status", after=t, timeout=1)
            if st is not None:
                tempo = float(st[2][1])
                if abs(tempo - 133.0) < 0.5:
                    followed = st[0] - t_set
                    break
            time.sleep(0.02)
        assert followed is not None, tempo
        assert followed <= 60.0 / 133.0, f"followed after {followed:.3f} s"
    finally:
        peer.kill()
        peer.wait()
        if peer.stdout is not None:
            peer.stdout.close()


def test_without_midi_the_osc_note_transport_still_plays(tmp_path: Path) -> None:
    # ALSA cannot work on a machine without a sound card; elsewhere it opens real ports:
    # either way the OSC note transport must answer
    sp = ServeProcess(
        ["--midi-backend", "alsa", "--mode", "off", "--bpm", "240"], workdir=tmp_path, name=_name()
    )
    sp.start()
    try:
        _osc_notes(sp, [60, 62, 64, 65, 67])
        t = time.monotonic()
        sp.osc.send("/divergent/generate")
        assert sp.osc.wait_for("/divergent/out/note", after=t, timeout=10) is not None
        assert "divergent is listening" in sp.log()
    finally:
        sp.stop()


def test_jam_mode_plays_along(serve_factory: Any) -> None:
    sp = serve_factory("--mode", "jam", "--bpm", "240", "--bars", "1")
    t = time.monotonic()
    for _ in range(2):
        _osc_notes(sp, [60, 64, 67, 64], gap=0.1)
    assert sp.osc.wait_for("/divergent/out/note", after=t, timeout=6) is not None, sp.log()


def test_print_config_round_trips(tmp_path: Path) -> None:
    from divergent.server.config import ServeConfig

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "divergent",
            "serve",
            "--print-config",
            "--bpm",
            "100",
            "--mode",
            "jam",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    path = tmp_path / "divergent.toml"
    path.write_text(r.stdout)
    cfg = ServeConfig.from_toml(path)
    assert cfg.bpm == 100.0 and cfg.mode == "jam"
    bad = subprocess.run(
        [sys.executable, "-m", "divergent", "serve", "--bpm", "1000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "bpm" in bad.stderr


def _clock_exchange(serve_factory: Any) -> tuple[list[Any], dict[str, Any]]:
    """jack_midi_clock at 137 BPM into a server following MIDI clock, two phrases from a
    peer that also listens to the clock: the server's status then, the peer's result."""
    name = _name()
    sp = serve_factory(
        "--clock",
        "midi",
        "--quantize",
        "beat",
        "--mode",
        "call",
        "--bars",
        "2",
        "--phrase-silence",
        "0.3",
        name=name,
    )
    in_port = f"{name}:divergent in"
    clock = subprocess.Popen(
        ["jack_midi_clock", "-b", "137", in_port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        # jack_midi_clock ticks only while JACK's transport rolls (commands on stdin)
        subprocess.run(
            ["jack_transport"],
            input="stop\nlocate 0\nplay\nquit\n",
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        )
        time.sleep(1.0)
        t = time.monotonic()
        sp.osc.send("/divergent/status")
        st = sp.osc.wait_for("/divergent/status", after=t)
        assert st is not None
        peer = run_peer_process(
            [
                "phrases",
                "--server",
                name,
                "--phrases",
                "2",
                "--answer-wait",
                "5",
                "--clock-port",
                "jack_midi_clock:mclk_out",
            ],
            timeout=60,
        )
    finally:
        subprocess.run(
            ["jack_transport"],
            input="stop\nquit\n",
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        )
        clock.terminate()
        clock.wait(timeout=5)
        sp.stop()
    return st[2], peer


def test_midi_clock_master_drives_the_grid(serve_factory: Any, jack_server: Any) -> None:
    """jack_midi_clock at 137 BPM leads: answer onsets land on its ticks (<= 3 ms)."""
    require_tool("jack_midi_clock", "jack_transport", "jack_connect")
    status, peer = _clock_exchange(serve_factory)
    assert status[2] == "midi"
    ticks = peer["ticks"]
    assert len(ticks) > 100
    ons = [r[0] for r in peer["received"] if (r[1] & 0xF0) == 0x90 and r[3] > 0]
    assert ons, peer["phrases"]
    assert abs(float(status[1]) - 137.0) < 3.0, status
    assert len(ons) >= 4, peer["phrases"]
    errs = _grid_errors(ticks, ons)
    assert len(errs) >= max(4, len(ons) // 2), (len(errs), len(ons))
    # on the beat grid within 3 ms (or a period, when that is longer): the bulk, because
    # a stall of the dummy server shifts the master's phase after notes were timed
    limit = max(3.0, _GRID_SLACK_S * 1000)
    assert errs[len(errs) // 2] <= limit, (len(errs), errs[-12:])


# MIDI arrives once per JACK period: a peer's stamps are the period's start
_GRID_SLACK_S = JACK_PERIOD_S + 0.0007


def _grid_errors(ticks: list[float], ons: list[float]) -> list[float]:
    """Sorted ms from each onset to the nearest clock tick, for the onsets where the master
    ticked steadily around them (every gap within a period and a bit of the median)."""
    period = statistics.median(ticks[i + 24] - ticks[i] for i in range(len(ticks) - 24)) / 24
    out = []
    for x in ons:
        i = bisect.bisect_left(ticks, x)
        near = ticks[max(0, i - 4) : i + 4]
        gaps = [b - a for a, b in itertools.pairwise(near)]
        if len(gaps) >= 6 and max(abs(g - period) for g in gaps) <= _GRID_SLACK_S:
            out.append(min(abs(x - t) for t in near) * 1000)
    return sorted(out)


def test_output_routed_back_to_input_does_not_answer_itself(serve_factory: Any) -> None:
    """loopMIDI-style echo: `divergent out` wired into `divergent in` (Windows users hit
    this); the machine's own notes must not count as a phrase to answer."""
    require_tool("jack_connect", "jack_lsp")
    name = _name()
    sp = serve_factory(
        "--mode", "call", "--bpm", "240", "--bars", "1", "--phrase-silence", "0.25", name=name
    )
    ports = subprocess.run(["jack_lsp"], capture_output=True, text=True, check=True).stdout
    out_port = next(
        p for p in ports.splitlines() if p.startswith(name) and p.endswith(":divergent out")
    )
    subprocess.run(["jack_connect", out_port, f"{name}:divergent in"], check=True)
    t = time.monotonic()
    _osc_notes(sp, [60, 62, 64, 65, 67])
    assert sp.osc.wait_for("/divergent/answer", after=t, timeout=5) is not None
    time.sleep(3.0)  # time enough for several self-answers, were echoes taken for phrases
    assert len(sp.osc.since(t, "/divergent/answer")) == 1
    assert "coming back on its input" in sp.log()


def test_a_lost_note_off_does_not_block_call_mode(serve_factory: Any) -> None:
    """A note-on whose note-off never comes (a dropped MIDI event, a stuck key): after a
    few silent seconds it counts as released and the phrase is answered."""
    sp = serve_factory("--mode", "call", "--bpm", "240", "--bars", "1", "--phrase-silence", "0.3")
    t = time.monotonic()
    _osc_notes(sp, [60, 62, 64])
    sp.osc.send("/divergent/note", 67, 90, 1)  # and no note-off
    assert sp.osc.wait_for("/divergent/answer", after=t, timeout=9) is not None, sp.log()
    assert "treating as released" in sp.log()
