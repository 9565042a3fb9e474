"""The app in-process: a fake MIDI port (the injectable factory), the bundled model, real
UDP. Each test here was written for a bug found in review (issue 11) and failed before
its fix."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.bridges.clock import MidiClockFollower
from divergent.bridges.midi import MidiEvent
from divergent.server.app import Server
from divergent.server.config import ServeConfig
from divergent.server.livepeer import OscClient, free_udp_port
from tests.conftest import cuda_provider_here, require


class FakePort:
    """A MIDI port that records what it is sent; ``play`` feeds its input."""

    backend = "fake"
    input_name = "fake in"
    output_name = "fake out"

    def __init__(self, on_event: Callable[[MidiEvent], object]) -> None:
        self.on_event = on_event
        self.sent: list[mido.Message] = []
        self.closed = False

    def send(self, msg: mido.Message) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True

    def play(self, pitches: list[int]) -> None:
        t = time.monotonic()
        for i, p in enumerate(pitches):
            self.on_event(MidiEvent(t + i * 0.1, mido.Message("note_on", note=p, velocity=80)))
            self.on_event(MidiEvent(t + i * 0.1 + 0.05, mido.Message("note_off", note=p)))


class Recording:
    """The real generator, remembering how it was asked (and optionally slow)."""

    def __init__(self, generator: Any, *, hang_s: float = 0.0) -> None:
        self.model = generator.model
        self._g = generator
        self.hang_s = hang_s
        self.calls: list[dict[str, Any]] = []
        self.order: list[str] = []  # "answer" and "warm N", as the worker ran them

    def continue_ids(self, ids: Any, **kw: Any) -> Any:
        self.calls.append(kw)
        self.order.append("answer")
        time.sleep(self.hang_s)  # a generation that does not stop at once
        return self._g.continue_ids(ids, **kw)

    def readout(self, cont: Any) -> Any:
        return self._g.readout(cont)

    def __getattr__(self, name: str) -> Any:
        # the rest (banks a concept's generator shares, the vocabulary, ...) is the real one's
        return getattr(self._g, name)

    def warm_prefill(self, length: int) -> None:
        self.order.append(f"warm {length}")
        self._g.warm_prefill(length)


@pytest.fixture(scope="module")
def generator() -> Any:
    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    return Generator(OnnxModel(None, threads=1))


def serve_in_process(
    tmp_path: Path,
    body: Callable[[Server, FakePort], Awaitable[None]],
    *,
    gen: Any = None,
    shutdown: bool = True,
    factory_delay: float = 0.0,
    **options: Any,
) -> Server:
    """Start a server with a fake port, run ``body``, shut it down."""
    config = ServeConfig.from_dict(
        {
            "osc_port": 0,
            "osc_reply": f"127.0.0.1:{free_udp_port()}",
            "sessions": str(tmp_path / "sessions"),
            "heartbeat_s": 0,
            "mode": "off",
            "warm_prefills": 0,  # the tests that count the generator's calls
            **options,
        }
    )
    ports: list[FakePort] = []

    def factory(
        cfg: ServeConfig, on_event: Callable[[MidiEvent], object], *, on_xrun: Any = None
    ) -> FakePort:
        time.sleep(factory_delay)  # like jack_lsp or opening a device
        ports.append(FakePort(on_event))
        return ports[-1]

    server = Server(
        config,
        print_banner=False,
        midi_factory=factory,
        generator_factory=(lambda cfg: gen) if gen is not None else None,
    )

    async def main() -> None:
        await server.startup()
        try:
            await body(server, ports[0])
        finally:
            if shutdown:
                await server.shutdown()

    asyncio.run(main())
    return server


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_grid_readers_get_a_snapshot_that_never_changes() -> None:
    server = Server(ServeConfig(clock="midi", bpm=100), print_banner=False)
    follower = MidiClockFollower(fallback_bpm=100)
    server.clock = follower
    held = server.grid  # the master is stopped: free time at its tempo
    assert held.bpm() == pytest.approx(100)
    t = time.monotonic()
    for k in range(30):  # ticks at 150 BPM without Start: the tempo follows, still stopped
        follower.feed(t + k * 60 / 150 / 24, mido.Message("clock"))
    assert server.grid.bpm() == pytest.approx(150, abs=0.5)
    assert held.bpm() == pytest.approx(100), "a reader's grid changed under it"


def test_the_model_is_warmed_at_many_prompt_lengths_without_holding_up_an_answer(
    tmp_path: Path, generator: Any
) -> None:
    from divergent.model.generate import warm_lengths

    rec = Recording(generator)

    async def body(server: Server, port: FakePort) -> None:
        port.play([60, 62, 64, 65])  # and the button at once, while the warm-up runs
        await wait_until(lambda: server.perf.performer_notes == 4)
        server._control("/divergent/generate", [])
        await wait_until(lambda: server.warmed_prefills == 12, timeout=60)

    serve_in_process(tmp_path, body, gen=rec, warm_prefills=12)
    warmed = [int(o.split()[1]) for o in rec.order if o != "answer"]
    assert warmed == warm_lengths(12) and len(set(warmed)) == 12
    assert min(warmed) == 16 and max(warmed) == 384
    # the answer ran between two prefills, not after all of them
    assert rec.order.count("answer") == 1 and rec.order.index("answer") < len(rec.order) - 1


def test_top_p_reaches_the_model(tmp_path: Path, generator: Any) -> None:
    rec = Recording(generator)

    async def body(server: Server, port: FakePort) -> None:
        port.play([60, 62, 64, 65])
        await wait_until(lambda: server.perf.performer_notes == 4)
        server._control("/divergent/generate", [])
        await wait_until(lambda: len(rec.calls) == 1)

    serve_in_process(tmp_path, body, gen=rec, top_p=0.5)
    assert rec.calls[0]["top_p"] == 0.5
    assert rec.calls[0]["anchor_seed"] is None  # a call-mode answer: its seed's own anchor


def test_jam_bars_of_a_phrase_share_the_knobs_anchor(tmp_path: Path, generator: Any) -> None:
    rec = Recording(generator)

    async def body(server: Server, port: FakePort) -> None:
        deadline = time.monotonic() + 30
        while len(rec.calls) < 5:  # keep playing: the machine jams only along a player
            assert time.monotonic() < deadline, "no jam bars"
            port.play([60, 64])
            await asyncio.sleep(0.4)

    serve_in_process(tmp_path, body, gen=rec, mode="jam", bpm=240, bars=2, divergence=1.0)
    seeds = [c["anchor_seed"] for c in rec.calls[:5]]
    assert all(isinstance(a, int) for a in seeds)
    # bars of two-bar phrases: runs of at most two, and never an anchor back once left
    runs = [len(list(g)) for _, g in itertools.groupby(seeds)]
    assert max(runs) <= 2 and len(runs) == len(set(seeds)) and len(runs) < len(seeds)


def test_malformed_osc_packets_reach_the_stats(tmp_path: Path) -> None:
    async def body(server: Server, port: FakePort) -> None:
        assert server.osc is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00garbage", ("127.0.0.1", server.osc.port))
        await wait_until(lambda: server.stats.osc_errors >= 1, timeout=3)

    server = serve_in_process(tmp_path, body)
    assert server.stats.osc_errors == 1


def test_an_osc_note_on_the_pitch_the_machine_just_played_takes_the_turn(
    tmp_path: Path, generator: Any
) -> None:
    """The echo guard is for MIDI loops: an OSC note struck just as the machine played
    the same pitch (same velocity, too) was taken for an echo and lost, and the answer
    played on over the performer (CI's turn-taking failures)."""

    async def body(server: Server, port: FakePort) -> None:
        assert server.osc is not None
        port.play([60, 62, 64, 67, 65, 64])  # velocity 80: the machine answers at 80
        await wait_until(lambda: any(m.type == "note_on" for m in port.sent))
        first = next(m for m in port.sent if m.type == "note_on")
        notes_before = server.perf.performer_notes
        client = OscClient(server.osc.port)
        try:
            # (closed only at the end: its close waits for its thread, and the loop must
            # take the note at once, within the echo guard's window)
            client.send("/divergent/note", first.note, first.velocity, 1)
            await wait_until(lambda: server.perf.performer_notes == notes_before + 1, timeout=3)
            assert server.stats.echoes == 0
            yielded_at = len(port.sent)
            await asyncio.sleep(0.6)  # a 4-s answer at 240 BPM: several note-ons, had it gone on
            after = port.sent[yielded_at:]
            assert not [m for m in after if m.type == "note_on" and m.velocity > 0], after
            assert not server.sounding()
        finally:
            client.close()

    serve_in_process(
        tmp_path, body, gen=generator, mode="call", phrase_silence_s=0.25, bpm=240, bars=4
    )


def test_startup_runs_blocking_calls_off_the_loop(tmp_path: Path) -> None:
    """A slow port factory (jack_lsp, a device opening) must not stall the event loop."""
    lags: list[float] = []

    async def watch() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    async def body(server: Server, port: FakePort) -> None:
        pass

    config = ServeConfig.from_dict(
        {"osc_port": 0, "sessions": str(tmp_path), "heartbeat_s": 0, "mode": "off"}
    )

    def slow(
        cfg: ServeConfig, on_event: Callable[[MidiEvent], object], *, on_xrun: Any = None
    ) -> FakePort:
        time.sleep(0.5)
        return FakePort(on_event)

    async def main() -> None:
        watcher = asyncio.get_running_loop().create_task(watch())
        await asyncio.sleep(0.05)  # the watcher is measuring
        server = Server(config, print_banner=False, midi_factory=slow)
        await server.startup()
        await server.shutdown()
        watcher.cancel()

    asyncio.run(main())
    assert max(lags) < 0.3, f"the loop stalled {max(lags):.3f} s"


def test_switch_interval_is_restored_at_shutdown(tmp_path: Path) -> None:
    before = sys.getswitchinterval()
    seen: list[float] = []

    async def body(server: Server, port: FakePort) -> None:
        seen.append(sys.getswitchinterval())

    serve_in_process(tmp_path, body)
    assert seen == [pytest.approx(0.0005)]
    assert sys.getswitchinterval() == before


def _slow_answer(server: Server, port: FakePort, rec: Recording) -> Awaitable[None]:
    port.play([60, 62, 64])

    async def go() -> None:
        await wait_until(lambda: server.perf.performer_notes == 3)
        server._control("/divergent/generate", [])
        await wait_until(lambda: len(rec.calls) == 1)

    return go()


def test_the_drain_timeout_is_the_configs(tmp_path: Path, generator: Any) -> None:
    rec = Recording(generator, hang_s=3.0)
    took: list[float] = []

    async def body(server: Server, port: FakePort) -> None:
        await _slow_answer(server, port, rec)
        t = time.monotonic()
        await server.shutdown()
        took.append(time.monotonic() - t)

    serve_in_process(tmp_path, body, gen=rec, shutdown=False, drain_s=0.2)
    assert took[0] < 0.8, took


def test_a_second_signal_stops_waiting(tmp_path: Path, generator: Any) -> None:
    rec = Recording(generator, hang_s=3.0)
    took: list[float] = []

    async def body(server: Server, port: FakePort) -> None:
        await _slow_answer(server, port, rec)
        server.handle_exit()
        t = time.monotonic()
        down = asyncio.get_running_loop().create_task(server.shutdown())
        await asyncio.sleep(0.1)
        server.handle_exit()  # the impatient performer's second Ctrl-C
        await down
        took.append(time.monotonic() - t)

    serve_in_process(tmp_path, body, gen=rec, shutdown=False, drain_s=10)
    assert took[0] < 1.0, took


def test_log_level_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    import divergent.server.app as app
    from divergent.cli import main

    levels: list[int] = []

    class Recorder:
        def __init__(self, config: ServeConfig, **kw: Any) -> None:
            pass

        async def serve(self) -> None:
            levels.append(logging.getLogger("divergent.server").getEffectiveLevel())

    monkeypatch.setattr(app, "Server", Recorder)
    logger = logging.getLogger("divergent")
    old = logger.level
    try:
        assert main(["serve", "--log-level", "error"]) == 0
    finally:
        logger.setLevel(old)
    assert levels == [logging.ERROR]


def test_the_take_records_before_any_control_surface_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generator: Any
) -> None:
    """A performer's first note may come the moment OSC answers a ping: the take must
    already exist then, or that note is played and never recorded."""
    seen: list[str] = []
    for name in ("_open_osc", "_open_mqtt", "_open_web"):
        original = getattr(Server, name)

        async def opening(self: Server, _name: str = name, _orig: Any = original) -> None:
            seen.append(f"{_name}: take {'ready' if self.take is not None else 'missing'}")
            await _orig(self)

        monkeypatch.setattr(Server, name, opening)

    async def body(server: Server, port: FakePort) -> None:
        assert server.take is not None

    serve_in_process(tmp_path, body, gen=generator, record=True)
    assert seen == [
        "_open_osc: take ready",
        "_open_mqtt: take ready",
        "_open_web: take ready",
    ], seen


