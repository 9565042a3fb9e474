"""Outside peers for the live server: a MIDI player/listener process and an OSC client.

``divergent bench live`` and the tests drive a real ``divergent serve`` process with
these, the way a performer's DAW or patch would: through JACK MIDI ports owned by a
separate process, and OSC over UDP to the server's address with replies on a fixed port.
They deliberately use python-rtmidi and python-osc directly, not ``bridges/``, so a bug
in the server's own bridges cannot hide itself in a test.

The MIDI peer runs as ``python -m divergent.server.livepeer MODE ...`` and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["OscClient", "ServeProcess", "free_udp_port", "run_peer", "stuck_notes"]


def free_udp_port() -> int:
    """A UDP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OscClient:
    """Sends OSC to the server and collects every reply arriving on a fixed port."""

    def __init__(self, server_port: int, *, reply_port: int | None = None) -> None:
        self.server = ("127.0.0.1", server_port)
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", reply_port or 0))
        self.sock.settimeout(0.05)
        self.reply_port = int(self.sock.getsockname()[1])
        self.messages: list[tuple[float, str, list[Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, name="osc-peer", daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        from pythonosc.osc_message import OscMessage, ParseError

        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            t = time.monotonic()
            try:
                msg = OscMessage(data)
            except ParseError:
                continue  # the server only sends messages; anything else is not ours
            with self._lock:
                self.messages.append((t, msg.address, list(msg.params)))

    def send(self, address: str, *args: Any) -> None:
        from pythonosc.osc_message_builder import OscMessageBuilder

        b = OscMessageBuilder(address=address)
        for a in args:
            b.add_arg(a)
        # sent from another (ephemeral) port: replies must still come to the fixed one
        self.out.sendto(b.build().dgram, self.server)

    def play_loop(self, stop: threading.Event, pitches: Sequence[int] = (60, 62, 64, 67)) -> None:
        """Play notes over OSC (0.1 s on, 0.15 s apart) until ``stop`` is set: a performer
        who keeps playing, so a jam goes on."""
        i = 0
        while not stop.is_set():
            pitch = pitches[i % len(pitches)]
            self.send("/divergent/note", pitch, 90, 1)
            time.sleep(0.1)
            self.send("/divergent/note", pitch, 0, 1)
            time.sleep(0.15)
            i += 1

    def since(self, t0: float, address: str | None = None) -> list[tuple[float, str, list[Any]]]:
        with self._lock:
            return [m for m in self.messages if m[0] >= t0 and (address is None or m[1] == address)]

    def wait_for(
        self, address: str, *, after: float, timeout: float = 5.0
    ) -> tuple[float, str, list[Any]] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(after, address)
            if got:
                return got[0]
            time.sleep(0.005)
        return None

    def forget(self, before: float) -> None:
        """Drop the replies that arrived before ``before``: a long run (``bench soak``)
        would otherwise keep every heartbeat and machine note it was sent."""
        with self._lock:
            self.messages = [m for m in self.messages if m[0] >= before]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.sock.close()
        self.out.close()


class ServeProcess:
    """``divergent serve`` in its own process, with its OSC and reply ports chosen free."""

    def __init__(
        self,
        extra: Sequence[str],
        *,
        workdir: Path,
        name: str = "divergent",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        # None: this process's environment (a named JACK server: JackServer.env())
        self.env = dict(env) if env is not None else None
        self.osc_port = free_udp_port()
        self.osc = OscClient(self.osc_port)
        self.trace = workdir / "trace.jsonl"
        self.sessions = workdir / "sessions"
        self.log_path = workdir / "serve.log"
        self.args = [
            sys.executable,
            "-m",
            "divergent",
            "serve",
            "--osc-port",
            str(self.osc_port),
            "--osc-reply",
            f"127.0.0.1:{self.osc.reply_port}",
            "--sessions",
            str(self.sessions),
            "--trace",
            str(self.trace),
            "--midi-client",
            name,
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start_s = float("nan")

    def start(self, timeout: float = 20.0) -> ServeProcess:
        self._log = self.log_path.open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
            env=self.env,
        )
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited at start:\n{self.log()}")
            t = time.monotonic()
            self.osc.send("/divergent/ping")
            if self.osc.wait_for("/divergent/pong", after=t, timeout=0.02):
                self.cold_start_s = time.monotonic() - t0
                return self
        raise RuntimeError(f"serve not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ask(self, address: str, reply: str, *args: Any, timeout: float = 5.0) -> list[Any]:
        """Send ``address`` over OSC and return the arguments of the next ``reply``
        (raises RuntimeError, with the server's log, when none comes in ``timeout``)."""
        t = time.monotonic()
        self.osc.send(address, *args)
        got = self.osc.wait_for(reply, after=t, timeout=timeout)
        if got is None:
            raise RuntimeError(f"no {reply} after {address}:\n{self.log()[-3000:]}")
        return got[2]

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory of the server process (``RssShmem``: the part shared with
        jackd, its port table mapped into every JACK client)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def trace_events(self) -> list[dict[str, Any]]:
        if not self.trace.exists():
            return []
        out = []
        for line in self.trace.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        self.osc.close()
        return rc


# --------------------------------------------------------------------- the MIDI peer process


def _jack_ports(client: str, *, timing: bool) -> tuple[Any, Any]:
    import rtmidi

    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=client)
    inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=client + "in")
    inp.ignore_types(sysex=True, timing=not timing, active_sense=True)
    return out, inp


def _open_named(port: Any, client: str, suffix: str, what: str) -> None:
    # JACK names a second client with the same name "<name>-01": match the prefix
    names = port.get_ports()
    match = [i for i, n in enumerate(names) if n.startswith(client) and n.endswith(suffix)]
    name = f"{client}*{suffix}"
    if not match:
        raise SystemExit(f"peer: no {what} port matching {name!r} in {names}")
    port.open_port(match[0], f"peer {what}")


def run_peer(argv: Sequence[str] | None = None) -> int:
    """The MIDI peer: ``phrases`` (play phrases, record the answers) or ``flood``."""
    p = argparse.ArgumentParser(prog="python -m divergent.server.livepeer")
    p.add_argument("mode", choices=("phrases", "flood", "listen", "hostile"))
    p.add_argument("--server", default="divergent", help="the server's JACK client name")
    p.add_argument("--phrases", type=int, default=10)
    p.add_argument("--answer-wait", type=float, default=4.0)
    p.add_argument("--quiet-gap", type=float, default=0.4)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--no-send", action="store_true", help="listen only")
    p.add_argument("--clock-port", default=None, help="also listen to this MIDI clock port")
    a = p.parse_args(argv)
    client = f"peer{os.getpid()}"
    out, inp = _jack_ports(client, timing=a.clock_port is not None)
    received: list[tuple[float, int, int, int]] = []  # (t, status, note, velocity)
    ticks: list[float] = []  # arrival of each MIDI clock tick (0xF8)
    stop = threading.Event()

    def poll() -> None:
        # polled, not rtmidi's callback: a callback runs Python in JACK's real-time thread,
        # where waiting for the GIL makes xruns for every client (see bridges.midi)
        from divergent.bridges.midi import ArrivalClock

        clock = ArrivalClock()  # arrival on CLOCK_MONOTONIC, the clock JACK itself uses
        while not stop.is_set():
            event = inp.get_message()
            if event is None:
                time.sleep(0.0005)
                continue
            msg, delta = event
            t = clock.stamp(delta, time.monotonic())
            if len(msg) >= 3:
                received.append((t, msg[0], msg[1], msg[2]))
            elif msg and msg[0] == 0xF8:
                ticks.append(t)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _open_named(inp, a.server, ":divergent out", "input")
    if not a.no_send:
        _open_named(out, a.server, ":divergent in", "output")
    if a.clock_port:
        subprocess.run(["jack_connect", a.clock_port, f"{client}in:peer input"], check=True)
    time.sleep(0.2)  # JACK connections settle within a few periods
    result: dict[str, Any] = {}
    if a.mode == "phrases":
        phrases = []
        motifs = ([60, 62, 64, 67], [64, 65, 67, 72], [57, 60, 64, 62], [67, 65, 64, 60])
        for i in range(a.phrases):
            start_n = len(received)
            for pitch in motifs[i % len(motifs)]:
                out.send_message([0x90, pitch, 90])
                time.sleep(0.09)
                out.send_message([0x80, pitch, 0])
                time.sleep(0.03)
            t_end = time.monotonic()
            deadline = t_end + a.answer_wait
            while time.monotonic() < deadline:
                time.sleep(0.01)
                got = received[start_n:]
                if got and time.monotonic() - got[-1][0] > a.quiet_gap and _balanced(got):
                    break
            phrases.append({"end": t_end, "first_index": start_n, "count": len(received) - start_n})
        # the last answer may still be sounding: give it the server's longest note
        deadline = time.monotonic() + 9.0
        while not _balanced(received) and time.monotonic() < deadline:
            time.sleep(0.01)
        result["phrases"] = phrases
    elif a.mode == "flood":
        n = int(a.rate * a.seconds)
        period = 1.0 / a.rate
        t0 = time.monotonic() + 0.05
        last = 0.0
        max_behind = 0.0
        for i in range(n):
            # on schedule, but never a burst: a JACK MIDI port holds ~18 events per
            # 64-frame period and drops the rest, so after a stall (this process was not
            # scheduled) the backlog is sent at most every 0.25 ms, like a real device
            target = max(t0 + i * period, last + 0.00025)
            while True:
                d = target - time.monotonic()
                if d <= 0:
                    break
                if d > 0.0015:
                    time.sleep(d - 0.001)
            last = time.monotonic()
            max_behind = max(max_behind, last - (t0 + i * period))
            pitch = 36 + (i // 2) % 48
            out.send_message([0x90 if i % 2 == 0 else 0x80, pitch, 64 if i % 2 == 0 else 0])
        result["sent"] = n
        result["seconds"] = time.monotonic() - t0
        result["max_behind_ms"] = max_behind * 1000
        time.sleep(0.3)
    elif a.mode == "hostile":
        result["sent"] = _send_hostile(out)
        time.sleep(0.3)
    else:
        time.sleep(a.seconds)
    result["received"] = received
    result["ticks"] = ticks
    result["stuck"] = stuck_notes(received)
    stop.set()
    poller.join(timeout=1)
    inp.close_port()
    out.close_port()
    print(json.dumps(result), flush=True)
    return 0


def hostile_midi() -> list[tuple[str, list[list[int]]]]:
    """Hostile MIDI input, by kind: raw byte messages a broken or malicious device sends."""
    sysex = [0xF0, *([0x7D] * (64 * 1024 - 2)), 0xF7]  # 64 KB, non-commercial id
    kinds: list[tuple[str, list[list[int]]]] = [
        ("sysex flood", [sysex] * 4),
        ("orphan note-offs", [[0x80 | ch, p, 0] for ch in range(16) for p in range(0, 128, 8)]),
        (
            "one pitch held on 16 channels",
            [[0x90 | ch, 60, 100] for ch in range(16)] + [[0x80 | ch, 60, 0] for ch in range(16)],
        ),
        ("clock burst at 10x", [[0xF8]] * 480),
        ("song position garbage", [[0xF2, 0x7F, 0x7F], [0xF2, 0x00, 0x00], [0xF2], [0xF2, 5]]),
        # data bytes with no status (running status is not ours to assume), stray EOX,
        # undefined system messages, truncated channel messages
        ("running-status noise", [[0x40, 0x40], [0x3C], [0xF7], [0xF4], [0xF5, 1], [0x90, 60]]),
    ]
    return kinds


def _send_hostile(out: Any) -> dict[str, int]:
    """Send every hostile kind (a short pause between kinds); how many of each went."""
    sent: dict[str, int] = {}
    for kind, messages in hostile_midi():
        n = 0
        for msg in messages:
            try:
                out.send_message(msg)
                n += 1
            except (ValueError, TypeError, RuntimeError) as e:  # rtmidi refused to send it
                print(f"peer: {kind}: not sent: {e}", file=sys.stderr)
            if len(msg) > 1000:
                time.sleep(0.05)  # JACK's MIDI buffer takes one big sysex a period or so
            elif kind.startswith("clock"):
                time.sleep(1 / 480)  # 24 ppqn at 1,200 BPM: ten times 120 BPM's rate
            elif n % 16 == 0:
                time.sleep(0.002)
        sent[kind] = n
        time.sleep(0.1)
    return sent


def _balanced(events: Sequence[tuple[float, int, int, int]]) -> bool:
    return not stuck_notes(events)


def stuck_notes(events: Sequence[tuple[float, int, int, int]]) -> list[int]:
    """Notes left sounding: note-ons without a matching note-off (per channel and pitch)."""
    on: dict[tuple[int, int], int] = {}
    for _, status, note, vel in events:
        kind, ch = status & 0xF0, status & 0x0F
        if kind == 0x90 and vel > 0:
            on[(ch, note)] = on.get((ch, note), 0) + 1
        elif (kind == 0x80 or (kind == 0x90 and vel == 0)) and on.get((ch, note), 0) > 0:
            on[(ch, note)] -= 1
        # CC 123 (all notes off) is not counted: every note-on needs its own note-off
    return [n for (_, n), c in on.items() if c > 0]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(run_peer())
