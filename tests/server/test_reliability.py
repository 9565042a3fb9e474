"""On stage, things fail (issue 12): a real jackd killed and restarted mid-jam, a sessions
folder on a real full filesystem. A real ``divergent serve`` process, real JACK peers in
other processes, real UDP, a real tmpfs.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.bridges.jack import JackServer
from divergent.server.bench_live import run_peer_process
from divergent.server.livepeer import ServeProcess
from tests.conftest import require_no_alsa, require_tool
from tests.server.test_live import _wait_silent

BACK_WITHIN_S = 2.0


def _name() -> str:
    return f"rl{os.getpid() % 10000}x{random.randrange(10**6)}"


def _serve(tmp_path: Path, *extra: str, name: str | None = None) -> ServeProcess:
    workdir = tmp_path / f"serve{random.randrange(10**6)}"
    workdir.mkdir(parents=True)
    return ServeProcess(list(extra), workdir=workdir, name=name or _name())


def _errors(sp: ServeProcess, after: float) -> list[str]:
    return [m[2][0] for m in sp.osc.since(after, "/divergent/error")]


# the period of the tests' own JACK servers
PERIOD_FRAMES, RATE = 512, 48000
PERIOD_S = PERIOD_FRAMES / RATE


def _sent_early(sp: ServeProcess, *, notes: int, timeout: float) -> list[float]:
    """How early (scheduled - actual, s) the server sent its note-ons, in order, once it
    has sent ``notes`` of them or ``timeout`` passed: its trace, flushed every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        early = [
            e["scheduled"] - e["actual"]
            for e in sp.trace_events()
            if e["event"] == "sent" and e["type"] == "note_on"
        ]
        if len(early) >= notes or time.monotonic() > deadline:
            return early
        time.sleep(0.1)


@pytest.fixture
def own_jack(monkeypatch: pytest.MonkeyPatch) -> Iterator[JackServer]:
    """A JACK server of this test's own, killable; the server and peers started from
    here use it (JACK_DEFAULT_SERVER), the session's server is never touched."""
    require_tool("jackd", "jack_lsp")
    server = JackServer(rate=RATE, period=PERIOD_FRAMES, name=_name())
    monkeypatch.setenv("JACK_DEFAULT_SERVER", str(server.name))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_jackd_killed_and_restarted_mid_jam(own_jack: JackServer, tmp_path: Path) -> None:
    name = _name()
    sp = _serve(tmp_path, "--midi-backend", "jack", "--mode", "jam", "--bpm", "240", name=name)
    sp.start()
    stop = threading.Event()
    player = threading.Thread(target=sp.osc.play_loop, args=(stop,), daemon=True)
    try:
        player.start()
        time.sleep(2.5)  # the jam is on: the machine plays along
        # JACK ran at start: the sender sends half its period early
        early = _sent_early(sp, notes=4, timeout=3.0)
        assert PERIOD_S / 4 < max(early, default=0.0) <= PERIOD_S / 2 + 1e-4, early
        t_kill = time.monotonic()
        own_jack.kill()
        deadline = t_kill + 2.0
        while time.monotonic() < deadline and not any(
            "MIDI lost" in e for e in _errors(sp, t_kill)
        ):
            time.sleep(0.02)
        lost = [e for e in _errors(sp, t_kill) if "MIDI lost" in e]
        assert lost, f"{_errors(sp, t_kill)}\n{sp.log()[-3000:]}"
        health = sp.ask("/divergent/status", "/divergent/health")
        assert health[0] != "ok" and "retrying" in health[0], health
        assert sp.ask("/divergent/ping", "/divergent/pong")  # alive without JACK
        time.sleep(1.0)
        own_jack.start()
        t_up = time.monotonic()
        env = own_jack.env()
        t_ports = None
        while time.monotonic() < t_up + 5.0:
            ports = subprocess.run(["jack_lsp"], capture_output=True, text=True, env=env).stdout
            if f"{name}:divergent in" in ports and ":divergent out" in ports:
                t_ports = time.monotonic()
                break
            time.sleep(0.05)
        assert t_ports is not None, sp.log()[-3000:]
        assert t_ports - t_up <= BACK_WITHIN_S, t_ports - t_up
        back = sp.osc.wait_for("/divergent/health", after=t_up, timeout=3.0)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            health = sp.ask("/divergent/status", "/divergent/health")
            if health[0] == "ok":
                break
        assert back is not None and health[0] == "ok", health
        time.sleep(1.0)  # the jam goes on after the return
        stop.set()
        player.join(timeout=5)
        sp.osc.send("/divergent/mode", "call")
        _wait_silent(sp)
        # a peer connected after the return: its phrases are answered, nothing stuck
        peer = run_peer_process(
            ["phrases", "--server", name, "--phrases", "3", "--answer-wait", "5"], timeout=90
        )
        assert peer["stuck"] == [], peer["stuck"]
        answered = sum(p["count"] > 0 for p in peer["phrases"])
        assert answered >= 2, (peer["phrases"], sp.log()[-3000:])
        assert sp.proc is not None and sp.proc.poll() is None
    finally:
        stop.set()
        assert sp.stop() == 0, sp.log()[-3000:]


