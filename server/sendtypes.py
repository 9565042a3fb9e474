"""What the sender schedules and reports: the messages it sent (:class:`Sent`), its
counters (:class:`SenderStats`), and the notes and repeats in flight inside it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import mido

__all__ = [
    "DONE",
    "PENDING",
    "SOUNDING",
    "Counters",
    "Note",
    "Recent",
    "Resend",
    "SenderStats",
    "Sent",
    "SinkErrorLog",
    "cuts_nothing",
    "is_release",
    "set_realtime",
]

log = logging.getLogger("divergent.server.sender")

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


@dataclass(slots=True)
class Counters:
    """The sender's running counters (under its lock); :class:`SenderStats` without the
    queue sizes, which :meth:`snapshot` adds."""

    sent: int = 0
    notes_on: int = 0
    notes_off: int = 0
    late: int = 0
    dropped_late: int = 0
    cancelled: int = 0
    retriggered: int = 0
    clipped: int = 0
    refused: int = 0
    sink_errors: int = 0
    callback_errors: int = 0
    max_lateness_s: float = 0.0
    max_spin_s: float = 0.0
    resent: int = 0

    def snapshot(self, *, pending: int, sounding: int) -> SenderStats:
        """A frozen copy, with the queue sizes of the moment."""
        return SenderStats(
            **{f: getattr(self, f) for f in self.__dataclass_fields__},
            pending=pending,
            sounding=sounding,
        )


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


class SinkErrorLog:
    """A failing sink's errors, logged at most once per ``every_s`` per sink (the first
    with its traceback): a broken port must not flood the log from the timing thread.
    Only the sender thread uses it."""

    def __init__(self, sinks: Sequence[Callable[[mido.Message], None]], *, every_s: float) -> None:
        self._sinks = sinks
        self._every_s = every_s
        self._last: dict[int, float] = {}
        self._suppressed: dict[int, int] = {}

    def log(self, i: int, msg: mido.Message, err: Exception) -> None:
        """Sink ``i`` raised ``err`` on ``msg``."""
        now = time.monotonic()
        last = self._last.get(i)
        if last is not None and now - last < self._every_s:
            self._suppressed[i] = self._suppressed.get(i, 0) + 1
            return
        more = self._suppressed.pop(i, 0)
        self._last[i] = now
        log.error(
            "sink %d (%r) failed on %s: %r%s",
            i,
            self._sinks[i],
            msg,
            err,
            f" ({more} more errors since the last report)" if more else "",
            exc_info=err if last is None else None,
        )


def cuts_nothing(msg: mido.Message, sounding: Mapping[tuple[int, int], object]) -> bool:
    """Whether repeating ``msg`` (a note-off, or CC 123/64) cuts nothing in ``sounding``
    (the sender's notes on now, by channel and key): a repeat must never end a note
    that started since the original went out."""
    channel = int(msg.channel)
    if msg.type == "control_change":
        return not any(ch == channel for ch, _ in sounding)
    return (channel, int(msg.note)) not in sounding


def set_realtime(priority: int | None) -> None:
    """Ask the OS for SCHED_FIFO at ``priority`` on the calling thread (the sender's), so
    other processes cannot preempt it; None leaves it alone."""
    if priority is None:
        return
    if not hasattr(os, "sched_setscheduler"):
        log.info("real-time scheduling is not available on this platform")
        return
    try:
        # pid 0 on Linux means the calling thread, not the whole process.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as e:
        log.info("sender thread stays at normal priority (SCHED_FIFO refused: %s)", e)
