"""The server's MQTT bridge against a real mosquitto, with mosquitto_pub/mosquitto_sub as
the outside clients and a JACK peer listening to the music while the broker is down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from divergent.server.bench_live import onset_errors
from divergent.server.livepeer import ServeProcess
from tests.bridges.test_mqtt import Broker, free_tcp_port
from tests.conftest import JACK_PERIOD_S, require_tool

ROOT = Path(__file__).resolve().parents[2]


class Subscriber:
    """``mosquitto_sub -v`` on the instance's topics; collects (time, topic, payload)."""

    def __init__(self, port: int, instance: str) -> None:
        self.proc = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-v",
                "-t",
                f"divergent/{instance}/#",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.lines: list[tuple[float, str, str]] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            topic, _, payload = raw.rstrip("\n").partition(" ")
            self.lines.append((time.monotonic(), topic, payload))

    def wait(self, suffix: str, pred: Any = None, timeout: float = 8.0) -> tuple[float, str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line[1].endswith(suffix) and (pred is None or pred(line[2])):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {suffix} on MQTT; got {self.lines[-10:]}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _pub(port: int, topic: str, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", payload],
        check=True,
        timeout=10,
    )


@pytest.fixture
def mqtt_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_tool("mosquitto_pub", "mosquitto_sub")
    b = Broker(tmp_path, free_tcp_port())
    b.start()
    yield b
    b.stop()


def test_mqtt_controls_answers_errors_and_a_broker_outage(
    tmp_path: Path, mqtt_broker: Broker, jack_server: Any
) -> None:
    inst = "stage1"
    name = f"dvmq{int(time.time() * 1000) % 100000}"
    sp = ServeProcess(
        [
            "--midi-backend",
            "jack",
            "--mode",
            "off",
            "--bpm",
            "240",
            "--bars",
            "2",
            "--mqtt",
            f"127.0.0.1:{mqtt_broker.port}",
            "--instance",
            inst,
        ],
        workdir=tmp_path,
        name=name,
    )
    sp.start()
    sub = Subscriber(mqtt_broker.port, inst)
    try:
        # the server is subscribed once it says it is online (retained "1")
        sub.wait("/online", lambda p: p == "1")
        # control: mosquitto_pub changes divergence; the retained status shows it
        _pub(mqtt_broker.port, f"divergent/{inst}/control/divergence", "0.6")
        sub.wait("/status", lambda p: json.loads(p)["divergence"] == pytest.approx(0.6))
        # malformed payloads: errors published, the server keeps going
        _pub(mqtt_broker.port, f"divergent/{inst}/control/divergence", '{"a": 1}')
        _pub(mqtt_broker.port, f"divergent/{inst}/control/mode", "dance")
        sub.wait("/error", lambda p: "divergence" in p)
        sub.wait("/error", lambda p: "mode" in p)
        # answers: notes in over OSC, the readout comes out on MQTT
        for pitch in (60, 64, 67, 72, 71, 67):
            sp.osc.send("/divergent/note", pitch, 90, 1)
            time.sleep(0.06)
            sp.osc.send("/divergent/note", pitch, 0, 1)
        sp.osc.send("/divergent/generate")
        _, _, payload = sub.wait("/answer")
        ans = json.loads(payload)
        assert ans["divergence"] == pytest.approx(0.6) and ans["notes"] > 0

        # the broker dies during a jam: the music stays on time
        xruns = jack_server.xruns()
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
                "7",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        time.sleep(0.4)
        sp.osc.send("/divergent/mode", "jam")
        stop = threading.Event()

        player = threading.Thread(target=sp.osc.play_loop, args=(stop,), daemon=True)
        player.start()
        time.sleep(1.5)
        mqtt_broker.kill()
        time.sleep(3.0)
        mqtt_broker.start()
        t_back = time.monotonic()
        sub2 = Subscriber(mqtt_broker.port, inst)
        try:
            t_seen, _, _ = sub2.wait("/status", timeout=8)
            assert t_seen - t_back <= 5.0
        finally:
            sub2.close()
        out, _ = listener.communicate(timeout=30)
        stop.set()
        player.join()
        res = json.loads(out.strip().splitlines()[-1])
        errs = onset_errors(sp.trace_events(), res["received"])
        assert len(errs) >= 10, "the jam played through the outage"
        errs.sort()
        xruns = jack_server.xruns() - xruns
        # the median on every run (the tail is bench live's, reported with JACK's xruns)
        # JACK delivers MIDI once per period, half a period early or late at most: the
        # median |error| of a sender on time is about a quarter period
        assert errs[len(errs) // 2] <= JACK_PERIOD_S * 1000 / 2 + 1.0, (errs, f"{xruns} xruns")
        assert sp.proc is not None and sp.proc.poll() is None
    finally:
        sub.close()
        sp.stop()
