"""MQTT: telemetry out, control in, through any broker, without ever making the music wait.

:class:`MqttBridge` keeps one connection to a broker (aiomqtt) and, under the topic
prefix ``divergent/<instance>/``:

- publishes ``status`` (retained JSON), ``answer`` (JSON), ``error`` (plain UTF-8 text)
  and anything else through :meth:`MqttBridge.publish`;
- keeps ``online`` at ``"1"`` (retained) while connected, ``"0"`` after a clean close,
  and leaves a Last Will of ``"0"`` with the broker for a crash or a lost network;
- hands every message on ``control/#`` to ``on_control(param, payload)`` in the event
  loop, with ``param`` the rest of the topic (``divergence``, ``record/start``).

The ``publish_*`` methods never block and never raise: they only put the message in a
bounded buffer that a task drains while connected. Retained topics (the status) are
state, not events: only their latest value is kept, and all of them are published again
after every (re)connect, because a restarted broker without persistence forgets them.
Other messages wait in a bounded queue; when it is full the oldest is dropped (counted,
and logged at most every few seconds). Incoming controls wait in aiomqtt's bounded
inbound queue; what arrives while it is full is dropped unread, counted
(``inbound_dropped``) and logged the same way. :attr:`MqttBridge.stats` counts every
message dropped or refused either way (the server reports them in ``/divergent/stats``).
One supervisor task connects, reconnects with exponential backoff for as long as the
bridge is open, and logs an outage once.

:func:`parse_payload` turns a control payload into OSC-like arguments, so the server
validates MQTT controls exactly as it validates OSC ones.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt

from divergent.bridges.exceptions import MqttError

__all__ = ["MqttBridge", "MqttStats", "OnControl", "Payload", "PayloadError", "parse_payload"]

log = logging.getLogger("divergent.mqtt")
# aiomqtt and paho log connection details at DEBUG: under our name, so `divergent.*`
# logging settings cover them too.
_client_log = logging.getLogger("divergent.mqtt.client")

TOPIC_ROOT = "divergent"
ONLINE = "online"
CONTROL = "control"

OnControl = Callable[[str, bytes], None]
#: What :meth:`MqttBridge.publish` accepts: ``str`` and ``bytes`` go as they are,
#: anything else as JSON.
Payload = dict[str, Any] | list[Any] | str | bytes | int | float | bool | None

# Per-operation limit for aiomqtt (CONNACK, SUBACK, a publish that cannot be written):
# a half-open connection is given up after this instead of aiomqtt's 10 s default.
_OP_TIMEOUT = 5.0
# How long a clean close may spend flushing the last messages and saying "0" before the
# supervisor is cancelled (a broker that stopped answering must not stall shutdown).
_CLOSE_GRACE = 2.0
# Checked subtopics remembered per bridge (bounded: a caller could invent topics forever).
_TOPIC_CACHE_SIZE = 64
# A connection that lasted this long was stable: losing it starts a fresh backoff.
_STABLE_AFTER = 10.0
# At most one "still dropping" log line per this many seconds.
_DROP_LOG_INTERVAL = 10.0
# Topic levels are names, never wildcards; NUL is forbidden by the MQTT spec.
_TOPIC_UNSAFE = re.compile(r"[+#\x00]")
_INSTANCE_UNSAFE = re.compile(r"[/+#\s\x00]")
# Plain-text numbers: what a person types into mosquitto_pub or a dashboard. Stricter than
# int()/float(), which would also accept "1_000", "nan" and "infinity".
_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


class PayloadError(ValueError):
    """A control payload cannot be read as arguments (not UTF-8, a JSON object...)."""


@dataclass(frozen=True)
class MqttStats:
    """Counters since the bridge was created (a snapshot; read :attr:`MqttBridge.stats`)."""

    published: int = 0
    """Messages handed to the broker connection (online/status included)."""
    dropped: int = 0
    """Messages lost: queue overflow, a publish cut by a lost connection, or after close."""
    reconnects: int = 0
    """Connections established after the first one."""
    connect_failures: int = 0
    """Connection attempts that failed, and established connections that were lost."""
    controls: int = 0
    """Control messages handed to ``on_control``."""
    malformed: int = 0
    """Control messages refused: no parameter name, or ``on_control`` raised PayloadError."""
    handler_errors: int = 0
    """Control messages whose ``on_control`` raised anything else."""
    ignored_retained: int = 0
    """Retained control messages ignored (stale commands replayed by the broker)."""
    encode_errors: int = 0
    """Publishes refused because of a bad subtopic or a payload JSON cannot carry."""
    inbound_dropped: int = 0
    """Incoming messages dropped unread: the client's bounded inbound queue was full
    (they arrived faster than the loop took them)."""

    @property
    def in_dropped(self) -> int:
        """Incoming control messages that were not applied by the bridge: dropped unread
        (queue full), retained (ignored), malformed, or whose handler failed."""
        return self.inbound_dropped + self.ignored_retained + self.malformed + self.handler_errors

    @property
    def out_dropped(self) -> int:
        """Outgoing messages lost: dropped from the queue, cut by a lost connection, or
        refused before queueing (bad subtopic, a payload JSON cannot carry)."""
        return self.dropped + self.encode_errors


# --- payloads ----------------------------------------------------------------------------


def parse_payload(payload: bytes) -> list[object]:
    """The arguments a control payload carries, in the shapes OSC would deliver them.

    - empty (or only whitespace, or JSON ``null``) → ``[]``;
    - a JSON array → its items, which must be numbers, strings or booleans;
    - a JSON number, string or boolean → ``[value]`` (booleans stay ``bool``);
    - anything else is plain UTF-8 text: ``[int]`` or ``[float]`` when it reads as a
      number (``+5``, ``.5``), otherwise ``[text]`` (one string, spaces and all).

    Raises :class:`PayloadError` for invalid UTF-8, a JSON object, nested arrays and
    numbers that are not finite.
    """
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise PayloadError(
            f"payload is not UTF-8 text (byte 0x{payload[e.start]:02x} at offset {e.start}); "
            "send a number, a string or a JSON array"
        ) from None
    if not text:
        return []
    try:
        # parse_constant: Python's json reads NaN/Infinity, which are not JSON; as text they
        # fall through to the plain-text path and arrive as strings the validator refuses.
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return [_plain_text(text)]
    if value is None:
        return []
    if isinstance(value, list):
        return [_json_arg(item, inside_array=True) for item in value]
    return [_json_arg(value, inside_array=False)]


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_arg(value: object, *, inside_array: bool) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        raise PayloadError(f"{value} is not a finite number")
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        raise PayloadError(
            "a JSON object is not a control value; send a number, a string or a JSON array of them"
        )
    where = "inside a JSON array " if inside_array else ""
    kind = "null" if value is None else "an array" if isinstance(value, list) else repr(value)
    raise PayloadError(f"{kind} is not allowed {where}(only numbers, strings and booleans)")


def _plain_text(text: str) -> object:
    if _INT_TEXT.fullmatch(text):
        return int(text)
    if _FLOAT_TEXT.fullmatch(text):
        number = float(text)
        if not math.isfinite(number):
            raise PayloadError(f"{text} is not a finite number")
        return number
    return text


def _json_default(obj: object) -> object:
    # numpy scalars and arrays (a readout may hold them) without importing numpy here
    for method in ("item", "tolist"):
        convert = getattr(obj, method, None)
        if callable(convert):
            return convert()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# Built once: json.dumps with any option builds a new encoder per call, which is a good
# part of a publish call's cost. An encoder holds only its options (no state between calls).
# allow_nan=False: NaN is not JSON, and most consumers (Node-RED, browsers) reject it.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_json_default)


def _encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return _JSON.encode(payload).encode("utf-8")


def _describe(e: BaseException) -> str:
    # aiomqtt's messages ("Disconnected during message iteration") hide the cause ("[code:7]
    # The connection was lost") in __cause__: both belong in the one log line of an outage.
    text = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


class _Throttle:
    """Counts repeated events and says when to log: the first at once, then a summary
    at most every ``interval`` seconds (a broker outage must not write a line per drop)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: float | None = None
        self._pending = 0

    def hit(self) -> int | None:
        """Count one event; returns how many to report now (this one included), or None."""
        self._pending += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return None
        self._last = now
        count, self._pending = self._pending, 0
        return count

    def flush(self) -> int:
        """Events counted but not reported yet (the tail of a burst); resets the count."""
        count, self._pending = self._pending, 0
        return count


