"""The app's health desk: faults of the rig (MIDI gone and back, a disk that cannot be
written) and malformed MIDI input, said on the error channel, MQTT, the log and the
``/divergent/health`` reply.

A mixin of :class:`~divergent.server.app.Server`, as :class:`Conductor` is.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any

from divergent.bridges.midi import MidiIO
from divergent.bridges.mqtt import MqttBridge
from divergent.server.performance import Performance
from divergent.server.ports import sender_lead
from divergent.server.sender import Sender
from divergent.server.telemetry import Stats

__all__ = ["HealthDesk"]

log = logging.getLogger("divergent.server")


class HealthDesk(ABC):
    """Faults in, the performer told; the app supplies the state below."""

    midi: Any
    midi_fault: str
    disk_fault: str
    mqtt: MqttBridge | None
    sender: Sender | None
    perf: Performance
    stats: Stats
    _malformed_said: float

    @abstractmethod
    def _send(self, address: str, *args: Any) -> None:
        """Send a reply."""

    @abstractmethod
    def _apply(self, requests: list[Any]) -> None:
        """Carry out the state machine's requests."""

    @abstractmethod
    def status_dict(self) -> dict[str, Any]:
        """The status, as MQTT publishes it."""

    def _fault(self, message: str) -> None:
        """A fault of the rig (MIDI gone, disk full), not a rejected message: the error
        channel, MQTT, the log, and the health reply."""
        log.warning("fault: %s", message)
        self._send("/divergent/error", message)
        if self.mqtt is not None:
            self.mqtt.publish_error(message)
        self._report_health()

    def _report_health(self) -> None:
        self._send("/divergent/health", *self.health_args())
        if self.mqtt is not None:
            self.mqtt.publish_status(self.status_dict())

    def _midi_state(self, state: str, message: str) -> None:
        """The MIDI watchdog (on the loop): ports lost, or back."""
        self.midi_fault = self.midi.fault if isinstance(self.midi, MidiIO) else ""
        if state == "lost":
            self.stats.midi_losses += 1
            # silence what was playing: its note-offs still reach the OSC transport
            self._apply(self.perf.stop(message))
            self._fault(message)
            return
        if self.sender is not None:
            # a receiver connected while MIDI was away starts from silence
            self.sender.panic()
            # the ports (re)opened on a MIDI system whose period may be new (JACK that
            # was not running at start): the sender's lead follows it
            lead = sender_lead(self.midi)
            if lead != self.sender.lead_s:
                log.info("sender lead %.2f ms: half the MIDI system's period", lead * 1000)
                self.sender.lead_s = lead
        log.warning("%s", message)
        self._report_health()

    def health_args(self) -> tuple[str, str]:
        """The /divergent/health values: what is wrong with MIDI and the disk ("ok")."""
        return (self.midi_fault or "ok", self.disk_fault or "ok")

    def _count_malformed_midi(self) -> None:
        """Malformed MIDI input (the bridge drops it): counted, and said at most once a
        second on the error channel, so a broken device cannot flood it."""
        malformed = getattr(self.midi, "malformed", 0)
        if not isinstance(malformed, int) or malformed <= self.stats.midi_malformed:
            return
        now = time.monotonic()
        if now - self._malformed_said < 1.0:
            return
        new, self.stats.midi_malformed = malformed - self.stats.midi_malformed, malformed
        self._malformed_said = now
        message = f"MIDI input: {new} malformed message(s) ignored (rejected)"
        log.info("error: %s", message)
        self._send("/divergent/error", message)
        if self.mqtt is not None:
            self.mqtt.publish_error(message)