# ------------------------------------------------------------------ no JACK at start


def _connections(env: dict[str, str]) -> dict[str, set[str]]:
    """JACK's connections (``jack_lsp -c``): each port and the ports it is connected to."""
    out = subprocess.run(["jack_lsp", "-c"], capture_output=True, text=True, env=env).stdout
    conns: dict[str, set[str]] = {}
    port = ""
    for line in out.splitlines():
        if line.startswith((" ", "\t")):
            conns.setdefault(port, set()).add(line.strip())
        else:
            port = line.strip()
            conns.setdefault(port, set())
    return conns


def _connected(env: dict[str, str], ours: str, theirs: str) -> bool:
    """Whether a port of ours whose name ends in ``ours`` is connected to ``theirs``."""
    return any(p.endswith(ours) and theirs in c for p, c in _connections(env).items())


def _jack_later(monkeypatch: pytest.MonkeyPatch) -> JackServer:
    """A JACK server of this test's own, NOT started: the server and the peers started
    from here use it (JACK_DEFAULT_SERVER) once the test starts it."""
    require_tool("jackd", "jack_lsp", "jack_connect")
    server = JackServer(rate=RATE, period=PERIOD_FRAMES, name=_name())
    monkeypatch.setenv("JACK_DEFAULT_SERVER", str(server.name))
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    return server