# --- the bridge ----------------------------------------------------------------------------


class MqttBridge:
    """One broker connection for one server instance; ``async with MqttBridge(...) as m:``.

    Entering starts the supervisor task and returns at once, connected or not: the
    server must start even when the broker is down. ``on_control(param, payload)`` runs
    in the event loop; a :class:`PayloadError` it raises is counted as ``malformed`` and
    reported on the ``error`` topic, anything else is logged and counted. Raises
    :class:`~bridges.exceptions.MqttError` for a configuration that can never work.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 1883,
        instance: str = "default",
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        cafile: str | None = None,
        on_control: OnControl,
        queue_size: int = 256,
        backoff: tuple[float, float] = (0.5, 5.0),
        client_id: str | None = None,
        keepalive: int = 10,
    ) -> None:
        if not host or not host.strip():
            raise MqttError("MQTT broker host is empty (give HOST or HOST:PORT)")
        if not 1 <= port <= 65535:
            raise MqttError(f"MQTT broker port {port}: must be in 1..65535")
        if not instance or _INSTANCE_UNSAFE.search(instance):
            raise MqttError(
                f"MQTT instance name {instance!r}: must be a non-empty topic level "
                "without '/', '+', '#' or spaces"
            )
        if password is not None and username is None:
            raise MqttError("an MQTT password needs a user name")
        if queue_size < 1:
            raise MqttError(f"MQTT queue size {queue_size}: must be at least 1")
        low, high = backoff
        if not (0 < low <= high and math.isfinite(high)):
            raise MqttError(f"MQTT backoff {backoff}: needs 0 < min <= max (seconds)")
        if keepalive < 1:
            raise MqttError(f"MQTT keepalive {keepalive}: must be at least 1 second")
        if client_id is not None and not client_id:
            raise MqttError("MQTT client id is empty (leave it out for a random one)")
        self._tls_context: ssl.SSLContext | None = None
        if tls:
            try:
                self._tls_context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as e:
                raise MqttError(f"cannot load MQTT CA file {cafile!r}: {e}") from None
        elif cafile is not None:
            # Probably meant TLS: say so rather than send a password in clear text silently.
            log.warning("MQTT cafile %s is ignored because TLS is off", cafile)
        self._host = host.strip()
        self._port = port
        self._instance = instance
        self._username = username
        self._password = password
        self._on_control = on_control
        self._queue_size = queue_size
        self._backoff = (float(low), float(high))
        self._keepalive = keepalive
        # Random suffix: two servers started with the same instance name must not take
        # each other's session over forever (the broker drops the older same-id client).
        self._client_id = client_id or f"divergent-{instance}-{secrets.token_hex(3)}"
        self._prefix = f"{TOPIC_ROOT}/{instance}/"
        self._online_topic = self._prefix + ONLINE
        self._control_prefix = self._prefix + CONTROL + "/"

        # Outgoing, touched only in the loop thread (other threads hop over first).
        # Why a deque and not asyncio.Queue: dropping the oldest is one popleft, and the
        # publisher waits for either kind of work (events or retained state) on one Event.
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._retained: dict[str, bytes] = {}  # topic → latest payload, re-sent on connect
        self._dirty: dict[str, None] = {}  # retained topics not yet sent (ordered set)
        self._wake = asyncio.Event()
        # subtopic → checked full topic: the server publishes to a handful of topics
        self._topics: dict[str, str] = {}
        self._drop_log = _Throttle(_DROP_LOG_INTERVAL)
        self._malformed_log = _Throttle(_DROP_LOG_INTERVAL)
        self._encode_log = _Throttle(_DROP_LOG_INTERVAL)
        self._inbound_log = _Throttle(_DROP_LOG_INTERVAL)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._up = asyncio.Event()
        self._closed = False
        self._down_since: float | None = None  # start of the current outage, for the log
        self._up_since = 0.0  # start of the current connection
        self._outage_logged = False  # a warning announced the current outage

        self._published = 0
        self._dropped = 0
        self._connects = 0
        self._connect_failures = 0
        self._controls = 0
        self._malformed = 0
        self._handler_errors = 0
        self._ignored_retained = 0
        self._encode_errors = 0
        self._inbound_dropped = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> MqttBridge:
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
        """Start the supervisor task; returns at once (see :meth:`wait_connected`)."""
        if self._closed:
            raise MqttError("the MQTT bridge is closed; create a new one")
        if self._task is not None:
            raise MqttError("the MQTT bridge is already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self._loop.create_task(self._supervise(), name=f"mqtt-{self._instance}")

    async def aclose(self) -> None:
        """Flush what is queued, publish ``online`` = "0" and disconnect (at most ~2 s).

        Later publishes are dropped and counted. Safe to call more than once.
        """
        self._closed = True
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            done, _ = await asyncio.wait({task}, timeout=_CLOSE_GRACE)
            if not done:
                log.warning(
                    "MQTT broker did not let the bridge close within %.1f s; dropping "
                    "the connection",
                    _CLOSE_GRACE,
                )
            # Cancel until it ends: on Python 3.11, asyncio.wait_for (inside aiomqtt's
            # publish) swallows a cancellation that arrives as its operation completes.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        except asyncio.CancelledError:
            task.cancel()  # our caller gave up: leave no supervisor running behind it
            raise
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("MQTT supervisor ended with an error: %s", exc)
        self._log_unreported()

    def _log_unreported(self) -> None:
        # the tail of a burst the throttled lines did not report yet: said once, at close
        for throttle, what in (
            (self._drop_log, "outgoing MQTT messages dropped"),
            (self._inbound_log, "incoming MQTT messages dropped unread (queue full)"),
            (self._malformed_log, "malformed MQTT controls"),
            (self._encode_log, "MQTT publishes refused"),
        ):
            count = throttle.flush()
            if count:
                log.warning("%d more %s since the last such line", count, what)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected (and subscribed); False when ``timeout`` passes first."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    # --- properties ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected to the broker and subscribed to the control topics."""
        return self._up.is_set()

    @property
    def topic_prefix(self) -> str:
        """``divergent/<instance>/``: every topic of this bridge starts with it."""
        return self._prefix

    @property
    def client_id(self) -> str:
        """The MQTT client identifier this bridge connects with."""
        return self._client_id

    @property
    def stats(self) -> MqttStats:
        """A snapshot of the counters."""
        return MqttStats(
            published=self._published,
            dropped=self._dropped,
            reconnects=max(0, self._connects - 1),
            connect_failures=self._connect_failures,
            controls=self._controls,
            malformed=self._malformed,
            handler_errors=self._handler_errors,
            ignored_retained=self._ignored_retained,
            encode_errors=self._encode_errors,
            inbound_dropped=self._inbound_dropped,
        )

    # --- publishing (never blocks, never raises) -----------------------------------------

    def publish_status(self, status: dict[str, Any]) -> None:
        """Retained JSON at ``status``; the latest one is sent again after every reconnect."""
        self.publish("status", status, retain=True)

    def publish_answer(self, readout: dict[str, Any]) -> None:
        """JSON at ``answer`` (not retained: an answer is an event, not a state)."""
        self.publish("answer", readout)

    def publish_error(self, message: str) -> None:
        """Plain UTF-8 text at ``error`` (not retained)."""
        self.publish("error", message)

    def publish(self, subtopic: str, payload: Payload, *, retain: bool = False) -> None:
        """Queue ``payload`` for ``divergent/<instance>/<subtopic>``; returns at once.

        ``str``/``bytes`` go as they are, anything else as compact JSON. With ``retain``
        only the latest payload per topic is kept, and it is re-sent on every reconnect.
        Safe from any thread. Never raises: a bad subtopic or a payload JSON cannot carry
        is logged and counted in ``encode_errors``; a full queue drops its oldest message.
        """
        try:
            topic = self._topic(subtopic)
            data = _encode(payload)
        except Exception as e:
            # A programming error (or a payload object whose conversion fails), but raising
            # into the server could stop the music for a dashboard's sake: count it and log
            # it loudly, at most every few seconds.
            self._encode_errors += 1
            count = self._encode_log.hit()
            if count is not None:
                self._log_soon(
                    logging.ERROR,
                    "cannot publish MQTT %r: %s (%d such errors since the last such line)",
                    subtopic,
                    e,
                    count,
                )
            return
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            try:
                loop.call_soon_threadsafe(self._enqueue, topic, data, retain)
            except RuntimeError:  # the loop is closed: nobody will ever send it
                self._drop(topic, "the event loop is closed")
            return
        self._enqueue(topic, data, retain)

    def _topic(self, subtopic: str) -> str:
        topic = self._topics.get(subtopic)
        if topic is not None:
            return topic
        if (
            not subtopic
            or subtopic.startswith("/")
            or subtopic.endswith("/")
            or _TOPIC_UNSAFE.search(subtopic)
        ):
            raise ValueError(
                "the subtopic must be non-empty, without '+', '#', NUL or a leading/trailing '/'"
            )
        first = subtopic.split("/", 1)[0]
        if first in (ONLINE, CONTROL):
            # online belongs to the connection; control/... would loop back into on_control
            raise ValueError(f"'{first}' topics are reserved for the bridge itself")
        topic = self._prefix + subtopic
        if len(self._topics) < _TOPIC_CACHE_SIZE:
            self._topics[subtopic] = topic
        return topic

    def _enqueue(self, topic: str, data: bytes, retain: bool) -> None:
        if self._closed:
            self._drop(topic, "the bridge is closed")
            return
        if retain:
            if topic not in self._retained and len(self._retained) >= self._queue_size:
                self._drop(topic, f"more than {self._queue_size} retained topics")
                return
            self._retained[topic] = data
            self._dirty[topic] = None
        else:
            if len(self._outbox) >= self._queue_size:
                old_topic, _ = self._outbox.popleft()
                self._drop(old_topic, f"the queue is full ({self._queue_size}); dropped the oldest")
            self._outbox.append((topic, data))
        self._wake.set()

    def _drop(self, topic: str, why: str) -> None:
        self._dropped += 1
        count = self._drop_log.hit()
        if count is not None:
            state = "connected" if self.connected else "not connected"
            self._log_soon(
                logging.WARNING,
                "MQTT message to %s not sent: %s (%s; %d dropped "
                "since the last such line, %d in all)",
                topic,
                why,
                state,
                count,
                self._dropped,
            )

    def _log_soon(self, level: int, msg: str, *args: object) -> None:
        # A log line costs a few hundred µs (handlers, formatting, I/O): on the loop it is
        # written just after the publish call that caused it, not inside it.
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and not loop.is_closed():
            loop.call_soon(log.log, level, msg, *args)
        else:
            log.log(level, msg, *args)

    def _next_outgoing(self) -> tuple[str, bytes, bool] | None:
        # Retained state first: it is small (one entry per topic) and what dashboards show.
        if self._dirty:
            topic = next(iter(self._dirty))
            del self._dirty[topic]
            return topic, self._retained[topic], True
        if self._outbox:
            topic, data = self._outbox.popleft()
            return topic, data, False
        return None

    # --- the connection ------------------------------------------------------------------

    async def _supervise(self) -> None:
        low, high = self._backoff
        delay = low
        last_reason: str | None = None
        while not self._stopping.is_set():
            connects = self._connects
            try:
                await self._session()
                return  # a clean close
            except aiomqtt.MqttError as e:
                reason = _describe(e)
            except Exception as e:
                # A bug here or in aiomqtt must not end telemetry for the rest of the night.
                reason = f"{type(e).__name__}: {e}"
                if reason != last_reason:
                    log.exception("MQTT connection failed unexpectedly")
            self._connect_failures += 1
            now = time.monotonic()
            if self._connects > connects:
                # A connection that lasted is a fresh outage: start again from the shortest
                # delay. One that dropped at once (another client with our id, an ACL that
                # refuses the subscription) must not turn into a reconnect storm.
                stable = now - self._up_since >= _STABLE_AFTER
                if stable:
                    delay = low
                self._down_since = now
                announce = stable or reason != last_reason
                what = "lost the connection to"
            else:
                if self._down_since is None:
                    self._down_since = now
                announce = reason != last_reason
                what = "cannot connect to"
            last_reason = reason
            if announce:
                # Once per outage, and again only if the reason changes (refused → bad
                # password): a retry every few seconds must not fill the log.
                self._outage_logged = True
                log.warning(
                    "%s the MQTT broker %s:%d (%s); retrying every %g-%g s in the background",
                    what,
                    self._host,
                    self._port,
                    reason,
                    low,
                    high,
                )
            else:
                log.debug(
                    "%s the MQTT broker %s:%d again: %s", what, self._host, self._port, reason
                )
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
                return  # closed while waiting
            except TimeoutError:
                delay = min(delay * 2, high)

    def _client(self) -> aiomqtt.Client:
        # A fresh client per attempt: aiomqtt's Client can be re-entered, but after a lost
        # connection its "connected" future stays resolved, so the next attempt would not
        # wait for the new CONNACK (a refused login would go unnoticed).
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            logger=_client_log,
            will=aiomqtt.Will(self._online_topic, b"0", qos=1, retain=True),
            timeout=_OP_TIMEOUT,
            keepalive=self._keepalive,
            tls_context=self._tls_context,
            max_queued_incoming_messages=self._queue_size,
            queue_type=self._inbound_queue_type(),
        )

    def _inbound_queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """aiomqtt's inbound queue, with its drops counted here.

        aiomqtt puts each incoming message with ``put_nowait`` (in the loop: paho reads
        the socket from a loop callback) and, when the queue is full, logs one line per
        message and forgets it: a flood then writes hundreds of lines and no count. This
        queue counts the drop and logs it at most every few seconds instead, and tells
        aiomqtt nothing (it would only log again).
        """
        bridge = self

        class _CountedInbound(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                try:
                    super().put_nowait(item)
                except asyncio.QueueFull:
                    bridge._inbound_full(item)

        return _CountedInbound

    def _inbound_full(self, message: aiomqtt.Message) -> None:
        self._inbound_dropped += 1
        count = self._inbound_log.hit()
        if count is not None:
            log.warning(
                "MQTT message on %s dropped unread: the inbound queue is full (%d); "
                "%d dropped since the last such line, %d in all",
                message.topic.value,
                self._queue_size,
                count,
                self._inbound_dropped,
            )

    async def _session(self) -> None:
        """One connection, from connect to a clean close (returns) or an error (raises)."""
        client = self._client()
        async with client:
            # subscribed first: "online" = "1" then means "controls are heard"
            await client.subscribe(self._control_prefix + "#", qos=1)
            await client.publish(self._online_topic, b"1", retain=True)
            self._connected_now()
            try:
                await self._serve(client)
            finally:
                self._up.clear()
            # Closing cleanly: flush what the server said last (its final status), then
            # "0", because the broker sends no will after a clean DISCONNECT.
            await self._flush(client)
            await client.publish(self._online_topic, b"0", retain=True)
            self._published += 1
        log.info("MQTT bridge closed (%s)", self._prefix.rstrip("/"))

    def _connected_now(self) -> None:
        self._connects += 1
        self._published += 1  # the "1" on online
        # Everything retained goes out again: a broker restarted without persistence has
        # forgotten it, and dashboards subscribing later need the current state.
        for topic in self._retained:
            self._dirty[topic] = None
        self._up.set()
        self._wake.set()
        now = time.monotonic()
        self._up_since = now
        down_since, self._down_since = self._down_since, None
        down = "" if down_since is None else f" after {now - down_since:.1f} s"
        if self._connects == 1 or self._outage_logged:
            log.log(
                logging.INFO if self._connects == 1 else logging.WARNING,
                "MQTT %sconnected to %s:%d%s as %s (topics %s#)",
                "" if self._connects == 1 else "re",
                self._host,
                self._port,
                down,
                self._client_id,
                self._prefix,
            )
        else:
            log.debug("MQTT reconnected to %s:%d%s", self._host, self._port, down)
        self._outage_logged = False

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Run the publisher and the receiver until the bridge closes or one of them fails."""
        ended = asyncio.Event()
        tasks = [
            asyncio.create_task(self._publish_loop(client, ended), name="mqtt-publish"),
            asyncio.create_task(self._receive_loop(client), name="mqtt-receive"),
            asyncio.create_task(self._stopping.wait(), name="mqtt-stopping"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The flag and the wake-up as well as the cancel: a cancellation can be swallowed
            # (see aclose), and the publisher must not outlive its connection.
            ended.set()
            self._wake.set()
            for t in tasks:
                t.cancel()
            # Collect every outcome so no "exception was never retrieved" is left behind.
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and (exc := t.exception()) is not None:
                raise exc

    async def _publish_loop(self, client: aiomqtt.Client, ended: asyncio.Event) -> None:
        while True:
            await self._wake.wait()
            if ended.is_set():
                return  # what is left goes out on the next connection (or the clean close)
            # Cleared before draining: a publish arriving during the drain sets it again.
            self._wake.clear()
            await self._flush(client)

    async def _flush(self, client: aiomqtt.Client) -> None:
        while (item := self._next_outgoing()) is not None:
            topic, data, retain = item
            # Counted when handed over: paho queues it at once, and writes it even if this
            # task is cancelled (the bridge closing) while aiomqtt waits for the write.
            self._published += 1
            try:
                await client.publish(topic, data, qos=0, retain=retain)
            except aiomqtt.MqttError:
                self._published -= 1
                if retain:
                    self._dirty[topic] = None  # state: it goes out again after reconnect
                else:
                    self._drop(topic, "the connection was lost while sending")
                raise

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._handle(message)
        raise aiomqtt.MqttError("the broker's message stream ended")

    def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        # "control/#" also matches the bare "control" topic, which names no parameter
        prefixed = topic.startswith(self._control_prefix)
        param = topic[len(self._control_prefix) :] if prefixed else ""
        if message.retain:
            # The broker replays retained messages on every subscribe: a retained
            # "record/start" would restart the take after each reconnect. Commands are live.
            self._ignored_retained += 1
            log.log(
                logging.WARNING if self._ignored_retained == 1 else logging.DEBUG,
                "ignoring retained MQTT control message on %s (publish controls "
                "without the retain flag)",
                topic,
            )
            return
        if not param:
            self._malformed_control(topic, "no parameter after control/")
            return
        payload = message.payload
        if not isinstance(payload, bytes):  # paho always gives bytes; the type allows more
            payload = str(payload).encode() if payload is not None else b""
        self._controls += 1
        try:
            self._on_control(param, payload)
        except PayloadError as e:
            self._malformed_control(topic, str(e))
        except Exception:
            self._handler_errors += 1
            log.exception("MQTT control handler failed for %s", topic)

    def _malformed_control(self, topic: str, why: str) -> None:
        self._malformed += 1
        count = self._malformed_log.hit()
        if count is not None:
            log.warning(
                "malformed MQTT control on %s: %s (%d since the last such line)", topic, why, count
            )
        self.publish_error(f"{topic}: {why} (rejected)")
