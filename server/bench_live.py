"""``divergent bench live``: the live path measured with real peers in other processes.

- response: phrase end detected by the server → first machine note-on received by a
  separate peer process through JACK (``--quantize off``);
- onset error: when each machine note-on reached the peer vs when the server scheduled
  it, both on CLOCK_MONOTONIC (the clock JACK's own timestamps use on Linux);
- flood: 2,000 MIDI input events/s for 10 s from the peer; the server's count of events
  received and its event-loop lag p99 (asked over OSC);
- cold start: process spawn → first ``/divergent/pong``; RSS of the server process;
- ``--web-clients N``: the phrases played twice on one server, without and then with N
  pages on the browser view: onset error and loop lag p99 side by side.

Starts its own JACK dummy server (64 frames at 48 kHz) when none runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from divergent.bridges.jack import JackServer
from divergent.server.livepeer import ServeProcess

__all__ = [
    "mqtt_outage",
    "onset_errors",
    "response_times",
    "run_bench_live",
    "run_bench_web",
    "run_peer_process",
]


def _pct(xs: list[float], q: int) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def run_peer_process(args: list[str], *, timeout: float) -> dict[str, Any]:
    """Run the MIDI peer (``python -m divergent.server.livepeer``) and parse its JSON result."""
    r = subprocess.run(
        [sys.executable, "-m", "divergent.server.livepeer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if r.returncode != 0:
        raise RuntimeError(f"peer failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def response_times(trace: list[dict[str, Any]], received: list[list[float]]) -> list[float]:
    """Per phrase end in the trace: ms until the next note-on the peer received."""
    ends = [e["t"] for e in trace if e["event"] == "phrase_end"]
    ons = sorted(r[0] for r in received if (int(r[1]) & 0xF0) == 0x90 and r[3] > 0)
    out = []
    for i, t in enumerate(ends):
        nxt = ends[i + 1] if i + 1 < len(ends) else float("inf")
        first = next((x for x in ons if t <= x < nxt), None)
        if first is not None:
            out.append((first - t) * 1000)
    return out


def onset_errors(trace: list[dict[str, Any]], received: list[list[float]]) -> list[float]:
    """|arrival at the peer − scheduled time| in ms, for every machine note-on."""
    sched = sorted(
        (e["scheduled"], e["note"])
        for e in trace
        if e["event"] == "sent" and e["type"] == "note_on"
    )
    arrivals = sorted(
        (r[0], int(r[2])) for r in received if (int(r[1]) & 0xF0) == 0x90 and r[3] > 0
    )
    errs = []
    j = 0
    for t_arr, note in arrivals:
        # the matching scheduled note-on: same pitch, nearest in time (within 50 ms)
        best = None
        for k in range(max(0, j - 8), len(sched)):
            ts, n = sched[k]
            if ts > t_arr + 0.05:
                break
            if n == note and abs(t_arr - ts) < 0.05 and (best is None or abs(t_arr - ts) < best):
                best = abs(t_arr - ts)
                j = k
        if best is not None:
            errs.append(best * 1000)
    return errs


class Mosquitto:
    """A mosquitto broker on a local port that can be killed and started again there."""

    def __init__(self, workdir: Path) -> None:
        import shutil
        import socket

        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
        if binary is None:
            raise RuntimeError("mosquitto not found (Debian: apt-get install mosquitto)")
        self.binary = binary
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import socket

        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def mqtt_outage(*, outage_s: float = 30.0, jack_period: int = 64) -> dict[str, Any]:
    """Jam over JACK while the MQTT broker is killed for ``outage_s``: the onset error
    of the machine's notes before, during and after, and how long telemetry takes to
    come back once the broker does (a new subscriber sees a status message)."""
    import threading

    with JackServer(rate=48000, period=jack_period) as jack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work)
        broker.start()
        client = f"divmq{int(time.time()) % 100000}"
        serve = ServeProcess(
            [
                "--midi-backend",
                "jack",
                "--mode",
                "jam",
                "--bpm",
                "240",
                "--mqtt",
                f"127.0.0.1:{broker.port}",
                "--instance",
                "bench",
            ],
            workdir=work,
            name=client,
        )
        serve.start()
        stop = threading.Event()

        total = outage_s + 14.0
        t_listen = time.monotonic()
        listener = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "divergent.server.livepeer",
                "listen",
                "--server",
                client,
                "--no-send",
                "--seconds",
                str(total),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        player = threading.Thread(target=serve.osc.play_loop, args=(stop,), daemon=True)
        try:
            time.sleep(0.5)
            player.start()
            time.sleep(4.0)
            t_kill = time.monotonic()
            broker.kill()
            time.sleep(outage_s)
            broker.start()
            t_back = time.monotonic()
            sub = subprocess.Popen(
                [
                    "mosquitto_sub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(broker.port),
                    "-C",
                    "1",
                    "-t",
                    "divergent/bench/answer",
                    "-t",
                    "divergent/bench/status",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            # the retained status was lost with the broker: the first message a new
            # subscriber gets is one the server published after reconnecting
            sub.wait(timeout=8)
            resumed = time.monotonic() - t_back
            # the server stops (SIGTERM: panic) while the listener still listens, so a
            # note left sounding would show
            time.sleep(max(0.0, t_listen + total - 2.5 - time.monotonic()))
            stop.set()
            serve.stop()
            out, _ = listener.communicate(timeout=30)
        finally:
            stop.set()
            serve.stop()
            broker.kill()
        received = json.loads(out.strip().splitlines()[-1])["received"]
        trace = serve.trace_events()

        def window(lo: float, hi: float) -> dict[str, float]:
            errs = onset_errors(trace, [r for r in received if lo <= r[0] < hi])
            return {"p50": _pct(errs, 50), "p99": _pct(errs, 99), "n": len(errs)}

        return {
            "outage_s": outage_s,
            "onset_error_ms_before": window(0, t_kill),
            "onset_error_ms_during": window(t_kill, t_back),
            "onset_error_ms_after": window(t_back, float("inf")),
            "telemetry_resumed_s": resumed,
            "stuck_notes": len(json.loads(out.strip().splitlines()[-1])["stuck"]),
            # JACK drops a cycle's MIDI events in an xrun: a run with many is the VM's
            "jack_xruns": jack.xruns(),
            "jack_period_frames": jack_period,
        }


def generate_latency(serve: ServeProcess, client: str, *, presses: int = 10) -> dict[str, Any]:
    """``/divergent/generate`` in free time (mode off, quantize off), as a patch's button
    is pressed: a phrase played over OSC, a pause, the press; milliseconds from the press
    to the first machine note at a JACK peer (both stamp CLOCK_MONOTONIC)."""
    serve.osc.send("/divergent/mode", "off")
    serve.osc.send("/divergent/quantize", "off")
    seconds = presses * 3.6 + 2.0
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "divergent.server.livepeer",
            "listen",
            "--server",
            client,
            "--no-send",
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    presses_at: list[float] = []
    try:
        time.sleep(1.0)  # the listener's port is connected
        for i in range(presses):
            for p in (60, 64, 67, 72, 71, 67)[: 4 + i % 3]:
                serve.osc.send("/divergent/note", p + i % 5, 90, 1)
                time.sleep(0.08)
                serve.osc.send("/divergent/note", p + i % 5, 0, 1)
                time.sleep(0.02)
            time.sleep(0.6)
            presses_at.append(time.monotonic())
            serve.osc.send("/divergent/generate")
            time.sleep(2.5)
            serve.osc.send("/divergent/stop")
            time.sleep(0.3)
        out, _ = listener.communicate(timeout=seconds + 30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    received = json.loads(out.strip().splitlines()[-1])["received"]
    ons = sorted(r[0] for r in received if (r[1] & 0xF0) == 0x90 and r[3] > 0)
    ms = []
    for t in presses_at:
        first = next((x for x in ons if x >= t), None)
        if first is not None and first - t < 2.0:
            ms.append((first - t) * 1000)
    return {"p50": _pct(ms, 50), "p99": _pct(ms, 99), "n": len(ms), "presses": presses}


def run_bench_live(
    *, answers: int = 30, flood_s: float = 10.0, rate: float = 2000.0, jack_period: int = 64
) -> dict[str, Any]:
    """Run every live measurement once; the JSON shape the issue asks for, plus detail.
    ``jack_period``: frames per period of the JACK dummy server started when none runs."""
    with JackServer(rate=48000, period=jack_period) as jack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = f"divbench{int(time.time()) % 100000}"
        serve = _call_server(work, client)
        serve.start()
        try:
            rss_start = serve.rss_mb()
            peer = run_peer_process(
                ["phrases", "--server", client, "--phrases", str(answers)],
                timeout=answers * 6 + 30,
            )
            time.sleep(0.3)  # let the trace's last lines reach the file
            trace = serve.trace_events()
            resp = response_times(trace, peer["received"])
            errs = onset_errors(trace, peer["received"])
            # flood: mode off so only the input path is measured
            serve.osc.send("/divergent/mode", "off")
            t = time.monotonic()
            serve.osc.send("/divergent/stats")
            before = serve.osc.wait_for("/divergent/stats", after=t)
            flood = run_peer_process(
                ["flood", "--server", client, "--rate", str(rate), "--seconds", str(flood_s)],
                timeout=flood_s + 30,
            )
            time.sleep(0.3)
            t = time.monotonic()
            serve.osc.send("/divergent/stats")
            after = serve.osc.wait_for("/divergent/stats", after=t)
            received = (after[2][0] - before[2][0]) if after and before else -1
            lag_p99 = float(after[2][2]) if after else float("nan")
            rss = max(rss_start, serve.rss_mb())
            rss_shm = serve.rss_mb("RssShmem")
            generate = generate_latency(serve, client)
        finally:
            rc = serve.stop()
        return {
            "generate_ms": generate,
            "response_ms": {"p50": _pct(resp, 50), "p99": _pct(resp, 99), "n": len(resp)},
            "onset_error_ms": {"p50": _pct(errs, 50), "p99": _pct(errs, 99), "n": len(errs)},
            "flood": {
                "sent": flood["sent"],
                "received": received,
                "loop_lag_ms_p99": lag_p99,
                "seconds": flood["seconds"],
                "peer_max_behind_ms": flood["max_behind_ms"],
            },
            "cold_start_s": serve.cold_start_s,
            "rss_mb": rss,
            "rss_jack_shared_mb": rss_shm,
            "stuck_notes": len(peer["stuck"]),
            "jack_xruns": jack.xruns(),
            "exit_code": rc,
            "jack_period_frames": jack_period,
        }


class _Pages:
    """``n`` pages on the browser view, in a thread of their own: each loads the page and
    its assets, keeps its WebSocket read to the end and asks for the takes every 5 s, as
    the page does. Counts what they received."""

    def __init__(self, url: str, n: int) -> None:
        import asyncio
        import threading

        self.url = url.rstrip("/")
        self.n = n
        self.events = 0
        self.kinds: dict[str, int] = {}
        self.dropped = 0
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._stop: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pages", daemon=True)

    def __enter__(self) -> _Pages:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError(f"the pages did not connect: {self.errors}")
        if self.errors:
            raise RuntimeError(f"the pages failed: {self.errors}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            self._stop = asyncio.Event()
            connected = [0]
            try:
                await asyncio.gather(*(self._page(connected) for _ in range(self.n)))
            except Exception as e:
                self.errors.append(repr(e))
                self._ready.set()

        self._loop.run_until_complete(main())
        self._loop.close()

    async def _page(self, connected: list[int]) -> None:

        import aiohttp

        async with aiohttp.ClientSession() as http:
            for path in ("/", "/static/app.js", "/static/style.css", "/api/takes"):
                async with http.get(self.url + path) as r:
                    r.raise_for_status()
                    await r.read()
            async with http.ws_connect(self.url + "/ws") as ws:
                connected[0] += 1
                if connected[0] == self.n:
                    self._ready.set()
                next_takes = time.monotonic() + 5
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except TimeoutError:
                        msg = None
                    if msg is not None:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            return
                        event = json.loads(msg.data)
                        self.events += 1
                        kind = event.get("type", "?")
                        self.kinds[kind] = self.kinds.get(kind, 0) + 1
                        if kind == "dropped":
                            self.dropped = max(self.dropped, int(event["count"]))
                    if time.monotonic() >= next_takes:
                        next_takes += 5
                        async with http.get(self.url + "/api/takes") as r:
                            await r.read()


def _lag_windows(serve: ServeProcess, stop: Any, out: list[float]) -> None:
    """Every 5 s until ``stop``: the server's loop lag p99 (each over its last ~10 s)."""
    while not stop.wait(5.0):
        t = time.monotonic()
        serve.osc.send("/divergent/stats")
        got = serve.osc.wait_for("/divergent/stats", after=t)
        if got is not None:
            out.append(float(got[2][2]))