def test_a_midi_backend_asked_for_that_cannot_open_is_a_fault(
    tmp_path: Path, generator: Any
) -> None:
    """``--midi-backend coremidi`` on Linux (the real port factory; python-rtmidi has no
    CoreMIDI here, and it cannot be waited for): the server runs on OSC notes, and says
    MIDI is down on /divergent/error and in /divergent/health, not "ok"."""
    from pythonosc.osc_message import OscMessage

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as replies:
        replies.bind(("127.0.0.1", 0))
        replies.settimeout(5.0)
        config = ServeConfig.from_dict(
            {
                "osc_port": 0,
                "osc_reply": f"127.0.0.1:{replies.getsockname()[1]}",
                "sessions": str(tmp_path / "sessions"),
                "heartbeat_s": 0,
                "mode": "off",
                "midi_backend": "coremidi",
            }
        )
        server = Server(config, print_banner=False, generator_factory=lambda cfg: generator)

        async def main() -> tuple[str, str]:
            await server.startup()
            try:
                return server.health_args()
            finally:
                await server.shutdown()

        health = asyncio.run(main())
        said: list[tuple[str, list[Any]]] = []
        with contextlib.suppress(TimeoutError):
            while not any(a == "/divergent/error" for a, _ in said):
                msg = OscMessage(replies.recv(65536))
                said.append((msg.address, list(msg.params)))
    assert server.midi is None and "built without the coremidi" in server.midi_error
    assert health[0].startswith("MIDI down: ") and "OSC only" in health[0], health
    errors = [args[0] for address, args in said if address == "/divergent/error"]
    assert errors and errors[0] == health[0], said


