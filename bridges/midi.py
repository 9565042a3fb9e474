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
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import mido
import rtmidi

from divergent.bridges.exceptions import BridgeError, MidiBackendError, MidiPortError
from divergent.bridges.jack import XrunWatch, jack_running

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
        self.malformed = 0
        self.callback_errors = 0
        # python-rtmidi is a Cython module without type information: its objects are Any
        self._in: Any = None
        self._out: Any = None
        self._input_name: str | None = None
        self._output_name: str | None = None
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
        """Whether both ports are open."""
        return self._in is not None and self._out is not None

    # ------------------------------------------------------------------ life cycle

    def open(self) -> MidiIO:
        """Open the input and the output; on failure nothing stays open."""
        if self.is_open:
            return self
        if self.backend == "winmm" and (self.in_name is None or self.out_name is None):
            raise MidiBackendError(_WINMM_VIRTUAL_HELP)
        _validate(self.backend)
        try:
            # both clients first: each lists the other direction's ports, which is how we
            # learn the name the MIDI system gave our virtual port
            # a deep queue: the poller may lose the GIL for a while under a 2 kHz flood
            self._in = _make(rtmidi.MidiIn, self.backend, self.client_name, queue_size_limit=16384)
            self._out = _make(rtmidi.MidiOut, self.backend, self.client_name)
            self._input_name = self._open_input(self._in, self._out)
            self._output_name = self._open_output(self._out, self._in)
        except BaseException:
            self.close()
            raise
        self._poll_stop.clear()
        self._poller = threading.Thread(
            target=self._poll, args=(self._in,), name="divergent-midi-in", daemon=True
        )
        self._poller.start()
        self._watch_xruns()
        log.info("MIDI (%s) in %r, out %r", self.backend, self._input_name, self._output_name)
        return self

    def _watch_xruns(self) -> None:
        if self.backend != "jack" or self.on_xrun is None:
            return
        watch = XrunWatch(client_name=f"{self.client_name}-xruns", on_xrun=self.on_xrun)
        try:
            self.xrun_watch = watch.open()
        except BridgeError as e:
            # MIDI still works; only the repeat of note-offs JACK may drop is missing
            log.warning("JACK xruns not watched (lost note-offs are not re-sent): %s", e)

    def _open_input(self, mi: Any, lister: Any) -> str:
        # sysex off (big, unused), timing on (we follow MIDI clock), active sensing off
        mi.ignore_types(sysex=True, timing=False, active_sense=True)
        if self.in_name is not None:
            ports = list(mi.get_ports())
            idx = _match_port(self.in_name, ports, "input")
            try:
                mi.open_port(idx, name=self.virtual_in)
            except rtmidi.RtMidiError as e:
                raise MidiPortError(f"cannot open MIDI input {ports[idx]!r}: {e}") from e
            return ports[idx]
        return self._open_virtual(mi, self.virtual_in, lister)

    def _open_output(self, mo: Any, lister: Any) -> str:
        if self.out_name is not None:
            ports = list(mo.get_ports())
            idx = _match_port(self.out_name, ports, "output")
            try:
                mo.open_port(idx, name=self.virtual_out)
            except rtmidi.RtMidiError as e:
                raise MidiPortError(f"cannot open MIDI output {ports[idx]!r}: {e}") from e
            return ports[idx]
        return self._open_virtual(mo, self.virtual_out, lister)

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
        if self.xrun_watch is not None:
            self.xrun_watch.close()
            self.xrun_watch = None
        self._poll_stop.set()
        if self._poller is not None:
            # the poller must not read from a half-deleted port
            self._poller.join(timeout=1.0)
            self._poller = None
        if self._in is not None:
            _delete(self._in)
            self._in = None
        with self._send_lock:
            if self._out is not None:
                _delete(self._out)
                self._out = None
        self._input_name = None
        self._output_name = None

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
