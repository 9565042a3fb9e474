"""OscBridge against real UDP and real liblo peers (oscsend, oscdump)."""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from divergent.bridges.exceptions import OscError
from divergent.bridges.osc import (
    OscBridge,
    OscPacketError,
    OscStats,
    decode_packet,
    encode_message,
)
from tests.conftest import require_tool

Received = tuple[str, tuple[Any, ...], tuple[str, int]]


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def msg(address: str, *args: Any) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build().dgram


class Collector:
    """on_message/on_error sinks and a way to wait for them inside the loop."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.errors: list[tuple[str, Exception]] = []

    def on_message(self, address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        self.messages.append((address, args, sender))

    def on_error(self, what: str, exc: Exception) -> None:
        self.errors.append((what, exc))

    def bridge(self, **kw: Any) -> OscBridge:
        kw.setdefault("port", 0)
        kw.setdefault("reply_port", free_udp_port())
        return OscBridge(host="127.0.0.1", on_message=self.on_message, on_error=self.on_error, **kw)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    spins = 0
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        # sleep(0) lets the loop read one more datagram; later, sleep a little to spare the CPU
        spins += 1
        await asyncio.sleep(0 if spins < 1000 else 0.001)


async def oscsend(port: int, address: str, *typed: str) -> None:
    await asyncio.to_thread(
        subprocess.run,
        ["oscsend", "localhost", str(port), address, *typed],
        check=True,
        timeout=10,
        capture_output=True,
    )


# --- liblo peers ---------------------------------------------------------------------------


def test_oscsend_messages_reach_on_message() -> None:
    require_tool("oscsend")
    c = Collector()

    async def main() -> None:
        async with c.bridge() as osc:
            await oscsend(osc.port, "/divergent/divergence", "f", "0.5")
            await oscsend(osc.port, "/divergent/note", "iii", "60", "100", "2")
            await oscsend(osc.port, "/divergent/mode", "s", "jam")
            await oscsend(osc.port, "/divergent/ping")
            await wait_until(lambda: len(c.messages) == 4)
            assert osc.stats.messages == 4 and osc.stats.malformed == 0

    run(main())
    assert [(a, args) for a, args, _ in c.messages] == [
        ("/divergent/divergence", (0.5,)),
        ("/divergent/note", (60, 100, 2)),
        ("/divergent/mode", ("jam",)),
        ("/divergent/ping", ()),
    ]
    assert all(sender[0] == "127.0.0.1" and sender[1] > 0 for _, _, sender in c.messages)


def test_liblo_char_type_is_refused_not_misparsed() -> None:
    # python-osc skips unknown tags without consuming bytes: 'c' then 'i' would read garbage.
    require_tool("oscsend")
    c = Collector()

    async def main() -> None:
        async with c.bridge() as osc:
            await oscsend(osc.port, "/divergent/x", "ci", "a", "7")
            await oscsend(osc.port, "/divergent/y", "i", "7")
            await wait_until(lambda: len(c.messages) == 1)
            assert osc.stats.malformed == 1

    run(main())
    assert c.messages[0][:2] == ("/divergent/y", (7,))
    assert len(c.errors) == 1 and isinstance(c.errors[0][1], OscPacketError)
    assert "'c'" in str(c.errors[0][1])


def test_replies_reach_oscdump_at_the_fixed_reply_port() -> None:
    require_tool("oscsend", "oscdump")
    reply_port = free_udp_port()
    dump = subprocess.Popen(
        ["stdbuf", "-oL", "oscdump", "-L", str(reply_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert dump.stdout is not None
        for line in dump.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    c = Collector()

    async def main() -> None:
        async with c.bridge(reply_port=reply_port) as osc:
            # oscdump prints nothing when ready: ping until the first reply shows up
            deadline = time.monotonic() + 10
            while True:
                osc.send("/divergent/pong", "ready")
                try:
                    lines.get(timeout=0.05)
                    break
                except queue.Empty:
                    assert time.monotonic() < deadline, "oscdump never printed a reply"
            while not lines.empty():
                lines.get()
            # a request from oscsend: its reply must not go to oscsend's ephemeral port
            await oscsend(osc.port, "/divergent/status")
            await wait_until(lambda: len(c.messages) == 1)
            assert osc.send("/divergent/status", "call", 120.0, 1, True)
            # the precise sender thread sends notes: same bridge, another thread
            t = threading.Thread(target=osc.send, args=("/divergent/out/note", 60, 100, 1))
            t.start()
            t.join()

    try:
        run(main())
        got = [lines.get(timeout=5) for _ in range(2)]
    finally:
        dump.terminate()
        dump.wait(timeout=5)
        reader.join(timeout=5)
        assert dump.stdout is not None
        dump.stdout.close()
    # oscdump prints "<timetag> <address> <types> <values>"
    assert got[0].split(" ", 1)[1] == '/divergent/status sfii "call" 120.000000 1 1'
    assert got[1].split(" ", 1)[1] == "/divergent/out/note iii 60 100 1"


# --- robustness ----------------------------------------------------------------------------

MALFORMED: list[bytes] = [
    b"",
    b"/",  # address without its NUL padding
    b"/divergent/x",  # unpadded address
    b"/divergent/x\x00\x00\x00\x00i\x00\x00\x00",  # type tags without the comma
    b"/divergent/x\x00\x00\x00\x00,i\x00\x00",  # an int announced, none there (truncated)
    # (a truncated 'f' is accepted: python-osc zero-pads it on purpose, for Reaktor)
    b"/divergent/x\x00\x00\x00\x00,d\x00\x00\x3f\x00",  # a truncated double
    b"/divergent/x\x00\x00\x00\x00,s\x00\x00abc",  # an unterminated string
    b"/divergent/x\x00\x00\x00\x00,c\x00\x00\x00\x00\x00a",  # liblo char: unsupported
    b"/divergent/x\x00\x00\x00\x00,S\x00\x00abc\x00",  # liblo symbol: unsupported
    b"/divergent/x\x00\x00\x00\x00,[i\x00\x00\x00\x00\x01",  # unclosed array
    b"/divergent/x\x00\x00\x00\x00,]\x00\x00",  # array closed, never opened
    b"/\xff\xfe\x00",  # not UTF-8: python-osc lets UnicodeDecodeError escape here
    b"/ok\x00,s\x00\x00\xc3\x28\x00\x00",  # a non-UTF-8 string argument
    b"/ok\x00,b\x00\x00\x00\x00\x00\x10ab",  # a blob longer than the packet
    b"#bundle\x00",  # bundle without its time tag
    b"#bundle\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x40/x\x00\x00",  # size overruns
    b"#bundle\x00\x00\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xf0",  # negative size
    b"#bundle\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x04junk",  # element not OSC
    b"hello world",
    b"\x00" * 64,
]


def _deep_bundle(depth: int) -> bytes:
    inner = msg("/divergent/deep", 1)
    for _ in range(depth):
        inner = b"#bundle\x00" + b"\x00" * 7 + b"\x01" + struct.pack(">i", len(inner)) + inner
    return inner


@pytest.mark.parametrize(
    "data",
    [*MALFORMED, _deep_bundle(2000)],
    ids=[*(repr(m[:16]) for m in MALFORMED), "deep_bundle"],
)
def test_decode_packet_refuses_malformed(data: bytes) -> None:
    with pytest.raises(OscPacketError):
        decode_packet(data)


def test_transport_survives_random_and_malformed_packets(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(1234)
    c = Collector()
    junk = []
    for _ in range(10_000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        if data[:1] in (b"/", b"#"):
            data = b"x" + data[1:]  # keep every one of them certainly malformed
        junk.append(data)
    valid = msg("/divergent/tempo", 1, 0.5, "word")
    mutated = []
    for _ in range(2_000):
        d = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            d[rng.randrange(1, len(d))] = rng.getrandbits(8)
        mutated.append(bytes(d[: rng.randrange(1, len(d) + 1)]))
    packets = [*junk, *MALFORMED, _deep_bundle(2000), *mutated]

    async def main() -> None:
        async with c.bridge() as osc:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i, data in enumerate(packets, 1):
                    s.sendto(data, ("127.0.0.1", osc.port))
                    # let the loop drain before the kernel's receive buffer could overflow
                    if i % 64 == 0 or i == len(packets):
                        await wait_until(lambda i=i: osc.stats.packets >= i)
                st = osc.stats
                assert st.packets == len(packets)
                n_certain = len(junk) + len(MALFORMED) + 1
                assert st.malformed >= n_certain
                # every mutated packet is either one message or malformed, nothing else
                assert st.malformed + len(c.messages) == len(packets)
                assert len(c.errors) == st.malformed
                before = len(c.messages)
                s.sendto(msg("/divergent/divergence", 0.25), ("127.0.0.1", osc.port))
                await wait_until(lambda: len(c.messages) == before + 1)
            assert c.messages[-1][:2] == ("/divergent/divergence", (0.25,))

    with caplog.at_level(logging.DEBUG):
        run(main())
    # nothing escaped into asyncio's exception handler ("Exception in callback ...")
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    # one warning for the first junk packet, the rest at debug level
    warnings = [
        r for r in caplog.records if r.name == "divergent.osc" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1


def test_handler_exception_is_counted_and_the_bridge_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Collector()
    seen: list[str] = []

    def on_message(address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        seen.append(address)
        if address == "/divergent/boom":
            raise RuntimeError("handler bug")

    async def main() -> None:
        osc = OscBridge(
            port=0, reply_port=free_udp_port(), on_message=on_message, on_error=c.on_error
        )
        async with osc:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(msg("/divergent/boom"), ("127.0.0.1", osc.port))
                s.sendto(msg("/divergent/ok"), ("127.0.0.1", osc.port))
                await wait_until(lambda: len(seen) == 2)
            assert osc.stats.handler_errors == 1

    with caplog.at_level(logging.CRITICAL, logger="divergent.osc"):
        run(main())
    assert seen == ["/divergent/boom", "/divergent/ok"]
    assert c.errors[0][0] == "handler for /divergent/boom failed"


def test_bundles_are_unpacked_and_time_tags_ignored() -> None:
    c = Collector()
    inner = OscBundleBuilder(time.time() + 3600)  # an hour ahead: must not be waited for
    inner.add_content(OscMessage(msg("/divergent/c", 3)))
    outer = OscBundleBuilder(IMMEDIATELY)
    outer.add_content(OscMessage(msg("/divergent/a", 1)))
    outer.add_content(OscMessage(msg("/divergent/b", 2.5)))
    outer.add_content(inner.build())
    data = outer.build().dgram

    async def main() -> None:
        async with c.bridge() as osc:
            t0 = time.monotonic()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(data, ("127.0.0.1", osc.port))
                await wait_until(lambda: len(c.messages) == 3, timeout=2)
            assert time.monotonic() - t0 < 1.0
            assert osc.stats.packets == 1 and osc.stats.messages == 3

    run(main())
    assert [(a, args) for a, args, _ in c.messages] == [
        ("/divergent/a", (1,)),
        ("/divergent/b", (2.5,)),
        ("/divergent/c", (3,)),
    ]


# --- binding -------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_oscerror() -> None:
    c = Collector()

    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            with pytest.raises(OscError, match=rf"127\.0\.0\.1:{port}.*in use.*--osc-port"):
                async with c.bridge(port=port):
                    pass
        async with c.bridge() as first:
            with pytest.raises(OscError, match="in use"):
                async with c.bridge(port=first.port):
                    pass

    run(main())


def test_port_zero_is_ephemeral_and_ports_are_checked() -> None:
    c = Collector()

    async def main() -> None:
        bridge = c.bridge()
        with pytest.raises(OscError, match="not started"):
            _ = bridge.port
        async with bridge as osc:
            assert 0 < osc.port < 65536
        with pytest.raises(OscError, match=r"0\.\.65535"):
            async with c.bridge(port=70000):
                pass
        with pytest.raises(OscError, match="reply port"):
            async with c.bridge(reply_port=0):
                pass

    run(main())


# --- sending -------------------------------------------------------------------------------


def test_send_types_and_threads() -> None:
    c = Collector()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        reply_port = rx.getsockname()[1]
        received: list[bytes] = []

        async def main() -> None:
            async with c.bridge(reply_port=reply_port) as osc:
                assert osc.reply_address == ("127.0.0.1", reply_port)
                assert osc.send("/divergent/status", "call", 0.5, 7, True, b"\x01\x02")
                received.append(rx.recv(65536))

                def burst(k: int) -> None:
                    for i in range(250):
                        assert osc.send("/divergent/out/note", k, i, 1)

                threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                for _ in range(1000):
                    received.append(rx.recv(65536))
                assert osc.stats.sent == 1001 and osc.stats.send_errors == 0

        run(main())
    first = OscMessage(received[0])
    assert received[0].startswith(b"/divergent/status\x00\x00\x00,sfiib\x00")  # 32-bit 'f'
    assert first.params == ["call", 0.5, 7, 1, b"\x01\x02"]
    notes = sorted((m.params[0], m.params[1]) for m in map(OscMessage, received[1:]))
    assert notes == sorted((k, i) for k in range(4) for i in range(250))


def test_send_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    c = Collector()
    kept: list[OscBridge] = []

    async def main() -> None:
        async with c.bridge() as osc:
            kept.append(osc)
            # nobody listens at the reply port: UDP just sends
            assert osc.send("/divergent/pong", "x")
            assert not osc.send("/divergent/x", object())
            assert not osc.send("/divergent/x", 2**40)
            assert not osc.send("/divergent/x", 1e300)
            assert not osc.send("no-slash")
            assert osc.stats.encode_errors == 4

    with caplog.at_level(logging.CRITICAL, logger="divergent.osc"):
        run(main())
        osc = kept[0]
        assert not osc.send("/divergent/pong", "after close")
    assert osc.stats.send_errors == 1 and osc.stats.sent == 1


def test_encode_message_float_is_32_bit() -> None:
    data = encode_message("/a", (0.1, 1, "s", False))
    assert data[:12] == b"/a\x00\x00,fisi\x00\x00\x00"
    params = OscMessage(data).params
    assert params[0] == pytest.approx(0.1, rel=1e-6) and params[1:] == [1, "s", 0]


def test_senders_outside_the_allow_list_are_counted_and_ignored() -> None:
    """``allow``: addresses and CIDRs; anyone else's packets never reach the handler."""
    got: list[tuple[str, str]] = []

    async def main() -> OscStats:
        async with OscBridge(
            host="0.0.0.0",
            port=0,
            allow=["127.0.0.2", "10.0.0.0/8"],
            on_message=lambda address, args, sender: got.append((address, sender[0])),
        ) as osc:
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((source, 0))  # the whole 127/8 is this machine's on Linux
                sock.sendto(encode_message("/divergent/ping", ()), ("127.0.0.1", osc.port))
                sock.close()
            for _ in range(200):
                if osc.stats.packets >= 3:
                    break
                await asyncio.sleep(0.01)
            return osc.stats

    stats = asyncio.run(main())
    assert got == [("/divergent/ping", "127.0.0.2")]
    assert stats.refused == 2 and stats.messages == 1


@pytest.mark.parametrize("entry", ["example.org", "10.0.0.0/33", "1.2.3"])
def test_an_allow_list_entry_that_is_no_address_is_refused(entry: str) -> None:
    with pytest.raises(OscError, match="IP address or a CIDR"):
        OscBridge(on_message=lambda *a: None, allow=["127.0.0.1", entry])