def _wait_health_ok(sp: ServeProcess, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    health = sp.ask("/divergent/status", "/divergent/health")
    while health[0] != "ok" and time.monotonic() < deadline:
        time.sleep(0.05)
        health = sp.ask("/divergent/status", "/divergent/health")
    return health


def test_jack_absent_at_start_the_server_waits_and_connects_when_it_appears(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 12: no JACK server when ``divergent serve`` starts. It starts anyway (OSC
    answers), says MIDI is down (error, health, log) and keeps trying; once JACK runs,
    its ports open and the named ``--midi-in/--midi-out`` ports are connected within
    2 s, and a phrase played on the named input is answered on the named output."""
    import rtmidi

    jack = _jack_later(monkeypatch)
    name, peer = _name(), _name()
    sp = _serve(
        tmp_path,
        "--midi-backend",
        "jack",
        "--mode",
        "off",
        "--midi-in",
        f"{peer}:keys",
        "--midi-out",
        f"{peer}in:synth",
        name=name,
    )
    sp.start()
    keys = synth = None
    try:
        assert sp.ask("/divergent/ping", "/divergent/pong")
        down = sp.osc.wait_for("/divergent/error", after=0.0, timeout=2.0)
        assert down is not None and "MIDI down" in down[2][0], down
        health = sp.ask("/divergent/status", "/divergent/health")
        assert "JACK server not running" in health[0] and "retrying" in health[0], health
        assert "MIDI down" in sp.log() and "MIDI       down, waiting" in sp.log(), sp.log()
        time.sleep(0.6)  # a few of the watchdog's tries fail first
        jack.start()
        t_up = time.monotonic()
        env = jack.env()
        # the performer's gear: a keyboard and a synth, JACK clients of their own
        keys = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=peer)
        keys.open_virtual_port("keys")
        synth = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=peer + "in")
        synth.open_virtual_port("synth")
        heard: list[list[int]] = []
        synth.set_callback(lambda ev, _: heard.append(list(ev[0])))
        t_connected = None
        while time.monotonic() < t_up + 5.0:
            if _connected(env, ":divergent in", f"{peer}:keys") and _connected(
                env, ":divergent out", f"{peer}in:synth"
            ):
                t_connected = time.monotonic()
                break
            time.sleep(0.02)
        assert t_connected is not None, f"{_connections(env)}\n{sp.log()[-3000:]}"
        assert t_connected - t_up <= BACK_WITHIN_S, t_connected - t_up
        health = _wait_health_ok(sp, 3.0)
        assert health[0] == "ok", health
        assert "MIDI up (the JACK server appeared)" in sp.log(), sp.log()[-3000:]
        # the music goes through the ports that came late: a phrase in, an answer out
        for pitch in (60, 64, 67, 72):
            keys.send_message([0x90, pitch, 90])
            time.sleep(0.08)
            keys.send_message([0x80, pitch, 0])
            time.sleep(0.04)
        deadline = time.monotonic() + 3.0
        while sp.ask("/divergent/stats", "/divergent/stats")[0] < 8:
            assert time.monotonic() < deadline, sp.log()[-3000:]
            time.sleep(0.05)
        sp.osc.send("/divergent/generate")
        deadline = time.monotonic() + 15.0
        while not any(m[0] & 0xF0 == 0x90 and m[2] > 0 for m in heard):
            assert time.monotonic() < deadline, f"no answer at the synth\n{sp.log()[-3000:]}"
            time.sleep(0.05)
        # the sender's lead followed the JACK server that appeared: half its period early
        # (it was 0, and every note went out at or after its time, when JACK was not
        # there at start). The answer's first notes are placed as soon as they are
        # generated, so they may reach the sender inside the lead; later ones do not.
        early = _sent_early(sp, notes=8, timeout=6.0)
        assert len(early) >= 8, (early, sp.log()[-3000:])
        # never earlier than the lead; late wake-ups on a busy machine take from it
        assert PERIOD_S / 4 < max(early) <= PERIOD_S / 2 + 1e-4, early
        assert sp.proc is not None and sp.proc.poll() is None
    finally:
        code = sp.stop()  # first: no more notes reach the synth while it closes
        if synth is not None:
            synth.cancel_callback()
        for port in (keys, synth):
            if port is not None:
                port.close_port()
                port.delete()
        jack.stop()
        assert code == 0, sp.log()[-3000:]


def test_no_backend_chosen_no_alsa_no_jack_yet_waits_for_jack(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default ``divergent serve`` on a headless Linux box before JACK runs: ALSA
    cannot work (no sound card), so the server waits for a JACK server (JACK is
    installed) instead of running the whole set without MIDI."""
    require_no_alsa()
    jack = _jack_later(monkeypatch)
    name = _name()
    sp = _serve(tmp_path, "--mode", "off", name=name).start()
    try:
        health = sp.ask("/divergent/status", "/divergent/health")
        assert "JACK server not running" in health[0], health
        assert "waiting for a JACK server instead" in sp.log(), sp.log()
        jack.start()
        t_up = time.monotonic()
        t_ports = None
        while time.monotonic() < t_up + 5.0:
            ports = _connections(jack.env())
            if f"{name}:divergent in" in ports and any(p.endswith(":divergent out") for p in ports):
                t_ports = time.monotonic()
                break
            time.sleep(0.02)
        assert t_ports is not None, sp.log()[-3000:]
        assert t_ports - t_up <= BACK_WITHIN_S, t_ports - t_up
        assert _wait_health_ok(sp, 3.0)[0] == "ok"
    finally:
        assert sp.stop() == 0, sp.log()[-3000:]
        jack.stop()


def test_alsa_asked_for_where_it_cannot_work_says_midi_is_down(tmp_path: Path) -> None:
    """``--midi-backend alsa`` on a machine without a sound card (this one): the server
    starts (OSC answers) and says MIDI is down like the JACK case (error, health, log,
    banner), and keeps looking for the sequencer, instead of reporting "ok"."""
    require_no_alsa()
    sp = _serve(tmp_path, "--midi-backend", "alsa", "--mode", "off").start()
    try:
        assert sp.ask("/divergent/ping", "/divergent/pong")
        down = sp.osc.wait_for("/divergent/error", after=0.0, timeout=2.0)
        assert down is not None and down[2][0].startswith("MIDI down: ALSA"), down
        health = sp.ask("/divergent/status", "/divergent/health")
        assert health[0].startswith("MIDI down: ALSA sequencer unavailable"), health
        assert "retrying every 0.25 s" in health[0], health
        assert "MIDI       down, waiting" in sp.log(), sp.log()
        time.sleep(0.6)  # the watchdog's tries: still down, said the same, quietly
        assert sp.ask("/divergent/status", "/divergent/health")[0] == health[0]
        assert sp.log().count("ALSA lib") <= 1, sp.log()  # libasound's line at start only
    finally:
        assert sp.stop() == 0, sp.log()[-3000:]


# ------------------------------------------------------------------ a full disk


@contextlib.contextmanager
def _small_tmpfs(folder: Path, size: str = "64k") -> Iterator[Path]:
    """A real, tiny filesystem (tmpfs) at ``folder``; unmounted afterwards, whatever
    happens. Needs root (these machines and CI run as root)."""
    require_tool("mount", "umount")
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI and these machines run as root)")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; the filler file's path."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 1024)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    return filler


def _play(sp: ServeProcess, pitches: list[int], gap: float = 0.02) -> None:
    for p in pitches:
        sp.osc.send("/divergent/note", p, 80, 1)
        time.sleep(gap)
        sp.osc.send("/divergent/note", p, 0, 1)
        time.sleep(gap)


