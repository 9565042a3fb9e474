"""MqttBridge against a real mosquitto broker; mosquitto_pub/mosquitto_sub are outside clients."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from divergent.bridges.exceptions import MqttError
from divergent.bridges.mqtt import MqttBridge, PayloadError, parse_payload
from tests.conftest import require_tool

PREFIX = "divergent/test/"
Line = tuple[bool, str, str]  # (retained, topic, payload) as mosquitto_sub prints them


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    """Poll ``cond`` in the loop; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# --- real peers ----------------------------------------------------------------------------


def mosquitto_binary() -> str:
    # Debian installs the broker in /usr/sbin, which a normal user's PATH may lack.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        require_tool("mosquitto")  # skips, or fails in CI
        raise AssertionError("unreachable")
    return found


class Broker:
    """A mosquitto process on a fixed port that can be killed and started again there."""

    def __init__(self, directory: Path, port: int, extra_config: str = "") -> None:
        self.port = port
        self.config = directory / f"mosquitto-{port}.conf"
        # user: run as ourselves; started as root, mosquitto would switch to the "mosquitto"
        # user and could not read the password file in our private temp directory.
        self.config.write_text(
            f"listener {port} 127.0.0.1\npersistence false\nuser {pwd.getpwuid(os.getuid())[0]}\n"
            + (extra_config or "allow_anonymous true\n")
        )
        self.log = directory / f"mosquitto-{port}.log"
        self.binary = mosquitto_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> None:
        assert self.proc is None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:  # ready when it accepts a TCP connection
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mosquitto not listening on {self.port}") from None
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    require_tool("mosquitto_pub", "mosquitto_sub")
    b = Broker(tmp_path, free_tcp_port())
    b.start()
    yield b
    b.stop()


class Sub:
    """mosquitto_sub on ``divergent/test/#``; a thread collects ``(retained, topic, payload)``."""

    def __init__(self, port: int, *extra: str) -> None:
        # -F: the retain flag, topic and payload of every message, one line each
        self.port = port
        self.proc = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                PREFIX + "#",
                "-F",
                "%r|%t|%p",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=1,
            encoding="utf-8",
            errors="backslashreplace",  # payloads may be any bytes
        )
        self._lines: list[Line] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            retained, topic, payload = raw.rstrip("\n").split("|", 2)
            with self._lock:
                self._lines.append((retained == "1", topic, payload))

    @property
    def lines(self) -> list[Line]:
        with self._lock:
            return [line for line in self._lines if not line[1].endswith("/probe")]

    def on(self, sub: str) -> list[Line]:
        return [line for line in self.lines if line[1] == PREFIX + sub]

    async def ready(self, timeout: float = 5.0) -> None:
        """Wait until the broker has our subscription: a probe we publish comes back."""
        deadline = time.monotonic() + timeout
        while True:
            await mosquitto_pub(self.port, "probe", "-m", "x")
            try:
                await wait_until(
                    lambda: any(t.endswith("/probe") for _, t, _ in self._lines), timeout=0.2
                )
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=5)
        self._thread.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def retained(port: int, count: int, *extra: str) -> list[Line]:
    """What a dashboard subscribing now gets at once: the retained messages, sorted.

    Asks again (for up to ~2 s) while fewer than ``count`` come back: a message handed to
    the bridge a moment ago may not have reached the broker yet.
    """
    for _ in range(40):
        late = Sub(port, "--retained-only", "-C", str(count), "-W", "5", *extra)
        try:
            await asyncio.to_thread(late.proc.wait, 10)
        finally:
            late.close()
        if len(late.lines) >= count:
            break
        await asyncio.sleep(0.05)
    return sorted(late.lines)


async def mosquitto_pub(port: int, sub: str, *args: str) -> None:
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", PREFIX + sub, *args],
        check=True,
        timeout=10,
        capture_output=True,
    )


