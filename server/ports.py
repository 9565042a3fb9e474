"""The server's outside: the MIDI port (an injectable factory, like mido's port
template), address lookup off the loop, and the note sink the answers use. (The model is
loaded by :func:`divergent.server.app.load_on_device`, through
:func:`divergent.model.generate.serving_generator`: one path for serve's model.)"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol

import mido

from divergent.bridges.midi import MidiEvent, MidiIO, choose_backend
from divergent.server.config import ServeConfig
from divergent.server.sender import Sender

__all__ = [
    "MidiPort",
    "MidiPortFactory",
    "SenderSink",
    "numeric_host",
    "open_midi_port",
    "sender_lead",
]


class MidiPort(Protocol):
    """An open MIDI input and output (:class:`~divergent.bridges.midi.MidiIO`, or a fake)."""

    backend: str

    @property
    def input_name(self) -> str:
        """The input as other clients see it."""
        ...

    @property
    def output_name(self) -> str:
        """The output as other clients see it."""
        ...

    def send(self, msg: mido.Message) -> None:
        """Send ``msg`` now (from the sender thread)."""
        ...

    def close(self) -> None:
        """Close both ports."""
        ...


class MidiPortFactory(Protocol):
    """Opens the MIDI port for a config. ``on_event`` may be called from any thread;
    ``on_xrun`` when the MIDI system dropped events (a JACK xrun), from any thread. Runs
    in a worker thread (it may start subprocesses and open devices)."""

    def __call__(
        self,
        config: ServeConfig,
        on_event: Callable[[MidiEvent], object],
        *,
        on_xrun: Callable[[], object] | None = None,
    ) -> MidiPort: ...


def open_midi_port(
    config: ServeConfig,
    on_event: Callable[[MidiEvent], object],
    *,
    on_xrun: Callable[[], object] | None = None,
) -> MidiPort:
    """The real MIDI port: rtmidi through :class:`MidiIO` (raises BridgeError), with its
    watchdog: the ports come back when the MIDI system does, and a named port not there
    yet is waited for (the app sets ``on_state`` to hear of both). A JACK server not
    running yet is waited for; so is the ALSA sequencer when ALSA was asked for by name
    (chosen by default, its failure is raised: the app may wait for JACK instead)."""
    explicit = config.midi_backend is not None and config.midi_backend.lower() != "auto"
    midi = MidiIO(
        backend=choose_backend(config.midi_backend),
        client_name=config.midi_client,
        in_name=config.midi_in,
        out_name=config.midi_out,
        on_event=on_event,
        on_xrun=on_xrun,
        supervise=True,
        wait_for_ports=True,
        wait_for_systems=("jack", "alsa") if explicit else ("jack",),
    )
    return midi.open()


def sender_lead(midi: MidiPort | None) -> float:
    """How early the sender sends: half the MIDI system's period, 0 when it has none or
    it is not known yet (no JACK server so far). JACK plays MIDI at the next period
    boundary, so half a period early centres the onset error on zero (measured: p99
    1.5 ms -> 0.8-1.6 ms at 64 frames). Asked at start and whenever the ports (re)open."""
    period = midi.period_s if isinstance(midi, MidiIO) else None
    return period / 2 if period else 0.0


async def numeric_host(host: str, port: int) -> str:
    """``host`` resolved off the loop (IPv4 first, as the OSC bridge prefers), so the
    bridge's own lookup of a numeric address never blocks."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return host  # the bridge reports the error in its own words
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


class SenderSink:
    """The answers' note sink: the sender, once it exists (``sender()`` returns it)."""

    def __init__(self, sender: Callable[[], Sender | None]) -> None:
        self._sender = sender

    def schedule_note(
        self,
        *,
        on: float,
        off: float,
        pitch: int,
        velocity: int,
        channel: int = 0,
        tag: object | None = None,
    ) -> None:
        sender = self._sender()
        if sender is not None:
            sender.schedule_note(
                on=on, off=off, pitch=pitch, velocity=velocity, channel=channel, tag=tag
            )

    def cancel(self, tag: object | None = None) -> int:
        sender = self._sender()
        return sender.cancel(tag=tag) if sender is not None else 0