def _performer_pitches(path: Path) -> list[int]:
    mid = mido.MidiFile(path)
    track = next(tr for tr in mid.tracks if tr.name == "performer")
    return [m.note for m in track if m.type == "note_on" and m.velocity > 0]


def _serve_on(tmp_path: Path, sessions: Path, monkeypatch: pytest.MonkeyPatch) -> ServeProcess:
    monkeypatch.setenv("DIVERGENT_RESCUE", str(tmp_path / "rescued"))
    # MIDI is not this test's business: notes come over OSC
    sp = _serve(tmp_path, "--mode", "off", "--midi-backend", "alsa", "--sessions", str(sessions))
    return sp.start()


def test_full_disk_tells_the_performer_and_loses_no_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _small_tmpfs(tmp_path / "small") as mnt:
        sp = _serve_on(tmp_path, mnt / "sessions", monkeypatch)
        try:
            played = list(range(40, 60))
            _play(sp, played[:5])
            time.sleep(0.3)  # these reach the journal
            filler = _fill(mnt)
            t0 = time.monotonic()
            # tmpfs fills by pages: the journal's last page still takes ~4 KB, so play
            # more than that (200 notes, ~10 KB of journal); the write fails during it
            burst = [36 + i % 48 for i in range(200)]
            _play(sp, burst, gap=0.001)
            t_full = time.monotonic()
            got = None
            while time.monotonic() < t_full + 2.0 and got is None:
                got = next((e for e in _errors(sp, t0) if "journal write failed" in e), None)
                time.sleep(0.01)
            assert got is not None, f"{_errors(sp, t0)}\n{sp.log()[-3000:]}"
            assert time.monotonic() - t_full < 1.0
            status = sp.ask("/divergent/status", "/divergent/status")
            assert status[4] == 2, status  # recording, held in memory
            health = sp.ask("/divergent/status", "/divergent/health")
            assert "journal write failed" in health[1], health
            _play(sp, played[5:15])  # the music goes on while the disk is full
            filler.unlink()  # space returns
            t_free = time.monotonic()
            deadline = t_free + 3.0
            while time.monotonic() < deadline:
                if sp.ask("/divergent/status", "/divergent/health")[1] == "ok":
                    break
                time.sleep(0.05)
            assert sp.ask("/divergent/status", "/divergent/status")[4] == 1
            _play(sp, played[15:])
            assert sp.ask("/divergent/ping", "/divergent/pong")
            sp.osc.send("/divergent/record/stop")
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not list((mnt / "sessions").glob("*.mid")):
                time.sleep(0.05)
            [take] = list((mnt / "sessions").glob("*.mid"))
            assert _performer_pitches(take) == played[:5] + burst + played[5:]
            assert not list((mnt / "sessions").glob("*.journal.jsonl"))
        finally:
            assert sp.stop() == 0, sp.log()[-3000:]


def test_disk_still_full_at_stop_the_take_goes_to_the_rescue_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _small_tmpfs(tmp_path / "small") as mnt:
        sp = _serve_on(tmp_path, mnt / "sessions", monkeypatch)
        try:
            played = list(range(60, 90))
            _play(sp, played[:3])
            time.sleep(0.3)
            _fill(mnt)
            t_full = time.monotonic()
            played += [36 + i % 48 for i in range(200)]  # past the journal's last page
            _play(sp, played[3:], gap=0.001)
            assert sp.osc.wait_for("/divergent/error", after=t_full, timeout=2.0)
            sp.osc.send("/divergent/record/stop")
            rescued = tmp_path / "rescued"
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not list(rescued.glob("*.mid")):
                time.sleep(0.05)
            [take] = list(rescued.glob("*.mid"))
            assert _performer_pitches(take) == played
            assert any("rescue folder" in e for e in _errors(sp, t_full)), _errors(sp, t_full)
            # the partial journal is gone: no duplicate take recovered later
            assert not list((mnt / "sessions").glob("*.journal.jsonl"))
            assert sp.ask("/divergent/ping", "/divergent/pong")
        finally:
            assert sp.stop() == 0, sp.log()[-3000:]


def test_a_sessions_folder_that_cannot_be_written_is_said_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the sessions folder should be")
    sp = _serve_on(tmp_path, blocker / "sessions", monkeypatch)
    try:
        assert "sessions folder not writable" in sp.log(), sp.log()
        status = sp.ask("/divergent/status", "/divergent/status")
        assert status[4] == 2, status  # recording, in memory
        _play(sp, [60, 62, 64])
        sp.osc.send("/divergent/record/stop")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not list((tmp_path / "rescued").glob("*.mid")):
            time.sleep(0.05)
        [take] = list((tmp_path / "rescued").glob("*.mid"))
        assert _performer_pitches(take) == [60, 62, 64]
    finally:
        assert sp.stop() == 0, sp.log()[-3000:]