class Controls:
    """on_control sink: records (param, payload) and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.threads: set[int] = set()
        self.parsed: list[tuple[str, list[object]]] = []

    def __call__(self, param: str, payload: bytes) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append((param, payload))
        if param == "boom":
            raise RuntimeError("handler bug")
        # as the server will do: parse, and let PayloadError reach the bridge
        self.parsed.append((param, parse_payload(payload)))


def bridge(port: int, controls: Controls | None = None, **kw: Any) -> MqttBridge:
    kw.setdefault("backoff", (0.1, 0.5))
    return MqttBridge(
        host="127.0.0.1",
        port=port,
        instance="test",
        on_control=controls if controls is not None else Controls(),
        **kw,
    )


# --- parse_payload -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"0.5", [0.5]),
        (b"7", [7]),
        (b"-3", [-3]),
        (b"+5", [5]),  # not JSON, but a number typed by a person
        (b".5", [0.5]),
        (b"5.", [5.0]),
        (b"1e3", [1000.0]),
        (b" 0.25\n", [0.25]),  # `echo 0.25 | mosquitto_pub -s` adds a newline
        (b"jam", ["jam"]),
        (b"take 1", ["take 1"]),  # plain text stays one string
        (b'"take1"', ["take1"]),
        (b'"0.5"', ["0.5"]),  # a JSON string stays a string
        (b"true", [True]),
        (b"false", [False]),
        (b"True", ["True"]),
        (b"[60, 100, 2]", [60, 100, 2]),
        (b'[0.5, "jam", true]', [0.5, "jam", True]),
        (b"[]", []),
        (b"", []),
        (b"  ", []),
        (b"null", []),
        (b"NaN", ["NaN"]),  # not a number: the validator refuses the string
        (b"0x10", ["0x10"]),
        (b"1_000", ["1_000"]),
        ("é".encode(), ["é"]),
    ],
)
def test_parse_payload(payload: bytes, expected: list[object]) -> None:
    got = parse_payload(payload)
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]  # 1 is not 1.0, True not 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"0.5\xc3", "not UTF-8"),
        (b'{"value": 0.5}', "JSON object"),
        (b"[[1, 2]]", "inside a JSON array"),
        (b"[1, null]", "null is not allowed inside a JSON array"),
        (b'[{"a": 1}]', "JSON object"),
        (b"1e999", "not a finite number"),
        (b"[1e999]", "not a finite number"),
    ],
)
def test_parse_payload_refuses(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_payload(payload)
    assert issubclass(PayloadError, ValueError)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"host": ""}, "host is empty"),
        ({"host": "  "}, "host is empty"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"instance": "a/b"}, "instance"),
        ({"instance": ""}, "instance"),
        ({"instance": "has space"}, "instance"),
        ({"password": "secret"}, "needs a user name"),
        ({"queue_size": 0}, "queue size"),
        ({"backoff": (0.0, 1.0)}, "backoff"),
        ({"backoff": (2.0, 1.0)}, "backoff"),
        ({"tls": True, "cafile": "/nonexistent/ca.pem"}, "CA file"),
        ({"client_id": ""}, "client id"),
    ],
)
def test_bad_configuration_is_a_clear_mqtterror(kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"host": "127.0.0.1", "on_control": Controls()} | kw
    with pytest.raises(MqttError, match=message):
        MqttBridge(**args)


# --- control in ----------------------------------------------------------------------------


def test_controls_from_mosquitto_pub_reach_on_control(broker: Broker) -> None:
    controls = Controls()
    bad = broker.config.parent / "bad.bin"
    bad.write_bytes(b"\xff\xfe0.5")

    async def main() -> None:
        # A retained command left on the broker must not replay at every (re)connect.
        await mosquitto_pub(broker.port, "control/record/start", "-r", "-m", '"stale"')
        async with bridge(broker.port, controls) as mqtt:
            assert await mqtt.wait_connected(5)
            sub = Sub(broker.port)
            try:
                await sub.ready()
                await mosquitto_pub(broker.port, "control/divergence", "-m", "0.5")
                await mosquitto_pub(broker.port, "control/note", "-m", "[60, 100, 2]")
                await mosquitto_pub(broker.port, "control/record/start", "-m", '"take1"')
                await mosquitto_pub(broker.port, "control/record/stop", "-n")
                await mosquitto_pub(broker.port, "control/divergence", "-f", str(bad))
                await mosquitto_pub(broker.port, "control/boom", "-m", "1")
                await mosquitto_pub(broker.port, "control", "-m", "1")  # no parameter
                await mosquitto_pub(broker.port, "control/mode", "-q", "1", "-m", "jam")
                await wait_until(lambda: len(controls.calls) == 7, what="7 controls")
                await wait_until(lambda: len(sub.on("error")) == 2, what="2 errors")
                stats = mqtt.stats
                assert mqtt.connected
            finally:
                sub.close()
        assert controls.calls == [
            ("divergence", b"0.5"),
            ("note", b"[60, 100, 2]"),
            ("record/start", b'"take1"'),
            ("record/stop", b""),
            ("divergence", b"\xff\xfe0.5"),
            ("boom", b"1"),
            ("mode", b"jam"),
        ]
        assert controls.parsed == [
            ("divergence", [0.5]),
            ("note", [60, 100, 2]),
            ("record/start", ["take1"]),
            ("record/stop", []),
            ("mode", ["jam"]),
        ]
        assert controls.threads == {threading.get_ident()}  # called in the event loop
        assert stats.controls == 7
        assert stats.malformed == 2  # the bad UTF-8 and the bare "control" topic
        assert stats.handler_errors == 1  # boom
        assert stats.ignored_retained == 1  # the stale retained record/start
        errors = [payload for _, _, payload in sub.on("error")]
        assert "divergent/test/control/divergence: payload is not UTF-8" in errors[0]
        assert errors[0].endswith("(rejected)")
        assert "no parameter" in errors[1]

    run(main())


def test_controls_dropped_by_a_full_inbound_queue_are_counted(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst faster than the loop takes it: aiomqtt's bounded inbound queue drops the
    excess. Every message is either handed to ``on_control`` or counted as dropped, and
    the drops are logged once (with the count), not once per message."""
    total = 2000
    handled: list[bytes] = []

    def slow(param: str, payload: bytes) -> None:
        handled.append(payload)
        time.sleep(0.0005)  # a busy loop: the socket is read while this runs behind

    async def main() -> None:
        mqtt = MqttBridge(
            host="127.0.0.1", port=broker.port, instance="test", on_control=slow, queue_size=4
        )
        async with mqtt:
            assert await mqtt.wait_connected(5)
            lines = "".join(f"{i}\n" for i in range(total))
            # one real client sending the whole burst as fast as it can (-l: a line each)
            await asyncio.to_thread(
                subprocess.run,
                [
                    *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port)),
                    *("-t", PREFIX + "control/divergence", "-l"),
                ],
                input=lines.encode(),
                check=True,
                timeout=30,
            )
            await wait_until(
                lambda: mqtt.stats.controls + mqtt.stats.inbound_dropped == total,
                timeout=10,
                what=f"{total} controls handled or dropped",
            )
            await asyncio.sleep(0.2)  # nothing more arrives
            stats = mqtt.stats
        assert stats.controls == len(handled)
        assert stats.controls + stats.inbound_dropped == total, stats
        assert stats.inbound_dropped > 0, stats
        assert stats.in_dropped == stats.inbound_dropped  # nothing else went wrong
        # what was handled came in order: the queue drops, it never reorders
        assert [int(p) for p in handled] == sorted(int(p) for p in handled)
        said = [r.getMessage() for r in caplog.records if "dropped unread" in r.getMessage()]
        assert 1 <= len(said) <= 3, said  # throttled (and the tail once, at close)
        assert not [r for r in caplog.records if "Discarding message" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="divergent.mqtt"):
        run(main())


