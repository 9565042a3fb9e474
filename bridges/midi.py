"""MIDI ports through python-rtmidi, with mido messages on the Python side.

The backend (JACK, ALSA, CoreMIDI, Windows MM) is always chosen explicitly: rtmidi's and
mido's defaults try ALSA first, which raises ``SystemError`` on machines without a sound
card even when a JACK server runs.

Ports are opened with python-rtmidi directly rather than through mido's port classes for
three reasons: mido turns every port opened with a ``client_name`` into a *virtual* port
(so it cannot connect to an existing port under our client name), it lets timing messages
through only by accident of its defaults, and its callback runs after parsing, so the
arrival time would be stamped late. Here the rtmidi callback stamps ``time.monotonic()``
first, then parses with mido.

JACK facts (rtmidi 1.5.8 / jackd2 1.9.21): every rtmidi ``MidiIn``/``MidiOut`` is its own
JACK client, and a duplicate client name gets a ``-01``, ``-02`` ... suffix, so with the
default names the ports appear as ``divergent:divergent in`` and
``divergent-01:divergent out``. :class:`MidiIO` reports the names JACK actually gave.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import mido
import rtmidi

from divergent.bridges.exceptions import BridgeError, MidiBackendError, MidiPortError
from divergent.bridges.jack import XrunWatch, jack_period_s, jack_running

__all__ = [
    "MIDI_BACKENDS",
    "MidiEvent",
    "MidiIO",
    "choose_backend",
    "list_ports",
    "mido_backend",
]

log = logging.getLogger(__name__)

MIDI_BACKENDS = ("jack", "alsa", "coremidi", "winmm")

# our backend names -> rtmidi API names (mido's backend strings use the same names)
_RTMIDI_API_NAMES = {
    "jack": "UNIX_JACK",
    "alsa": "LINUX_ALSA",
    "coremidi": "MACOSX_CORE",
    "winmm": "WINDOWS_MM",
}

_JACK_HELP = (
    "JACK server not running? start one: jackd -d dummy -r 48000 -p 64 & "
    "(or a real one with qjackctl), or choose another MIDI backend"
)
_ALSA_HELP = (
    "ALSA sequencer unavailable (no /dev/snd/seq: no sound card, or the snd-seq module is "
    "not loaded). On a headless Linux machine start JACK (jackd -d dummy -r 48000 -p 64 &) "
    "and use the jack backend, or use the OSC note transport"
)
# The ALSA sequencer's device: there (and ours to open) or not. Asked before each retry,
# because a failed open makes libasound print a line on stderr every time.
_ALSA_SEQ = "/dev/snd/seq"
# What our input drops: sysex (big, unused), not timing (we follow MIDI clock), active sensing
_IGNORED_INPUT = {"sysex": True, "timing": False, "active_sense": True}
# Registering our JACK clients again while what they send does not come back (see
# MidiIO._open_checked): how often at most.
_OPEN_TRIES = 5
# The loopback check's message: a SysEx under the MIDI spec's non-commercial ID (0x7D),
# which instruments ignore, and how long it may take (two JACK periods, generously).
_PROBE = [0xF0, 0x7D, 0x64, 0x76, 0x00, 0xF7]
_PROBE_WAIT_S = 0.3
# what appears when MIDI comes up after a start without it
_SYSTEM_NAMES = {"jack": "the JACK server", "alsa": "the ALSA sequencer"}
_WINMM_VIRTUAL_HELP = (
    "Windows MIDI has no virtual ports: install loopMIDI, create a port there and pass its "
    "name (in_name/out_name), or use the OSC note transport"
)


def _api(backend: str) -> int:
    api: int = getattr(rtmidi, "API_" + _RTMIDI_API_NAMES[backend])
    return api


def _known(backend: str) -> str:
    name = backend.strip().lower()
    if name not in MIDI_BACKENDS:
        raise MidiBackendError(
            f"unknown MIDI backend {backend!r}: choose one of {', '.join(MIDI_BACKENDS)}"
        )
    return name


def _validate(backend: str) -> str:
    name = _known(backend)
    if _api(name) not in rtmidi.get_compiled_api():
        compiled = [rtmidi.get_api_name(a) for a in rtmidi.get_compiled_api()]
        raise MidiBackendError(
            f"python-rtmidi on this machine was built without the {name} backend "
            f"(it has: {', '.join(compiled) or 'none'})"
        )
    return name


def choose_backend(
    requested: str | None = None,
    *,
    platform: str | None = None,
    jack_up: bool | None = None,
) -> str:
    """The MIDI backend to use: ``requested`` when given (validated), else the platform's.

    Automatic choice: JACK when a JACK server runs on Linux, else ALSA; CoreMIDI on macOS;
    Windows MM on Windows. ``"auto"`` means the same as ``None``. ``platform`` (a
    ``sys.platform`` value) and ``jack_up`` override what is detected, for tests.

    Raises :class:`MidiBackendError` for an unknown name or one python-rtmidi lacks.
    """
    if requested is not None and requested.strip().lower() != "auto":
        return _validate(requested)
    plat = sys.platform if platform is None else platform
    if plat.startswith("darwin"):
        return "coremidi"
    if plat.startswith(("win32", "cygwin")):
        return "winmm"
    # Linux and the BSDs: JACK when it runs (it also works without a sound card)
    up = jack_running() if jack_up is None else jack_up
    return "jack" if up else "alsa"


def mido_backend(name: str) -> mido.Backend:
    """mido's rtmidi backend for ``name`` (e.g. ``mido.backends.rtmidi/UNIX_JACK``).

    Never mido's default backend: it tries ALSA first and fails where there is no sound
    card. Loading is lazy, so this does not touch the MIDI system yet.
    """
    return mido.Backend(f"mido.backends.rtmidi/{_RTMIDI_API_NAMES[_validate(name)]}")


def _backend_error(backend: str, err: Exception) -> MidiBackendError:
    if backend == "jack":
        return MidiBackendError(f"{_JACK_HELP} ({err})")
    if backend == "alsa":
        return MidiBackendError(f"{_ALSA_HELP} ({err})")
    return MidiBackendError(f"{backend} MIDI unavailable: {err}")


def _make(kind: Any, backend: str, client: str, **kwargs: Any) -> Any:
    try:
        return kind(_api(backend), name=client, **kwargs)
    except rtmidi.RtMidiError as e:
        raise _backend_error(backend, e) from e


def _delete(port: Any) -> None:
    # the "delete" of rtmidi objects closes the JACK/ALSA client right away instead of
    # waiting for the garbage collector
    port.close_port()
    port.delete()


def list_ports(backend: str) -> dict[str, list[str]]:
    """The ports other programs offer: ``{"inputs": [...], "outputs": [...]}``.

    ``inputs`` are ports we can receive from (their outputs), ``outputs`` ports we can
    send to. Raises :class:`MidiBackendError` with a hint when the backend cannot start.
    """
    backend = _validate(backend)
    midi_in = _make(rtmidi.MidiIn, backend, "divergent-list")
    try:
        midi_out = _make(rtmidi.MidiOut, backend, "divergent-list")
        try:
            return {
                "inputs": list(midi_in.get_ports()),
                "outputs": list(midi_out.get_ports()),
            }
        finally:
            _delete(midi_out)
    finally:
        _delete(midi_in)


def _match_port(wanted: str, available: list[str], direction: str) -> int:
    """Index of the port named ``wanted``: exact name, else a unique (case-blind) substring."""
    if wanted in available:
        return available.index(wanted)
    hits = [i for i, name in enumerate(available) if wanted.lower() in name.lower()]
    if len(hits) == 1:
        return hits[0]
    listing = "\n  ".join(available) if available else "(none)"
    if not hits:
        raise MidiPortError(f"no MIDI {direction} port matches {wanted!r}; available:\n  {listing}")
    names = ", ".join(repr(available[i]) for i in hits)
    raise MidiPortError(
        f"MIDI {direction} port name {wanted!r} is ambiguous ({names}); give more of the "
        f"name. Available:\n  {listing}"
    )


class ArrivalClock:
    """Arrival times of polled MIDI input on ``time.monotonic()``'s clock.

    rtmidi stamps each input message with the time since the previous one, measured in
    its own thread (with JACK: ``jack_get_time()``, CLOCK_MONOTONIC microseconds). Their
    running sum is exact up to a constant; the constant is the smallest "poll time minus
    sum" seen so far (a poll never happens before the arrival), allowed to creep up by
    ``drift`` seconds per second so a backend clock that drifts is followed.
    """

    def __init__(self, *, drift: float = 2e-5) -> None:
        self.drift = drift
        self._sum = 0.0
        self._offset: float | None = None
        self._last_poll = 0.0

    def stamp(self, delta: float, polled: float) -> float:
        """The arrival time of a message with rtmidi delta ``delta``, polled at ``polled``."""
        self._sum += max(0.0, delta)
        candidate = polled - self._sum
        if self._offset is None:
            self._offset = candidate
        else:
            self._offset = min(self._offset + self.drift * (polled - self._last_poll), candidate)
        self._last_poll = polled
        return self._offset + self._sum


@dataclass(frozen=True, slots=True)
class MidiEvent:
    """One incoming MIDI message and its arrival time (``time.monotonic()`` seconds).

    The time is rtmidi's own arrival stamp (see :class:`ArrivalClock`): with JACK, the
    JACK period that carried the message, whenever Python got to read it.
    """

    time: float
    message: mido.Message


class MidiIO:
    """One MIDI input and one MIDI output, virtual or connected to existing ports.

    The input passes MIDI clock, start/continue/stop and song position (the server can
    follow a clock master); it drops sysex and active sensing. ``on_event`` runs on a
    small polling thread of ours, so it must return quickly; the server hands events on
    with ``loop.call_soon_threadsafe``.

    Why poll instead of rtmidi's callback: with JACK the callback runs in JACK's
    real-time process thread, which then has to take Python's GIL. Whenever another
    thread holds it (the event loop, the inference worker, the sender's final spin) the
    whole JACK graph misses its 1.33 ms deadline: an xrun, and MIDI events are lost
    (measured: 11 of 20,000 in an input flood). Polled, the JACK thread only fills
    rtmidi's queue and never waits for Python.
    """

    def __init__(
        self,
        *,
        backend: str,
        client_name: str = "divergent",
        in_name: str | None = None,
        out_name: str | None = None,
        virtual_in: str = "divergent in",
        virtual_out: str = "divergent out",
        on_event: Callable[[MidiEvent], object],
        on_xrun: Callable[[], object] | None = None,
        on_state: Callable[[str, str], object] | None = None,
        supervise: bool = False,
        wait_for_ports: bool = False,
        wait_for_systems: tuple[str, ...] = ("jack",),
        retry_s: float = 0.25,
    ) -> None:
        # only the name here: whether rtmidi has the backend is open()'s question
        self.backend = _known(backend)
        self.client_name = client_name
        self.in_name = in_name
        self.out_name = out_name
        self.virtual_in = virtual_in
        self.virtual_out = virtual_out
        self.on_event = on_event
        # With JACK: called (on a thread of ours) after each xrun, when JACK dropped a
        # cycle's events; the sender then repeats its recent note-offs.
        self.on_xrun = on_xrun
        self.xrun_watch: XrunWatch | None = None
        # Coming back (``supervise``): a watchdog thread notices the JACK server going away
        # or a named port disappearing, calls ``on_state("lost", why)``, retries every
        # ``retry_s`` and calls ``on_state("back", what)`` once the ports are open (and
        # the named ones connected) again. ``on_state`` runs on that thread: hand it on.
        # ``wait_for_ports``: what is missing at open() is waited for, not an error: a
        # named port, and (with ``supervise``, on a backend in ``wait_for_systems``) the
        # MIDI system itself, so a server started before JACK opens its ports when JACK
        # appears. ALSA is there only when asked for: a caller that chose it explicitly
        # waits for the sequencer (a USB interface plugged in later brings it), one that
        # fell back to it wants the error, to try JACK instead.
        # News the watchdog has before anyone listens (on_state set after open()) is kept
        # and handed over when on_state is set: a "back" right after open() is not lost.
        self._notify_lock = threading.Lock()
        self._held: deque[tuple[str, str]] = deque(maxlen=8)
        self.notices_dropped = 0
        self._on_state = on_state
        self.supervise = supervise
        self.wait_for_ports = wait_for_ports
        self.wait_for_systems = wait_for_systems
        self.retry_s = retry_s
        self.fault = ""  # why MIDI does not fully work right now ("" when it does)
        # The MIDI system's period in seconds, read whenever the ports open (JACK delivers
        # MIDI once per period, so the sender sends half of one early); None without one
        # (ALSA, CoreMIDI, Windows MM), before the ports first open, or when unreadable.
        self.period_s: float | None = None
        self.losses = 0
        self.returns = 0
        self.reregistrations = 0  # our clients registered again: their MIDI did not pass
        self._ever_open = False  # a first opening after a start without JACK is no "return"
        self.dropped_while_down = 0  # messages the sender gave us while the output was gone
        self._server_down = False
        self._pending_in = False
        self._pending_out = False
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self.malformed = 0
        self.callback_errors = 0
        # python-rtmidi is a Cython module without type information: its objects are Any
        self._in: Any = None
        self._out: Any = None
        self._opening = False  # an opening under way: its ports may yet be registered again
        self._held_probe: Any = None  # _jack_probe's client, kept while ours register
        self._input_name: str | None = None
        self._output_name: str | None = None
        # With JACK and the watch's client: our ports are always our own virtual ones
        # (checked like any), and named ports are connected to them through JACK; their
        # full names here (None where rtmidi connected a named port itself)
        self._own_in: str | None = None
        self._own_out: str | None = None
        self._via_jack = False
        self._send_lock = threading.Lock()
        self._poll_stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Poll every 0.5 ms while MIDI flows, every 2 ms after a second of silence: an idle
        # server polling at 2 kHz spent ~6% of a core on wake-ups alone (measured here).
        # Arrival times come from rtmidi's stamps, so the slower idle poll only delays the
        # first event of a phrase by up to 2 ms; it does not move its time.
        self.poll_interval = 0.0005
        self.idle_poll_interval = 0.002
        self.idle_after_s = 1.0

    # ------------------------------------------------------------------ properties

    @property
    def input_name(self) -> str:
        """The input as other clients see it (our virtual port, or the port we listen to)."""
        if self._input_name is None:
            raise MidiPortError("MIDI input is not open")
        return self._input_name

    @property
    def output_name(self) -> str:
        """The output as other clients see it (our virtual port, or the port we feed)."""
        if self._output_name is None:
            raise MidiPortError("MIDI output is not open")
        return self._output_name

    @property
    def is_open(self) -> bool:
        """Whether both ports are open (and, with our own JACK ports, checked)."""
        return not self._opening and self._in is not None and self._out is not None

    @property
    def waiting(self) -> bool:
        """Whether the MIDI system is gone (or was never there) and the watchdog waits."""
        return self._server_down

    @property
    def on_state(self) -> Callable[[str, str], object] | None:
        """The watchdog's listener (``on_state(state, message)``, on its thread)."""
        return self._on_state

    @on_state.setter
    def on_state(self, listener: Callable[[str, str], object] | None) -> None:
        # the watchdog may already have news (JACK appeared between open() and now):
        # handed over in order, under the lock the watchdog notifies under
        with self._notify_lock:
            self._on_state = listener
            held = list(self._held)
            self._held.clear()
            for state, message in held:
                self._call_listener(state, message)

    # ------------------------------------------------------------------ life cycle

    def open(self) -> MidiIO:
        """Open the input and the output; on failure nothing stays open."""
        if self.is_open:
            return self
        if self.backend == "winmm" and (self.in_name is None or self.out_name is None):
            raise MidiBackendError(_WINMM_VIRTUAL_HELP)
        _validate(self.backend)
        if self._server_down:
            return self  # already waiting for the MIDI system
        try:
            self._open_checked()
        except MidiBackendError as e:
            self.close()
            if not self._waits_for_server():
                raise
            self._start_waiting(e)
            return self
        except BaseException:
            self.close()
            raise
        self._ever_open = True
        self.period_s = self._jack_probe()[1] if self.backend == "jack" else None
        self._start_poller()
        self.fault = self._pending_fault()
        self._start_watchdog()
        log.info("MIDI (%s) in %r, out %r", self.backend, self._input_name, self._output_name)
        if self.fault:
            log.warning("%s", self.fault)
        return self

    def _waits_for_server(self) -> bool:
        # JACK by default: it is the MIDI system that is started and stopped beside us;
        # ALSA when asked for (see __init__); CoreMIDI and Windows MM never
        return self.supervise and self.wait_for_ports and self.backend in self.wait_for_systems

    def _start_waiting(self, err: MidiBackendError) -> None:
        """No MIDI system at open() (no JACK server, no ALSA sequencer): nothing open, the
        watchdog opens the ports (and connects the named ones) once it answers."""
        with self._send_lock:
            self._server_down = True
        self.fault = f"MIDI down: {err}; waiting for it, retrying every {self.retry_s:g} s"
        log.error("%s", self.fault)
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if not self.supervise:
            return
        self._watchdog_stop.clear()
        self._watchdog = threading.Thread(
            target=self._supervise, name="divergent-midi-watch", daemon=True
        )
        self._watchdog.start()

    def _open_checked(self) -> None:
        """Open both clients and the xrun watch; with our own virtual JACK ports, again
        until what we send comes back.

        Why: jack2's libjack (1.9.21 and 1.9.22, the copy python-rtmidi bundles) ignores
        a "client removed" notice that reaches a client of ours still registering
        (ClientNotifyImp skips kRemoveClient until the client's control block is set), so
        the synchro table our clients share keeps the departed client's semaphore under
        its refnum. A client of ours given that refnum then waits on a dead semaphore:
        its ports are listed and connected, and no MIDI passes (seen in 2 of 40 JACK
        restarts while ``jack_lsp`` polled). Deleting both clients frees the table (they
        are the only rtmidi JACK clients in the server's process). Named ports are not
        checked as such (their devices would receive the check's message): with JACK our
        own virtual ports are opened and checked, then connected to them.
        The watch is closed before our clients are deleted: its Python callbacks need
        the GIL, which python-rtmidi holds while it waits for the server, and the server
        may be waiting for the watch (a deadlock, seen).
        """
        self._opening = True
        try:
            self._open_until_it_passes()
        finally:
            self._opening = False

    def _open_until_it_passes(self) -> None:
        for attempt in range(1, _OPEN_TRIES + 1):
            # the ports first: opening the watch first left our ports deaf more often
            # (the race test failed 2 of 3 runs that way, 0 of 3 in this order)
            self._open_ports()
            self._watch_xruns()
            if not self._loopback_checkable() or self._output_reaches_input():
                self._connect_named()
                return
            if attempt == _OPEN_TRIES:
                log.warning(
                    "MIDI sent on our JACK output did not reach our input in %d tries: if "
                    "no MIDI passes, restart JACK or divergent",
                    attempt,
                )
                self._connect_named()
                return
            log.info("our JACK ports pass no MIDI (a jack2 race): registering them again")
            self.reregistrations += 1
            self._close_watch()
            self._delete_ports()

    def _loopback_checkable(self) -> bool:
        return self.xrun_watch is not None and None not in (self._own_in, self._own_out)

    def _connect_named(self) -> None:
        """With JACK: connect the named ports found at opening, after the check."""
        if not self._via_jack:
            return  # connected by rtmidi at opening
        for direction, wanted, pending in (
            ("input", self.in_name, self._pending_in),
            ("output", self.out_name, self._pending_out),
        ):
            if wanted is None or pending:
                continue
            port = self._in if direction == "input" else self._out
            ports = list(port.get_ports())
            idx = _match_port(wanted, ports, direction)
            try:
                self._connect(direction, port, ports, idx)
            except (BridgeError, rtmidi.RtMidiError) as e:
                raise MidiPortError(f"cannot connect MIDI {direction} {ports[idx]!r}: {e}") from e

    def _own(self, direction: str) -> str | None:
        return self._own_in if direction == "input" else self._own_out

    def _jack_connects(self, direction: str) -> bool:
        """Whether a named port of ``direction`` is connected to our own port by JACK."""
        return self.xrun_watch is not None and self._own(direction) is not None

    def _connect(self, direction: str, port: Any, ports: list[str], idx: int) -> None:
        """Connect ``direction`` to the named port ``ports[idx]``: through JACK to our own
        (checked) port while the watch is open, else by rtmidi itself (our own port, if
        any, gives way to a port connected to the named one)."""
        own = self._own(direction)
        if self.xrun_watch is not None and own is not None:
            if direction == "input":
                self.xrun_watch.connect(ports[idx], own)
            else:
                self.xrun_watch.connect(own, ports[idx])
            return
        if port.is_port_open():
            port.close_port()
        port.open_port(idx, name=self.virtual_in if direction == "input" else self.virtual_out)

    def _output_reaches_input(self) -> bool:
        """Whether a probe sent on our virtual output arrives at our virtual input through
        a connection made for the check (one or two JACK periods when it does)."""
        watch = self.xrun_watch
        assert watch is not None
        src, dst = self._own_out, self._own_in
        assert src is not None and dst is not None
        try:
            watch.connect(src, dst)
        except BridgeError as e:
            log.warning("no loopback check of our JACK ports: %s", e)
            return True
        try:
            self._in.ignore_types(**{**_IGNORED_INPUT, "sysex": False})
            self._out.send_message(_PROBE)
            clock = ArrivalClock()
            deadline = time.monotonic() + _PROBE_WAIT_S
            while time.monotonic() < deadline:
                event = self._in.get_message()
                if event is None:
                    time.sleep(0.001)
                elif event[0] == _PROBE:
                    return True
                elif event[0][:1] != [0xF0]:  # someone already playing into us: theirs
                    self._deliver(event[0], clock.stamp(event[1], time.monotonic()))
            return False
        finally:
            self._in.ignore_types(**_IGNORED_INPUT)
            try:
                watch.connect(src, dst, on=False)
            except BridgeError as e:
                log.warning("the loopback check's connection stays: %s", e)

    def _open_ports(self) -> None:
        # both clients first: each lists the other direction's ports, which is how we
        # learn the name the MIDI system gave our virtual port
        # a deep queue: the poller may lose the GIL for a while under a 2 kHz flood
        self._in = _make(rtmidi.MidiIn, self.backend, self.client_name, queue_size_limit=16384)
        self._out = _make(rtmidi.MidiOut, self.backend, self.client_name)
        # with JACK, named ports are connected after the loopback check (_connect_named)
        self._via_jack = self.backend == "jack"
        self._own_in = self._own_out = None
        self._input_name = self._open_input(self._in, self._out)
        self._output_name = self._open_output(self._out, self._in)

    def _start_poller(self) -> None:
        self._poll_stop.clear()
        self._poller = threading.Thread(
            target=self._poll, args=(self._in,), name="divergent-midi-in", daemon=True
        )
        self._poller.start()

    def _pending_fault(self) -> str:
        waiting = [
            f"MIDI {what} {name!r} not there yet: waiting for it"
            for what, name, pending in (
                ("input", self.in_name, self._pending_in),
                ("output", self.out_name, self._pending_out),
            )
            if pending
        ]
        return "; ".join(waiting)

    def _watch_xruns(self) -> None:
        named = self.in_name is not None or self.out_name is not None
        if self.backend != "jack" or (self.on_xrun is None and not self.supervise and not named):
            return
        if self.xrun_watch is not None:
            return
        # with supervision the watch also tells when the JACK server goes away, and with
        # named ports its client connects them to ours (without it rtmidi does, unchecked)
        on_xrun = self.on_xrun or (lambda: None)
        watch = XrunWatch(client_name=f"{self.client_name}-xruns", on_xrun=on_xrun)
        try:
            self.xrun_watch = watch.open()
        except BridgeError as e:
            # MIDI still works; only the repeat of note-offs JACK may drop is missing
            log.warning("JACK xruns not watched (lost note-offs are not re-sent): %s", e)

    def _open_input(self, mi: Any, lister: Any) -> str:
        mi.ignore_types(**_IGNORED_INPUT)
        return self._open_direction("input", mi, lister)

    def _open_output(self, mo: Any, lister: Any) -> str:
        return self._open_direction("output", mo, lister)

    def _open_direction(self, direction: str, port: Any, lister: Any) -> str:
        """Open one direction: our virtual port, or the named one (waited for when it is
        not there). With JACK's watch our own virtual port is opened either way, and the
        named one is connected to it after the loopback check (:meth:`_connect_named`)."""
        wanted = self.in_name if direction == "input" else self.out_name
        virtual = self.virtual_in if direction == "input" else self.virtual_out
        if wanted is None or self._via_jack:
            own = self._open_virtual(port, virtual, lister)
            if direction == "input":
                self._own_in = own
            else:
                self._own_out = own
            if wanted is None:
                return own
        ports = list(port.get_ports())
        if self._waits_for(wanted, ports):
            self._set_pending(direction, True)
            return wanted
        idx = _match_port(wanted, ports, direction)
        if not self._via_jack:
            try:
                self._connect(direction, port, ports, idx)
            except rtmidi.RtMidiError as e:
                raise MidiPortError(f"cannot open MIDI {direction} {ports[idx]!r}: {e}") from e
        return str(ports[idx])

    def _waits_for(self, wanted: str, ports: list[str]) -> bool:
        """Whether a named port that is not there is waited for (else: an error)."""
        return self.wait_for_ports and not any(wanted.lower() in n.lower() for n in ports)

    def _open_virtual(self, port: Any, name: str, lister: Any) -> str:
        before = set(lister.get_ports())
        try:
            port.open_virtual_port(name)
        except (rtmidi.RtMidiError, NotImplementedError) as e:
            if self.backend == "winmm":
                raise MidiBackendError(_WINMM_VIRTUAL_HELP) from e
            raise MidiPortError(f"cannot open virtual MIDI port {name!r}: {e}") from e
        # the new entry in the other direction's listing is our port under its full name
        # (JACK "client-NN:port", ALSA "client:port 128:0", CoreMIDI just the port)
        new = [n for n in lister.get_ports() if n not in before and name in n]
        if len(new) == 1:
            return str(new[0])
        # another program opened a same-named port at the same moment: say the bare name
        log.debug("could not tell our virtual port %r among %r", name, new)
        return name

    def close(self) -> None:
        """Close both ports (idempotent). Notes still sounding are the sender's business."""
        self._watchdog_stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            # it may be deleting a dead client (rtmidi's JACK output takes ~1 s for that)
            self._watchdog.join(timeout=3.0)
            self._watchdog = None
        self._teardown()
        self._input_name = None
        self._output_name = None
        with self._send_lock:
            self._server_down = False

    def __enter__(self) -> MidiIO:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ traffic

    def send(self, msg: mido.Message) -> None:
        """Send ``msg`` now on the output (safe to call from any one thread at a time)."""
        data = msg.bytes()
        with self._send_lock:
            if self._server_down or self._pending_out:
                # the output is gone for now: the watchdog reports it, panics on return
                self.dropped_while_down += 1
                return
            if self._out is None:
                raise MidiPortError("MIDI output is not open")
            self._out.send_message(data)

    def _poll(self, port: Any) -> None:
        """Read rtmidi's input queue until closed (the thread behind ``on_event``)."""
        clock = ArrivalClock()
        get = port.get_message
        last_event = time.monotonic()
        while not self._poll_stop.is_set():
            event = get()
            if event is None:
                idle = time.monotonic() - last_event > self.idle_after_s
                time.sleep(self.idle_poll_interval if idle else self.poll_interval)
                continue
            last_event = time.monotonic()
            self._deliver(event[0], clock.stamp(event[1], last_event))

    def _deliver(self, data: list[int], t: float) -> None:
        try:
            msg = mido.Message.from_bytes(data)
        except (ValueError, TypeError):
            self.malformed += 1
            log.debug("malformed MIDI input dropped: %r", data)
            return
        try:
            self.on_event(MidiEvent(t, msg))
        except Exception:
            # an exception must not end the input thread
            self.callback_errors += 1
            log.exception("MIDI input callback failed on %s", msg)

    # ------------------------------------------------------------------ coming back

    def _supervise(self) -> None:
        """The watchdog thread: check every ``retry_s``, come back when possible."""
        while not self._watchdog_stop.wait(self.retry_s):
            try:
                self._check()
            except Exception:
                # the watchdog must outlive any surprise from the MIDI library
                log.exception("MIDI watchdog check failed; retrying")

    def _check(self) -> None:
        if self._server_down:
            self._try_reopen()
        elif self._jack_gone():
            why = self.xrun_watch.gone_reason if self.xrun_watch is not None else ""
            self._lose_server(f"the JACK server stopped ({why or 'gone'})")
        else:
            self._check_named()

    def _jack_gone(self) -> bool:
        if self.backend != "jack":
            return False
        if self.xrun_watch is not None:
            return self.xrun_watch.server_gone.is_set()
        # no JACK-Client watch (libjack missing for it): ask jack_lsp, seldom
        return not jack_running(timeout=1.0)

    def _notify(self, state: str, message: str) -> None:
        with self._notify_lock:
            if self._on_state is None:
                if len(self._held) == self._held.maxlen:
                    self.notices_dropped += 1
                    log.warning("MIDI state notice dropped (nobody listening): %s", self._held[0])
                self._held.append((state, message))
                return
            self._call_listener(state, message)

    def _call_listener(self, state: str, message: str) -> None:
        assert self._on_state is not None
        try:
            self._on_state(state, message)
        except Exception:
            self.callback_errors += 1
            log.exception("MIDI state callback failed")

    def _lose_server(self, why: str) -> None:
        """The MIDI system went away: report, drop the dead clients, keep trying."""
        with self._send_lock:
            self._server_down = True
        self.losses += 1
        self.fault = f"MIDI lost: {why}; retrying every {self.retry_s:g} s"
        log.error("%s", self.fault)
        self._notify("lost", self.fault)
        self._teardown()

    def _teardown(self) -> None:
        """Stop the xrun watch and the poller, then delete both ports (a lost server's
        or a closing one's alike)."""
        self._close_watch()
        self._poll_stop.set()
        if self._poller is not None:
            # the poller must not read from a half-deleted port
            self._poller.join(timeout=1.0)
            self._poller = None
        self._delete_ports()

    def _close_watch(self) -> None:
        if self.xrun_watch is not None:
            self.xrun_watch.close()
            self.xrun_watch = None

    def _delete_ports(self) -> None:
        with self._send_lock:
            old_in, old_out = self._in, self._out
            self._in = self._out = None
        # deleted outside the send lock: a dead JACK output takes ~1 s to close
        for port in (old_in, old_out):
            if port is not None:
                try:
                    _delete(port)
                except Exception as e:  # the server is gone; nothing left to free there
                    log.debug("closing a dead MIDI client: %r", e)

    def _server_answers(self) -> tuple[bool, float | None]:
        """Whether the MIDI system is back, and its period (cheap; no process started).
        JACK's probe client stays open until :meth:`_release_probe`."""
        if self.backend == "alsa":
            # opening a missing sequencer prints on stderr: look for its device first
            return os.access(_ALSA_SEQ, os.R_OK | os.W_OK), None
        if self.backend != "jack":
            return True, None
        return self._jack_probe(hold=True)

    def _release_probe(self) -> None:
        probe, self._held_probe = self._held_probe, None
        if probe is not None:
            probe.close()

    def _jack_probe(self, *, hold: bool = False) -> tuple[bool, float | None]:
        """Whether a JACK server answers, and its period in seconds (None: unknown),
        through a short-lived client of ours with no ports (~50 ms; jack_bufsize and
        jack_samplerate, the fall-back without JACK-Client, take ~150 ms).

        ``hold``: the client is kept (closed by :meth:`_release_probe`) instead of closed
        at once. Why: a client leaving while ours register is jack2's race that leaves a
        client of ours deaf (see :meth:`_open_checked`); closed right before our ports
        registered, the probe was such a client at every return of JACK.
        """
        try:
            import jack  # JACK-Client: cffi over libjack
        except (ImportError, OSError):
            up = jack_running(timeout=1.0)
            return up, jack_period_s(timeout=1.0) if up else None
        # libjack prints "Cannot connect to server socket" at every failed try: to debug
        jack.set_error_function(lambda m: log.debug("libjack: %s", m))
        try:
            probe = jack.Client(f"{self.client_name}-probe", no_start_server=True)
        except jack.JackError:
            return False, None
        finally:
            jack.set_error_function(None)
        try:
            rate = probe.samplerate
            return True, probe.blocksize / rate if rate > 0 else None
        finally:
            if hold:
                self._release_probe()  # an earlier one, if any, first
                self._held_probe = probe
            else:
                probe.close()

    def _try_reopen(self) -> None:
        up, period = self._server_answers()
        try:
            if not up:
                return
            self._pending_in = self._pending_out = False
            try:
                self._open_checked()
            except BridgeError as e:
                log.debug("MIDI not back yet: %s", e)
                self._teardown()
                return
        finally:
            self._release_probe()  # our clients are registered (or gone): it may leave
        # before "back" is said: its listener reads the period (a JACK server that
        # appears or returns may run another one)
        self.period_s = period
        self._start_poller()
        with self._send_lock:
            self._server_down = False
        self.returns += 1
        self.fault = self._pending_fault()
        first = not self._ever_open
        self._ever_open = True
        system = _SYSTEM_NAMES.get(self.backend, "the MIDI system")
        message = (
            f"MIDI {f'up ({system} appeared)' if first else 'back'}: "
            f"in {self._input_name!r}, out {self._output_name!r}"
        )
        if self.dropped_while_down:
            message += f" ({self.dropped_while_down} messages not sent while it was gone)"
        log.warning("%s", message + (f"; {self.fault}" if self.fault else ""))
        self._notify("back", message)
        if self.fault:
            self._notify("lost", self.fault)

    def _check_named(self) -> None:
        """A named port that went away is waited for; one that (re)appeared is connected."""
        if self.in_name is None and self.out_name is None:
            return
        changed = False
        for direction in ("input", "output"):
            changed |= self._check_direction(direction)
        if changed:
            self.fault = self._pending_fault()

    def _check_direction(self, direction: str) -> bool:
        wanted = self.in_name if direction == "input" else self.out_name
        port = self._in if direction == "input" else self._out
        if wanted is None or port is None:
            return False
        pending = self._pending_in if direction == "input" else self._pending_out
        ports = list(port.get_ports())
        if not pending:
            current = self._input_name if direction == "input" else self._output_name
            if current in ports:
                return False
            # the peer went away: JACK dropped the connection; wait for it to come back
            with self._send_lock:
                if not self._jack_connects(direction):
                    port.close_port()  # rtmidi's connection: opened again on return
                self._set_pending(direction, True)
            message = f"MIDI {direction} {current!r} disappeared: waiting for it to return"
            log.error("%s", message)
            self.losses += 1
            self._notify("lost", message)
            return True
        if not any(wanted.lower() in n.lower() for n in ports):
            return False
        try:
            idx = _match_port(wanted, ports, direction)
            with self._send_lock:
                self._connect(direction, port, ports, idx)
                self._set_pending(direction, False)
        except (BridgeError, rtmidi.RtMidiError) as e:
            log.debug("MIDI %s %r not connectable yet: %s", direction, wanted, e)
            return False
        if direction == "input":
            self._input_name = ports[idx]
        else:
            self._output_name = ports[idx]
        self.returns += 1
        message = f"MIDI {direction} {ports[idx]!r} connected"
        log.warning("%s", message)
        self._notify("back", message)
        return True

    def _set_pending(self, direction: str, pending: bool) -> None:
        if direction == "input":
            self._pending_in = pending
        else:
            self._pending_out = pending
