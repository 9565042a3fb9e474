"""What the server tells the world: its replies (declared), counters and the trace.

``REPLIES`` declares every message sent to the reply address (``docs/osc.md`` is built
from it); :class:`Stats` counts what ``/divergent/stats`` reports; :class:`Trace` writes
timing events as JSON lines (``--trace``) for ``divergent bench live``.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from divergent.server.control import Arg, Reply

__all__ = ["REPLIES", "STATUS", "Stats", "Trace"]

#: The messages the server sends to the reply address (``docs/osc.md`` is built from these).
REPLIES: tuple[Reply, ...] = (
    Reply("/divergent/pong", (("version", "s"),), doc="Answer to /divergent/ping."),
    Reply(
        "/divergent/status",
        (
            ("mode", "s"),
            ("tempo", "f"),
            ("clock", "s"),
            ("divergence", "f"),
            ("recording", "i"),
            ("temperature", "f"),
            ("bars", "i"),
            ("quantize", "s"),
            ("answers", "i"),
            ("concept", "s"),
            ("concept_strength", "f"),
        ),
        doc="The server's state: the reply to /divergent/status and the heartbeat "
        "(about once a second). tempo is in BPM; recording is 1 or 0 (2: recording, but the "
        "journal cannot reach the disk; see /divergent/health); concept is the "
        "concept answers are made in (A+B for two), none without one; concept_strength "
        "is /divergent/concept/strength's value (it applies only with a concept). New "
        "fields are only ever added at the end, so a patch that unpacks the first ones "
        "keeps working.",
    ),
    Reply(
        "/divergent/answer",
        (
            ("id", "i"),
            ("surprisal", "f"),
            ("copy_rate", "f"),
            ("feature_distance", "f"),
            ("in_scale", "f"),
            ("notes", "i"),
            ("compute_ms", "f"),
            ("divergence", "f"),
        ),
        doc="After every answer: its readout. surprisal in bits per note under the base "
        "model; copy_rate = share of 8-note interval patterns seen in training; "
        "feature_distance ~1 is typical of the training data; in_scale 0..1. "
        "A value that cannot be measured is sent as -1.",
    ),
    Reply(
        "/divergent/error",
        (("message", "s"),),
        doc="Every rejected or clamped message: the address, what was wrong, and whether "
        "it was clamped (applied) or rejected (ignored).",
    ),
    Reply(
        "/divergent/out/note",
        (("pitch", "i"), ("velocity", "i"), ("channel", "i")),
        doc="Every machine note as it sounds (velocity 0 = note off): the OSC note "
        "transport, for patches and Max for Live (no virtual MIDI port needed).",
    ),
    Reply(
        "/divergent/concept",
        (("concept", "s"), ("load_ms", "f")),
        doc="A concept switch applied (the next answer uses it): the active concept (none "
        "for the base model) and how long loading took in ms (0 for none).",
    ),
    Reply(
        "/divergent/concepts",
        (Arg("names", "s", repeat=True),),
        doc="Answer to /divergent/concepts (and after a concept is learned): the learned "
        "concepts' names, in name order (no arguments when there are none).",
    ),
    Reply(
        "/divergent/concept/learned",
        (
            ("name", "s"),
            ("seconds", "f"),
            ("steps", "i"),
            ("loss", "f"),
            ("notes", "i"),
            ("played_s", "f"),
            ("bytes", "i"),
        ),
        doc="A concept learned live: its name, the learning time in s, the tuning steps, "
        "the final training loss (-1 when unknown), the performer notes and seconds of "
        "playing it was learned from, and its file size.",
    ),
    Reply(
        "/divergent/stats",
        (
            ("midi_in", "i"),
            ("dropped", "i"),
            ("loop_lag_ms_p99", "f"),
            ("osc_errors", "i"),
            ("notes_out", "i"),
            ("sounding", "i"),
            ("midi_malformed", "i"),
            ("midi_losses", "i"),
            ("disk_faults", "i"),
            ("mqtt_in_dropped", "i"),
            ("mqtt_out_dropped", "i"),
        ),
        doc="Answer to /divergent/stats: input events received, input events dropped "
        "(queue full), the event loop's lag p99 over the last 2,000 samples, rejected "
        "control messages (OSC, MQTT and the page alike) and malformed OSC packets, "
        "machine notes sent, notes sounding now, malformed MIDI input ignored, "
        "times the MIDI system or a named port went away, journal write faults, MQTT "
        "control messages dropped before they reached the server (the inbound queue full, "
        "retained, no parameter, a failed handler), MQTT messages the server published "
        "that were lost (queue full, connection lost while sending). 0 without MQTT.",
    ),
)

REPLIES += (
    Reply(
        "/divergent/health",
        (("midi", "s"), ("disk", "s")),
        doc='What does not work right now, "ok" when it does: midi (no JACK server yet '
        "at start, the JACK server or a named port gone, an ALSA sequencer asked for that "
        "cannot be opened; the server keeps trying and opens its ports and connects the "
        "named ones within 2 s of their arrival; a backend or port that can neither open "
        'nor be waited for says "notes travel over OSC only") and disk (the '
        "take's journal cannot be written; the take is kept in memory and written when "
        "space returns, or to the rescue folder). Sent when either "
        "changes, after every /divergent/status reply, and with the heartbeat while "
        "something is wrong. While the journal cannot be written, status's recording is 2.",
    ),
)

STATUS = next(r for r in REPLIES if r.address == "/divergent/status")


@dataclass
class Stats:
    """The counters /divergent/stats reports (the loop owns them)."""

    midi_in: int = 0
    dropped: int = 0
    osc_errors: int = 0
    echoes: int = 0
    answers: int = 0
    notes_out: int = 0
    midi_losses: int = 0  # the MIDI system or a named port went away
    disk_faults: int = 0  # the take's journal could not be written
    midi_malformed: int = 0  # MIDI input that is no MIDI message (the bridge's count)
    lag_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    def lag_p99(self) -> float:
        """The event loop's lag p99 in ms over the last samples."""
        if len(self.lag_ms) < 2:
            return 0.0
        return statistics.quantiles(self.lag_ms, n=100, method="inclusive")[98]


class Trace:
    """Timing events as JSON lines (``--trace``), for ``divergent bench live``."""

    def __init__(self, path: Path | None) -> None:
        self._f: IO[str] | None = path.open("a", buffering=1 << 16) if path else None
        self._lock = threading.Lock()  # the loop writes; a closing thread may flush

    def write(self, event: str, **fields: Any) -> None:
        if self._f is None:
            return
        line = json.dumps({"event": event, **fields})
        with self._lock:
            self._f.write(line + "\n")

    def flush(self) -> None:
        if self._f is not None:
            with self._lock:
                self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            with self._lock:
                self._f.close()
            self._f = None