def _close(a: float, b: float) -> bool:
    """The side-by-side target: within 1.2x (or 0.2 ms) of each other."""
    return b <= a * 1.2 or abs(b - a) <= 0.2


def _phase(serve: ServeProcess, client: str, n: int) -> dict[str, Any]:
    """``n`` phrases from a JACK peer, answered in call mode: onset error, response and
    the loop's lag p99 (windows read while they play)."""
    import threading

    lags: list[float] = []
    stop = threading.Event()
    watch = threading.Thread(target=_lag_windows, args=(serve, stop, lags), daemon=True)
    watch.start()
    try:
        peer = run_peer_process(
            ["phrases", "--server", client, "--phrases", str(n)], timeout=n * 6 + 30
        )
    finally:
        stop.set()
        watch.join(timeout=10)
    time.sleep(0.3)  # the trace's last lines reach the file
    errs = onset_errors(serve.trace_events(), peer["received"])
    resp = response_times(serve.trace_events(), peer["received"])
    return {
        "onset_error_ms": {"p50": _pct(errs, 50), "p99": _pct(errs, 99), "n": len(errs)},
        "response_ms": {"p50": _pct(resp, 50), "p99": _pct(resp, 99), "n": len(resp)},
        # each window: p99 over the loop's last ~2,000 samples (about 10 s)
        "loop_lag_ms_p99": statistics.median(lags) if lags else float("nan"),
        "loop_lag_ms_p99_worst": max(lags) if lags else float("nan"),
        "loop_lag_ms_p99_windows": lags,
        "stuck_notes": len(peer["stuck"]),
    }


