"""OSC over UDP: every incoming message to one callback, replies to one fixed address.

:class:`OscBridge` listens on ``host:port`` inside the running asyncio loop and hands
each message to ``on_message(address, args, sender)`` synchronously, in the loop, as
it arrives. Messages inside bundles are handed over one by one; their time tags are
ignored (the server schedules everything itself).

Replies go to a fixed ``reply_host:reply_port`` — never to the sender's port, which Max's
``udpsend`` and Pd's ``netsend`` cannot listen on. :meth:`OscBridge.send` may be called
from any thread (the precise sender thread sends ``/divergent/out/note``); it never raises
for wire problems, it counts them.

Why not python-osc's ``AsyncIOOSCUDPServer`` + ``Dispatcher``: its dispatcher swallows
parse errors silently (nothing to count), lets ``UnicodeDecodeError`` from a bad address
string escape into asyncio's exception handler (a logged traceback per junk packet),
sleeps on future bundle time tags when ``strict_timing`` is on (blocking the loop), and
sends handler return values back to the sender's port. This module keeps python-osc's
message parser and builder and replaces the thin layer around them.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.parsing import osc_types

from divergent.bridges.exceptions import OscError

__all__ = ["OscBridge", "OscPacketError", "OscStats", "decode_packet", "encode_message"]

log = logging.getLogger("divergent.osc")

_BUNDLE_PREFIX = b"#bundle\x00"
# Type tags python-osc's parser understands. Anything else (liblo's 'c' char, 'S' symbol,
# 'I' infinitum...) makes python-osc log a warning and skip the tag *without consuming its
# bytes*, so later arguments would be read from the wrong place: such messages are refused.
_SUPPORTED_TAGS = frozenset("ihfdsbrmtTFN[]")
# Each nested bundle needs 20 bytes, so a 64 KiB datagram could nest ~3,000 deep and hit
# Python's recursion limit; real senders nest one or two levels.
_MAX_BUNDLE_DEPTH = 8
_INT32 = (-(2**31), 2**31 - 1)

OnMessage = Callable[[str, tuple[Any, ...], tuple[str, int]], None]
OnError = Callable[[str, Exception], None]


class OscPacketError(ValueError):
    """A datagram is not a well-formed OSC message or bundle (or uses unsupported types)."""


@dataclass(frozen=True)
class OscStats:
    """Counters since the bridge started (a snapshot; read :attr:`OscBridge.stats` again)."""

    packets: int = 0
    """Datagrams received."""
    messages: int = 0
    """Messages handed to ``on_message`` (a bundle counts each message inside)."""
    malformed: int = 0
    """Datagrams dropped because they were not valid OSC."""
    handler_errors: int = 0
    """Messages whose ``on_message`` (or ``on_error``) call raised."""
    receive_errors: int = 0
    """Socket errors reported while receiving (e.g. ICMP errors)."""
    sent: int = 0
    """Replies handed to the network."""
    send_errors: int = 0
    """Replies that could not be sent (socket error, or the bridge was closed)."""
    encode_errors: int = 0
    """Replies that could not be encoded (an unsupported argument type or value)."""
    refused: int = 0
    """Datagrams from senders outside the allow-list, ignored."""


# --- wire format -------------------------------------------------------------------------


def decode_packet(data: bytes) -> list[OscMessage]:
    """The messages in one datagram: one message, or every message in a (nested) bundle.

    Raises :class:`OscPacketError` for anything that is not well-formed OSC with argument
    types python-osc supports.
    """
    try:
        return _decode(data, 0)
    except OscPacketError:
        raise
    except Exception as e:
        # python-osc's parser raises its own ParseErrors, but also lets UnicodeDecodeError
        # (a non-UTF-8 address or string) and others through: untrusted input, so any
        # parser exception means "malformed", never a crash of the receiving loop.
        raise OscPacketError(f"{type(e).__name__}: {e}") from e


def _decode(data: bytes, depth: int) -> list[OscMessage]:
    if data.startswith(_BUNDLE_PREFIX):
        if depth >= _MAX_BUNDLE_DEPTH:
            raise OscPacketError(f"bundles nested deeper than {_MAX_BUNDLE_DEPTH}")
        if len(data) < 16:
            raise OscPacketError("bundle shorter than its header")
        out: list[OscMessage] = []
        index = 16  # "#bundle\0" and the 8-byte time tag, which is ignored on purpose
        while index < len(data):
            size, index = osc_types.get_int(data, index)
            if size <= 0 or index + size > len(data):
                raise OscPacketError(f"bundle element size {size} does not fit the packet")
            out.extend(_decode(data[index : index + size], depth + 1))
            index += size
        return out
    if data.startswith(b"/"):
        _, index = osc_types.get_string(data, 0)
        if index < len(data):
            tags, _ = osc_types.get_string(data, index)
            if not tags.startswith(","):
                raise OscPacketError(f"type tag string {tags!r} does not start with ','")
            unsupported = sorted(set(tags[1:]) - _SUPPORTED_TAGS)
            if unsupported:
                raise OscPacketError(f"unsupported OSC type tag(s) {''.join(unsupported)!r}")
        return [OscMessage(data)]
    raise OscPacketError("neither an OSC message ('/...') nor a bundle ('#bundle')")


def encode_message(address: str, args: tuple[object, ...]) -> bytes:
    """One OSC message: ints as 'i', floats as 32-bit 'f', strings 's', bytes 'b'.

    Booleans go as 'i' 1/0 because Max and Pd do not understand OSC's T/F.
    Raises :class:`TypeError` or :class:`ValueError` for what OSC cannot carry.
    """
    if not address.startswith("/"):
        raise ValueError(f"OSC address must start with '/', not {address!r}")
    builder = OscMessageBuilder(address=address)
    for a in args:
        if isinstance(a, bool):
            builder.add_arg(int(a), "i")
        elif isinstance(a, int):
            if not _INT32[0] <= a <= _INT32[1]:
                raise ValueError(f"{a} does not fit a 32-bit OSC int")
            builder.add_arg(a, "i")
        elif isinstance(a, float):
            # python-osc packs 'f' with struct, which overflows above ~3.4e38: say so here.
            if math.isfinite(a) and abs(a) > 3.4028234663852886e38:
                raise ValueError(f"{a} does not fit a 32-bit OSC float")
            builder.add_arg(a, "f")
        elif isinstance(a, str):
            if "\x00" in a:
                raise ValueError("an OSC string cannot contain NUL")
            builder.add_arg(a, "s")
        elif isinstance(a, bytes | bytearray):
            builder.add_arg(bytes(a), "b")
        else:
            raise TypeError(f"cannot send {type(a).__name__} {a!r} over OSC")
    return builder.build().dgram


# --- the bridge ----------------------------------------------------------------------------


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(items: Sequence[str]) -> tuple[Network, ...]:
    """Addresses and CIDRs (``192.168.1.20``, ``10.0.0.0/8``, ``::1``) as networks; raises
    ValueError naming the first that is neither (host names are refused: a name resolved
    once could later point elsewhere)."""
    nets = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(
                f"allow-list entry {text!r}: give an IP address or a CIDR like 10.0.0.0/8"
            ) from None
    return tuple(nets)


def allowed(host: str, nets: Sequence[Network]) -> bool:
    """Whether ``host`` (a numeric address, as a socket reports it) is in ``nets``."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d
    return any(ip in net for net in nets)