# --- telemetry out -------------------------------------------------------------------------


def test_status_is_retained_and_answers_reach_mosquitto_sub(broker: Broker) -> None:
    async def main() -> None:
        live = Sub(broker.port)
        try:
            await live.ready()
            async with bridge(broker.port) as mqtt:
                assert await mqtt.wait_connected(5)
                mqtt.publish_status({"mode": "jam", "divergence": 0.5})
                mqtt.publish_answer({"notes": 12, "surprise": 1.25})
                mqtt.publish_error("/divergent/divergence: 2.0 clamped to 1.0")
                mqtt.publish("meter", {"cpu": 0.1}, retain=True)
                mqtt.publish("raw", b"\x00\x01")
                # from another thread (e.g. a worker): hops into the loop, still in order
                await asyncio.to_thread(mqtt.publish_answer, {"from": "thread"})
                await wait_until(lambda: len(live.on("answer")) == 2, what="2 answers")

                # A dashboard that subscribes later gets the state, not the events.
                assert await retained(broker.port, 3) == [
                    (True, PREFIX + "meter", '{"cpu":0.1}'),
                    (True, PREFIX + "online", "1"),
                    (True, PREFIX + "status", '{"mode":"jam","divergence":0.5}'),
                ]
                # Publishing on the last status before closing: it still goes out.
                mqtt.publish_status({"mode": "off"})
            after = mqtt.stats
            mqtt.publish_answer({"too": "late"})  # after close: counted, never raised
            assert mqtt.stats.dropped == after.dropped + 1
            await wait_until(lambda: "0" in [p for _, _, p in live.on("online")], what="online 0")
        finally:
            live.close()
        assert [(r, p) for r, _, p in live.on("online")] == [(False, "1"), (False, "0")]
        assert [p for _, _, p in live.on("status")] == [
            '{"mode":"jam","divergence":0.5}',
            '{"mode":"off"}',
        ]
        assert [p for _, _, p in live.on("answer")] == [
            '{"notes":12,"surprise":1.25}',
            '{"from":"thread"}',
        ]
        assert [p for _, _, p in live.on("error")] == ["/divergent/divergence: 2.0 clamped to 1.0"]
        assert [p for _, _, p in live.on("raw")] == ["\x00\x01"]
        assert after.published == 9 and after.dropped == 0 and after.encode_errors == 0

    run(main())