def _call_server(
    work: Path, client: str, *extra: str, env: Mapping[str, str] | None = None
) -> ServeProcess:
    """``divergent serve`` on JACK in call mode, as the side-by-side benches use it
    (``env``: a named JACK server's, :meth:`JackServer.env`)."""
    return ServeProcess(
        [
            "--midi-backend",
            "jack",
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
            *extra,
        ],
        workdir=work,
        name=client,
        env=env,
    )


def run_bench_learning(*, answers: int = 20, jack_period: int = 64) -> dict[str, Any]:
    """``bench live --learning``: the same phrases twice, first alone, then while a
    concept is learned from them in the background (``/divergent/concept/learn``, a
    separate niced process): onset error and loop lag p99 side by side."""
    with JackServer(rate=48000, period=jack_period) as jack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = f"divlearn{int(time.time()) % 100000}"
        serve = _call_server(work, client, "--concepts", str(work / "concepts"))
        serve.start()
        learned: list[Any] = []
        try:
            _phase(serve, client, 3)  # warm-up
            without = _phase(serve, client, answers)
            t = time.monotonic()
            serve.osc.send("/divergent/concept/learn", "benchlearn", 120.0)
            refused = serve.osc.wait_for("/divergent/error", after=t, timeout=1.0)
            during = _phase(serve, client, answers)
            t_end = time.monotonic()
            got = serve.osc.wait_for("/divergent/concept/learned", after=t, timeout=300)
            if got is not None:
                learned = list(got[2])
                during["learning_overlapped_s"] = min(t_end, got[0]) - t
        finally:
            rc = serve.stop()
        onset = (without["onset_error_ms"]["p99"], during["onset_error_ms"]["p99"])
        lag = (without["loop_lag_ms_p99"], during["loop_lag_ms_p99"])
        return {
            "answers_each": answers,
            "without_learning": without,
            "while_learning": during,
            "learn_refused": refused[2] if refused else None,
            "learned": learned,
            "onset_error_p99_within": _close(*onset),
            "loop_lag_p99_within": _close(*lag),
            "jack_xruns": jack.xruns(),
            "jack_period_frames": jack_period,
            "exit_code": rc,
        }


