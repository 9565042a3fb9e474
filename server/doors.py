"""The app's doors: the MIDI port, the OSC server and the MQTT bridge, opened through the
app's exit stack (so they close in reverse order) with their callbacks handed to the loop.

A mixin of :class:`~divergent.server.app.Server`, as :class:`Conductor` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from divergent.bridges.exceptions import BridgeError, MidiBackendError
from divergent.bridges.midi import MidiEvent, MidiIO
from divergent.bridges.mqtt import MqttBridge
from divergent.bridges.osc import OscBridge
from divergent.server.config import ServeConfig, allow_list
from divergent.server.ports import MidiPort, MidiPortFactory, numeric_host
from divergent.server.sender import Sender
from divergent.server.web import is_loopback

__all__ = ["Doors"]

log = logging.getLogger("divergent.server")


class Doors(ABC):
    """Opening the bridges; the app supplies the state below."""

    config: ServeConfig
    midi_factory: MidiPortFactory
    midi: MidiPort | None
    midi_error: str | None
    midi_fault: str
    osc: OscBridge | None
    mqtt: MqttBridge | None
    sender: Sender | None
    _stack: contextlib.AsyncExitStack

    @abstractmethod
    def _enqueue_midi(self, ev: MidiEvent) -> None:
        """An incoming MIDI event, on the loop."""

    @abstractmethod
    def _midi_state(self, state: str, message: str) -> None:
        """The MIDI watchdog's news, on the loop."""

    @abstractmethod
    def _on_osc(self, address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        """An OSC message."""

    @abstractmethod
    def _on_osc_error(self, what: str, exc: Exception) -> None:
        """A malformed OSC packet."""

    @abstractmethod
    def _on_mqtt(self, param: str, payload: bytes) -> None:
        """An MQTT control message."""

    @abstractmethod
    def status_dict(self) -> dict[str, Any]:
        """The status."""

    async def _open_midi(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_event(ev: MidiEvent) -> None:  # rtmidi's poller thread
            loop.call_soon_threadsafe(self._enqueue_midi, ev)

        def on_xrun() -> None:  # the xrun watch's thread
            # the note-off guarantee: JACK dropped a cycle's events, repeat recent note-offs
            if self.sender is not None:
                self.sender.resend_lost_offs()

        def on_state(state: str, message: str) -> None:  # the MIDI watchdog's thread
            loop.call_soon_threadsafe(self._midi_state, state, message)

        try:
            # off the loop: choosing a backend may run jack_lsp, opening ports takes a while
            self.midi = await asyncio.to_thread(
                self.midi_factory, self.config, on_event, on_xrun=on_xrun
            )
        except BridgeError as e:
            self.midi = await self._wait_for_jack_instead(e, on_event, on_xrun)
            if self.midi is None:
                log.warning("no MIDI ports (%s): notes travel over OSC only", e)
                self.midi_error = str(e)
                if self._midi_asked_for():
                    # MIDI the performer asked for and will not get: a fault they hear
                    # of (error, health, MQTT, said once OSC is open), not a log line
                    self.midi_fault = f"MIDI down: {e}; notes travel over OSC only"
                return
        self._stack.callback(self._close_midi)
        if isinstance(self.midi, MidiIO):
            # set after open(): news the watchdog already had is handed over now
            self.midi.on_state = on_state
            # a named port not there yet, or no JACK server yet: said once OSC is open
            self.midi_fault = self.midi.fault

    def _midi_asked_for(self) -> bool:
        """Whether MIDI was asked for by name (a backend, or a port to connect), so that
        running without it is a fault; with the defaults it is MIDI if there is some."""
        cfg = self.config
        explicit = cfg.midi_backend is not None and cfg.midi_backend.lower() != "auto"
        return explicit or cfg.midi_in is not None or cfg.midi_out is not None

    async def _wait_for_jack_instead(
        self,
        err: BridgeError,
        on_event: Callable[[MidiEvent], object],
        on_xrun: Callable[[], object],
    ) -> MidiPort | None:
        """No backend chosen, on Linux, and ALSA failed (no sound card) because no JACK
        server ran at start: where JACK is installed, wait for its server (the ports open
        when it appears) rather than run without MIDI for the whole set."""
        if not isinstance(err, MidiBackendError):
            return None  # the backend works; a port is the problem
        if self.config.midi_backend is not None or not sys.platform.startswith("linux"):
            return None
        if shutil.which("jackd") is None and shutil.which("pw-jack") is None:
            return None  # no JACK on this machine: nothing to wait for
        try:
            midi = await asyncio.to_thread(
                self.midi_factory,
                replace(self.config, midi_backend="jack"),
                on_event,
                on_xrun=on_xrun,
            )
        except BridgeError as e:
            log.debug("waiting for JACK instead of ALSA is not possible: %s", e)
            return None
        log.warning("ALSA unavailable (%s): waiting for a JACK server instead", err)
        return midi

    def _close_midi(self) -> None:
        if self.midi is not None:
            self.midi.close()
            self.midi = None

    async def _open_osc(self) -> None:
        # OSC opens once the model is loaded, so a /divergent/pong means "ready to play"
        reply_host, reply_port = self.config.reply_address
        osc = OscBridge(
            host=await numeric_host(self.config.osc_host, self.config.osc_port),
            port=self.config.osc_port,
            reply_host=await numeric_host(reply_host, reply_port),
            reply_port=reply_port,
            on_message=self._on_osc,
            on_error=self._on_osc_error,
            allow=allow_list(self.config.osc_allow),
        )
        self.osc = await self._stack.enter_async_context(osc)
        if not is_loopback(self.config.osc_host):
            log.warning(
                "OSC listens on %s: anyone who reaches it can play and control divergent%s",
                self.config.osc_host,
                " (limited by --osc-allow)"
                if self.config.osc_allow
                else "; limit it with --osc-allow ADDR[,CIDR...]",
            )
        self._stack.callback(setattr, self, "osc", None)

    async def _open_mqtt(self) -> None:
        if self.config.mqtt_address is None:
            return
        host, port = self.config.mqtt_address
        cfg = self.config
        mqtt = MqttBridge(
            host=host,
            port=port,
            instance=cfg.instance,
            username=cfg.mqtt_username,
            password=cfg.mqtt_password,
            tls=cfg.mqtt_tls,
            cafile=cfg.mqtt_cafile,
            on_control=self._on_mqtt,
            # retry every <= 2 s: telemetry is back within seconds of the broker
            backoff=(0.25, 2.0),
        )
        # returns at once even when the broker is down: it reconnects on its own
        self.mqtt = await self._stack.enter_async_context(mqtt)
        self._stack.callback(setattr, self, "mqtt", None)
        # the last status (recording 0) goes out before the bridge closes
        self._stack.callback(lambda: mqtt.publish_status(self.status_dict()))