def test_publish_never_raises_for_bad_topics_or_payloads(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with bridge(broker.port) as mqtt:
            with caplog.at_level(logging.CRITICAL, logger="divergent.mqtt"):
                mqtt.publish("online", "1")  # the bridge's own
                mqtt.publish("control/divergence", 1)  # would loop back into on_control
                mqtt.publish("a/+", 1)
                mqtt.publish("", 1)
                mqtt.publish("/x", 1)
                mqtt.publish_answer({"x": float("nan")})  # not JSON
                mqtt.publish_answer({"x": object()})
            assert mqtt.stats.encode_errors == 7

    run(main())


def test_queue_overflow_drops_the_oldest_and_counts(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        mqtt = bridge(broker.port, queue_size=4)
        # Before the bridge starts (as during an outage) answers wait in the queue.
        with caplog.at_level(logging.WARNING, logger="divergent.mqtt"):
            for i in range(10):
                mqtt.publish_answer({"i": i})
            for i in range(10):
                mqtt.publish_status({"i": i})  # state: only the latest is kept, never dropped
        assert mqtt.stats.dropped == 6
        drop_lines = [r for r in caplog.records if "not sent" in r.getMessage()]
        assert len(drop_lines) == 1  # rate-limited: one line, not six
        sub = Sub(broker.port)
        try:
            await sub.ready()
            async with mqtt:
                await wait_until(lambda: len(sub.on("answer")) == 4, what="4 answers")
                await asyncio.sleep(0.1)
        finally:
            sub.close()
        assert [p for _, _, p in sub.on("answer")] == [f'{{"i":{i}}}' for i in range(6, 10)]
        assert [p for _, _, p in sub.on("status")] == ['{"i":9}']

    run(main())


# --- broker trouble ------------------------------------------------------------------------


def test_broker_killed_and_restarted(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """The music's view: publishing stays sub-millisecond while the broker is gone, and
    telemetry comes back by itself soon after the broker does."""
    numbers: dict[str, float] = {}

    async def main() -> None:
        sub = Sub(broker.port)
        await sub.ready()
        durations_us: list[float] = []  # wall time of each pair of calls
        cpu_us: list[float] = []  # this thread's CPU time for it (no GIL waits)
        outage_us: list[float] = []
        seq = 0
        feeding = True

        async with bridge(broker.port, backoff=(0.5, 5.0)) as mqtt:
            assert await mqtt.wait_connected(5)

            async def feed() -> None:
                # the server's side: status and answer every 10 ms, from the loop
                nonlocal seq
                while feeding:
                    seq += 1
                    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                    mqtt.publish_status({"seq": seq, "mode": "jam", "divergence": 0.5})
                    mqtt.publish_answer({"seq": seq, "notes": [60, 64, 67]})
                    took = (time.perf_counter_ns() - t0) / 1000
                    cpu_us.append((time.thread_time_ns() - c0) / 1000)
                    durations_us.append(took)
                    if not mqtt.connected:
                        outage_us.append(took)
                    await asyncio.sleep(0.01)

            feeder = asyncio.create_task(feed())
            try:
                await wait_until(lambda: len(sub.on("answer")) >= 5, what="answers")
                sub.close()
                await asyncio.to_thread(broker.kill)
                await wait_until(lambda: not mqtt.connected, timeout=2, what="disconnect")
                await asyncio.sleep(3.0)
                await asyncio.to_thread(broker.start)
                back = time.monotonic()
                seq_at_return = seq
                sub = Sub(broker.port)
                assert await mqtt.wait_connected(6), "no reconnect within 6 s"
                numbers["reconnect_s"] = time.monotonic() - back
                await wait_until(
                    lambda: any(
                        int(p.split(",")[0].split(":")[1]) > seq_at_return
                        for _, _, p in sub.on("answer")
                    ),
                    timeout=6,
                    what="fresh answers after the restart",
                )
                numbers["telemetry_s"] = time.monotonic() - back
            finally:
                feeding = False
                await feeder
                sub.close()

            # The restarted broker had no persistence: the bridge re-published the state.
            snapshot = await retained(broker.port, 2)
            stats = mqtt.stats
            closing = time.monotonic()
        numbers["close_s"] = time.monotonic() - closing

        assert numbers["close_s"] < 1.0  # flushed, said "0" and left: no hang on close
        assert [(r, t) for r, t, _ in snapshot] == [
            (True, PREFIX + "online"),
            (True, PREFIX + "status"),
        ]
        status_seq = int(snapshot[1][2].split(",")[0].split(":")[1])
        assert status_seq > seq_at_return
        wall = sorted(durations_us)
        numbers["publish_pair_p50_us"] = wall[len(wall) // 2]
        numbers["publish_pair_p99_us"] = wall[len(wall) * 99 // 100]
        numbers["publish_pair_max_us"] = wall[-1]
        numbers["publish_pair_outage_max_us"] = max(outage_us)
        numbers["publish_pair_cpu_max_us"] = max(cpu_us)
        numbers["calls_during_outage"] = len(outage_us)
        numbers["dropped"] = stats.dropped
        assert len(outage_us) > 100
        # Publishing only queues: a pair (status + answer) is well under 1 ms of work,
        # outage or not, and never waits on the network (a connect attempt or a blocked
        # socket would take tens of ms to seconds). The percentiles of a shared 2-vCPU VM
        # (a cold vCPU, host steal, another thread holding the GIL: p99 1-2.4 ms seen here)
        # are not this test's to judge: the median is the bulk, the maximum the bound.
        assert numbers["publish_pair_p50_us"] < 1000, numbers
        assert numbers["publish_pair_outage_max_us"] < 50_000, numbers
        assert wall[-1] < 50_000, numbers
        assert numbers["telemetry_s"] < 5.0
        assert stats.reconnects == 1 and stats.connect_failures >= 2
        assert stats.dropped > 0  # ~300 answers in 3 s into a queue of 256
        mine = [
            r.getMessage()
            for r in caplog.records
            if r.name == "divergent.mqtt" and r.levelno >= logging.WARNING
        ]
        # one line for the loss, none per retry, one for the return; drops rate-limited
        assert sum("lost the connection" in m for m in mine) == 1
        assert sum("cannot connect" in m for m in mine) <= 1
        assert sum("reconnected" in m for m in mine) == 1
        assert sum("not sent" in m for m in mine) <= 2

    with caplog.at_level(logging.INFO):
        run(main())
    print(f"\nMQTT outage numbers: {numbers}")


def test_no_broker_at_start_then_one_appears(tmp_path: Path) -> None:
    require_tool("mosquitto_sub")
    port = free_tcp_port()
    late_broker = Broker(tmp_path, port)

    async def main() -> None:
        async with bridge(port, backoff=(0.05, 0.2)) as mqtt:
            await asyncio.sleep(0.6)
            assert not mqtt.connected
            assert mqtt.stats.connect_failures >= 3
            mqtt.publish_status({"mode": "call"})
            mqtt.publish_answer({"queued": True})
            await asyncio.to_thread(late_broker.start)
            waited = await wait_until(lambda: mqtt.connected, timeout=2, what="connect")
            assert waited < 0.5  # the backoff is capped at 0.2 s here
            # online, then the status and the queued answer right after
            await wait_until(lambda: mqtt.stats.published == 3, what="3 published")
            assert await retained(port, 2) == [
                (True, PREFIX + "online", "1"),
                (True, PREFIX + "status", '{"mode":"call"}'),
            ]

    try:
        run(main())
    finally:
        late_broker.stop()


def test_last_will_when_the_connection_is_lost(broker: Broker) -> None:
    """online: 1 → 0 (the broker sends the will) → 1 (the bridge is back)."""

    async def main() -> None:
        sub = Sub(broker.port)
        try:
            await sub.ready()
            async with bridge(broker.port, client_id="divergent-will-test") as mqtt:
                assert await mqtt.wait_connected(5)
                await wait_until(lambda: len(sub.on("online")) == 1, what="online 1")
                # Another client with our id: the broker drops our connection without a
                # DISCONNECT, which is exactly when it publishes the will.
                await mosquitto_pub(broker.port, "probe", "-i", "divergent-will-test", "-m", "x")
                await wait_until(lambda: len(sub.on("online")) == 3, what="will, then back")
                assert await mqtt.wait_connected(2)
                assert mqtt.stats.reconnects == 1
            await wait_until(lambda: len(sub.on("online")) == 4, what="clean 0")
        finally:
            sub.close()
        assert [(p, r) for r, _, p in sub.on("online")] == [
            ("1", False),
            ("0", False),
            ("1", False),
            ("0", False),
        ]

    run(main())


def test_tls_with_username_and_password(tmp_path: Path) -> None:
    require_tool("openssl", "mosquitto_passwd", "mosquitto_sub")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    passwords = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "divergent", "s3cret"],
        check=True,
        capture_output=True,
        timeout=10,
    )
    os.chmod(passwords, 0o600)
    port = free_tcp_port()
    tls_broker = Broker(
        tmp_path,
        port,
        extra_config=(
            f"allow_anonymous false\npassword_file {passwords}\ncertfile {cert}\nkeyfile {key}\n"
        ),
    )
    tls_broker.start()

    async def main() -> None:
        # wrong password: retried quietly in the background, never raised
        wrong = MqttBridge(
            host="localhost",
            port=port,
            instance="test",
            username="divergent",
            password="nope",
            tls=True,
            cafile=str(cert),
            on_control=Controls(),
            backoff=(0.1, 0.2),
        )
        async with wrong:
            assert not await wrong.wait_connected(0.5)
        async with MqttBridge(
            host="localhost",
            port=port,
            instance="test",
            username="divergent",
            password="s3cret",
            tls=True,
            cafile=str(cert),
            on_control=Controls(),
        ) as mqtt:
            assert await mqtt.wait_connected(5)
            mqtt.publish_status({"tls": True})
            await wait_until(lambda: mqtt.stats.published == 2, what="2 published")
            snapshot = await retained(
                port, 2, "--cafile", str(cert), "-u", "divergent", "-P", "s3cret"
            )
        assert snapshot == [
            (True, PREFIX + "online", "1"),
            (True, PREFIX + "status", '{"tls":true}'),
        ]

    try:
        run(main())
    finally:
        tls_broker.stop()