def run_bench_web(*, web_clients: int, answers: int = 30, jack_period: int = 64) -> dict[str, Any]:
    """``bench live --web-clients N``: one server, one JACK server, the same phrases played
    twice, first with no page connected, then with ``web_clients`` pages: the onset error
    and the event loop's lag p99 of each, side by side (the web view must not touch the
    timing)."""
    import socket

    with JackServer(rate=48000, period=jack_period) as jack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = f"divweb{int(time.time()) % 100000}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            web_port = int(s.getsockname()[1])
        serve = _call_server(work, client, "--web-port", str(web_port))
        serve.start()
        url = f"http://127.0.0.1:{web_port}"

        try:
            _phase(serve, client, 3)  # warm-up: the first answers pay for the model's first runs
            without = _phase(serve, client, answers)
            with _Pages(url, web_clients) as pages:
                with_pages = _phase(serve, client, answers)
            with_pages["pages"] = {
                "events_received": pages.events,
                "by_type": pages.kinds,
                "dropped": pages.dropped,
                "errors": pages.errors,
            }
        finally:
            rc = serve.stop()

        onset = (without["onset_error_ms"]["p99"], with_pages["onset_error_ms"]["p99"])
        lag = (without["loop_lag_ms_p99"], with_pages["loop_lag_ms_p99"])
        return {
            "web_clients": web_clients,
            "answers_each": answers,
            "without_pages": without,
            "with_pages": with_pages,
            # the target: within 1.2x (or 0.2 ms) of each other
            "onset_error_p99_within": _close(*onset),
            "loop_lag_p99_within": _close(*lag),
            "jack_xruns": jack.xruns(),
            "jack_period_frames": jack_period,
            "exit_code": rc,
        }