class _Protocol(asyncio.DatagramProtocol):
    """Forwards the transport's callbacks to the bridge (kept tiny on purpose)."""

    def __init__(self, bridge: OscBridge) -> None:
        self._bridge = bridge

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._bridge._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._bridge._on_receive_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._bridge._on_closed()


def _resolve(host: str, port: int, what: str) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise OscError(f"{what}: cannot resolve {host!r}: {e}") from None
    # Prefer IPv4: "localhost" often lists ::1 first, but Max, Pd and liblo listen on IPv4.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class OscBridge:
    """OSC server and reply sender; use as ``async with OscBridge(...) as osc:``.

    ``on_message(address, args, sender)`` is called in the event loop for every message
    (``sender`` is the peer's ``(host, port)``; replies do not go there). Exceptions
    from it are logged, counted and passed to ``on_error``; they never stop the bridge.
    ``on_error(what, exc)`` is also told about malformed packets; it runs in the loop.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 9000,
        reply_host: str = "127.0.0.1",
        reply_port: int = 9001,
        on_message: OnMessage,
        on_error: OnError | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        try:
            self._allow = parse_allow(allow)
        except ValueError as e:
            raise OscError(str(e)) from e
        self._host = host
        self._requested_port = port
        self._reply_host = reply_host
        self._reply_port = reply_port
        self._on_message = on_message
        self._on_error = on_error
        self._transport: asyncio.DatagramTransport | None = None
        self._closed: asyncio.Future[None] | None = None
        self._port: int | None = None
        self._reply_sock: socket.socket | None = None
        self._reply_addr: tuple[Any, ...] | None = None
        # receive-side counters: only the loop thread touches them
        self._packets = 0
        self._messages = 0
        self._malformed = 0
        self._handler_errors = 0
        self._receive_errors = 0
        self._refused = 0
        # send-side counters: any thread, so under a lock (`+=` is not atomic)
        self._send_lock = threading.Lock()
        self._sent = 0
        self._send_errors = 0
        self._encode_errors = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> OscBridge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the listening socket and open the reply socket; raises :class:`OscError`."""
        if self._transport is not None:
            raise OscError("the OSC bridge is already started")
        loop = asyncio.get_running_loop()
        where = f"OSC listen address {self._host}:{self._requested_port}"
        if not 0 <= self._requested_port <= 65535:
            raise OscError(f"{where}: the port must be in 0..65535")
        if not 1 <= self._reply_port <= 65535:
            raise OscError(f"OSC reply port {self._reply_port}: must be in 1..65535")
        family, sockaddr = _resolve(self._host, self._requested_port, where)
        reply_family, reply_addr = _resolve(
            self._reply_host, self._reply_port, f"OSC reply address {self._reply_host}"
        )
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise OscError(
                    f"cannot listen for OSC on {self._host}:{self._requested_port}: the port is "
                    "in use (another divergent, or another program?); choose another with "
                    "--osc-port"
                ) from None
            raise OscError(
                f"cannot listen for OSC on {self._host}:{self._requested_port}: {e.strerror}"
            ) from None
        sock.setblocking(False)
        reply_sock = socket.socket(reply_family, socket.SOCK_DGRAM)
        # Non-blocking: a full send buffer must drop a reply, never stall the sender thread.
        reply_sock.setblocking(False)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            reply_sock.close()
            raise
        self._closed = loop.create_future()
        self._transport = transport
        self._port = sock.getsockname()[1]
        self._reply_sock = reply_sock
        self._reply_addr = reply_addr
        log.debug(
            "OSC in on %s:%d, replies to %s:%d",
            self._host,
            self._port,
            self._reply_host,
            self._reply_port,
        )

    async def aclose(self) -> None:
        """Stop listening and close the reply socket; later sends are counted as errors."""
        sock, self._reply_sock = self._reply_sock, None
        if sock is not None:
            sock.close()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
            # asyncio closes the socket in a later loop callback: wait for it, so a caller
            # that ends the loop right after us leaves no unclosed socket behind.
            if self._closed is not None:
                await self._closed

    # --- properties ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when the bridge was asked for port 0)."""
        if self._port is None:
            raise OscError("the OSC bridge is not started")
        return self._port

    @property
    def reply_address(self) -> tuple[str, int]:
        """Where every reply goes, as configured."""
        return self._reply_host, self._reply_port

    @property
    def stats(self) -> OscStats:
        """A snapshot of the counters."""
        with self._send_lock:
            sent, send_errors, encode_errors = self._sent, self._send_errors, self._encode_errors
        return OscStats(
            packets=self._packets,
            messages=self._messages,
            malformed=self._malformed,
            handler_errors=self._handler_errors,
            receive_errors=self._receive_errors,
            sent=sent,
            send_errors=send_errors,
            encode_errors=encode_errors,
            refused=self._refused,
        )

    # --- sending -------------------------------------------------------------------------

    def send(self, address: str, *args: object) -> bool:
        """Send one message to the reply address; True when it was handed to the network.

        Safe from any thread. Never raises: an argument OSC cannot carry is counted in
        ``encode_errors`` (and logged), a socket error (no route, buffer full, the
        bridge closed) in ``send_errors``. UDP gives no delivery guarantee either way.
        """
        try:
            dgram = encode_message(address, args)
        except Exception as e:
            # A programming error, but raising here could kill the sender thread mid-
            # performance and leave notes hanging: count it and log it loudly instead.
            with self._send_lock:
                self._encode_errors += 1
                first = self._encode_errors == 1
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "cannot encode OSC %s %r: %s",
                address,
                args,
                e,
            )
            return False
        sock, addr = self._reply_sock, self._reply_addr
        try:
            if sock is None or addr is None:
                raise OSError(errno.EBADF, "the OSC bridge is closed")
            sock.sendto(dgram, addr)
        except OSError as e:
            with self._send_lock:
                self._send_errors += 1
                first = self._send_errors == 1
            # Logged once at warning level: a missing listener must not flood the log.
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cannot send OSC %s to %s:%d: %s",
                address,
                self._reply_host,
                self._reply_port,
                e,
            )
            return False
        with self._send_lock:
            self._sent += 1
        return True

    # --- receiving (in the loop) ---------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._packets += 1
        sender = (str(addr[0]), int(addr[1]))  # IPv6 addresses come as 4-tuples
        if self._allow and not allowed(sender[0], self._allow):
            self._refused += 1
            # the first is worth a warning; a scan or a flood must not flood the log
            log.log(
                logging.WARNING if self._refused == 1 else logging.DEBUG,
                "OSC from %s:%d ignored: not in the allow-list",
                *sender,
            )
            return
        try:
            messages = decode_packet(data)
        except OscPacketError as e:
            self._malformed += 1
            # The first is worth a warning; a flood of junk must not flood the log.
            log.log(
                logging.WARNING if self._malformed == 1 else logging.DEBUG,
                "malformed OSC packet from %s:%d (%d bytes): %s",
                *sender,
                len(data),
                e,
            )
            self._report(f"malformed OSC packet from {sender[0]}:{sender[1]}", e)
            return
        for msg in messages:
            self._messages += 1
            try:
                self._on_message(msg.address, tuple(msg.params), sender)
            except Exception as e:
                self._handler_errors += 1
                log.exception("OSC handler failed for %s", msg.address)
                self._report(f"handler for {msg.address} failed", e)

    def _report(self, what: str, exc: Exception) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(what, exc)
        except Exception:
            self._handler_errors += 1
            log.exception("OSC on_error callback failed")

    def _on_receive_error(self, exc: Exception) -> None:
        self._receive_errors += 1
        log.debug("OSC socket error: %s", exc)

    def _on_closed(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
