"""The bridges' exceptions: one base class, so callers can catch every wire failure."""

from __future__ import annotations

__all__ = ["BridgeError", "MidiBackendError", "MidiPortError", "MqttError", "OscError"]


class BridgeError(RuntimeError):
    """A transport (MIDI, OSC, MQTT, clock) cannot do what was asked; the message says why."""


class MidiBackendError(BridgeError):
    """No usable MIDI backend (e.g. ALSA without a sound card, JACK not running)."""


class MidiPortError(BridgeError):
    """A named MIDI port does not exist or cannot be opened."""


class OscError(BridgeError):
    """The OSC server cannot bind its address or the reply address is invalid."""


class MqttError(BridgeError):
    """The MQTT bridge is misconfigured (empty host, bad port, unreadable CA file) or misused.

    Never raised for a broker that is down: the bridge keeps reconnecting in the background.
    """
