"""What the sender schedules and reports: the messages it sent (:class:`Sent`), its
counters (:class:`SenderStats`), and the notes and repeats in flight inside it."""

from __future__ import annotations

from dataclasses import dataclass

import mido

__all__ = [
    "DONE",
    "PENDING",
    "SOUNDING",
    "Note",
    "Recent",
    "Resend",
    "SenderStats",
    "Sent",
    "is_release",
]

# Note states.
PENDING = 0
SOUNDING = 1
DONE = 2


@dataclass(frozen=True, slots=True)
class Sent:
    """One message handed to the sinks: when it was due and when it actually went out."""

    scheduled: float
    """The ``time.monotonic()`` time it was scheduled for (before ``lead_s``)."""
    actual: float
    """The ``time.monotonic()`` time just before the first sink was called."""
    message: mido.Message
    tag: object | None
    """The tag given to ``schedule_note`` (``None`` for ``send_now`` and panic messages)."""


@dataclass(frozen=True, slots=True)
class SenderStats:
    """A snapshot of the sender's counters (``Sender.stats``)."""

    sent: int
    """Messages handed to the sinks (each counted once, however many sinks)."""
    notes_on: int
    notes_off: int
    late: int
    """Scheduled messages sent more than 1 ms after their lead-adjusted time."""
    dropped_late: int
    """Note-ons whose time had passed by more than ``late_drop_s``: dropped, never played."""
    cancelled: int
    """Pending note-ons dropped by ``cancel``, ``panic`` or ``close``."""
    retriggered: int
    """Note-ons of a pitch already sounding on that channel (a note-off went first)."""
    clipped: int
    """Notes shortened to ``max_note_s``."""
    refused: int
    """Notes and messages given after ``close`` (ignored)."""
    sink_errors: int
    callback_errors: int
    max_lateness_s: float
    """The latest any scheduled message went out (seconds after its lead-adjusted time)."""
    max_spin_s: float
    """The longest GIL-holding spin before an event (grows when wake-ups are late)."""
    resent: int
    """Note-offs (and CC 123/64) sent again after the MIDI system lost events
    (:meth:`Sender.resend_lost_offs`, on a JACK xrun)."""
    pending: int
    """Note-ons waiting to be sent."""
    sounding: int
    """Notes currently on."""


def is_release(msg: mido.Message) -> bool:
    """A message whose loss leaves a note sounding: a note-off, CC 123 or sustain off."""
    if msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0):
        return True
    return msg.type == "control_change" and msg.control in (123, 64) and msg.value == 0


class Note:
    """A note's messages (built by the caller, off the timing path) and its state."""

    __slots__ = ("droppable", "msg_off", "msg_on", "off", "on", "state", "tag")

    def __init__(
        self,
        *,
        msg_on: mido.Message,
        msg_off: mido.Message,
        on: float,
        off: float,
        tag: object | None,
        droppable: bool,
    ) -> None:
        self.msg_on = msg_on
        self.msg_off = msg_off
        self.on = on
        self.off = off
        self.tag = tag
        self.droppable = droppable
        self.state = PENDING

    @property
    def key(self) -> tuple[int, int]:
        return int(self.msg_on.channel), int(self.msg_on.note)


class Recent:
    """A note-off (or CC 123/64) sent lately: when it last went out, how often repeated.
    Repeats carry it as their tag, so the sender thread updates it when they go out."""

    __slots__ = ("msg", "repeats", "sent_at")

    def __init__(self, sent_at: float, msg: mido.Message) -> None:
        self.sent_at = sent_at
        self.msg = msg
        self.repeats = 0


class Resend:
    """A repeat of a recent release; checked when due, not when asked for."""

    __slots__ = ("recent",)

    def __init__(self, recent: Recent) -> None:
        self.recent = recent