# ------------------------------------------------------------------ --device cuda


def _bindable(udp_port: int, tcp_port: int) -> bool:
    """Whether nothing holds these ports (each bound and released again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", udp_port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        t.bind(("127.0.0.1", tcp_port))
    return True


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_device_cuda_without_the_gpu_build_is_refused_at_start(tmp_path: Path) -> None:
    """Issue 13: `divergent serve --device cuda` where ONNX Runtime has no CUDA provider
    (this CPU-only build): one line naming what to install, exit status 2, before any
    port opens, never a silent fall-back to the CPU."""
    import subprocess

    require(not cuda_provider_here(), "an ONNX Runtime without the CUDA provider, as CI's")
    osc, web = free_udp_port(), _free_tcp_port()
    sessions = tmp_path / "sessions"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "divergent", "serve", "--device", "cuda"),
            *("--osc-port", str(osc), "--web-port", str(web), "--sessions", str(sessions)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent.parent,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line: nothing else was started to say anything
    assert lines[0].startswith("divergent: error: --device cuda"), lines
    assert "CUDAExecutionProvider" in lines[0] and "pip install onnxruntime-gpu" in lines[0]
    assert "divergent is listening" not in r.stdout and r.stdout == "", r.stdout
    assert not sessions.exists()  # not even the sessions folder was touched
    assert _bindable(osc, web)


def test_a_server_on_a_device_it_cannot_use_opens_nothing(tmp_path: Path) -> None:
    """The app's own guard (Server used without the CLI): the device is checked before
    the MIDI port, OSC, MQTT or the page are opened, and before the model loads."""
    from divergent.model.runtime import DeviceError

    require(not cuda_provider_here(), "an ONNX Runtime without the CUDA provider, as CI's")
    osc, web = free_udp_port(), _free_tcp_port()
    config = ServeConfig(
        device="cuda", osc_port=osc, web_port=web, sessions=str(tmp_path / "s"), heartbeat_s=0
    )
    server = Server(config, print_banner=False)
    with pytest.raises(DeviceError, match="pip install onnxruntime-gpu"):
        asyncio.run(server.serve())
    assert server.midi is None and server.osc is None and server.web is None
    assert server.answers is None and server.sender is None  # the model never started
    assert _bindable(osc, web)
