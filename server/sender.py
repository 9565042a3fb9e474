"""The precise output thread: every outgoing note passes through one ``Sender``.

Callers (the asyncio loop thread, the generation worker) hand it notes with absolute
``time.monotonic()`` on/off times; one daemon thread sleeps until shortly before each
event, spins the last fraction of a millisecond and calls every sink. Because that thread
alone turns notes on and off, it owns the set of sounding notes, and panic or shutdown can
always send one note-off for every note-on that reached a peer.

Timing and the GIL: the thread must hold the GIL to wake up. While another thread runs
pure Python (the sampler), CPython hands the GIL over only every ``sys.getswitchinterval()``
seconds (5 ms by default), so a wake-up can be that late or later. The sender measures how
late its wake-ups are and starts its GIL-holding spin up to ``max_spin_s`` earlier, which
helps the median, but only a short switch interval fixes the tail. Measured through a JACK
dummy server (64 frames at 48 kHz, 1.33 ms period) to a peer process, 200 onsets:

- no other Python thread: onset error p50 0.85 / p99 1.5 ms with ``lead_s=0``, and
  p50 0.35 / p99 0.75 to 1.6 ms with ``lead_s`` = half a period (the best setting);
- a thread running pure Python loops, default 5 ms switch interval: p50 3 to 4 ms,
  p99 6 to 12 ms;
- the same with ``sys.setswitchinterval(0.0005)``: p99 1.2 to 1.8 ms, and 0.8 to 0.9 ms
  with ``realtime_priority=3`` (which also keeps other busy processes from preempting it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

import mido

from divergent.server.sendtypes import (
    DONE,
    PENDING,
    SOUNDING,
    Counters,
    Note,
    Recent,
    Resend,
    SenderStats,
    Sent,
    SinkErrorLog,
    cuts_nothing,
    is_release,
    set_realtime,
)

__all__ = ["Sender", "SenderStats", "Sent", "Sink"]

log = logging.getLogger(__name__)

Sink = Callable[[mido.Message], None]
"""Where messages go: e.g. a MIDI output port's ``send``, or an OSC note sender."""

# Heap entry kinds, also the order among entries due at the same instant: a note-off first,
# so a repeated pitch played legato (off and next on at the same time) is off-then-on.
_OFF = 0
_RAW = 1
_ON = 2

# Note-offs (and release CCs) sent within this many seconds are sent again when the MIDI
# system reports lost events (a JACK xrun drops a whole cycle's events, and its
# notification comes a cycle or a few later); a deque bounds the memory under floods.
RESEND_WINDOW_S = 0.5
_RECENT_OFFS_MAX = 1024
# A repeat lost in the next xrun is repeated again, this many times at most: xruns that
# keep coming must not keep a note-off going out forever.
_MAX_REPEATS = 3

# A timed message sent later than this after its (lead-adjusted) time counts as late.
_LATE_S = 0.001
# A sink error is logged at most this often (the first one with its traceback).
_ERROR_LOG_EVERY_S = 5.0


# (due time, kind, sequence number, payload): the sequence number keeps the heap stable and
# means the payload is never compared.
_Entry = tuple[float, int, int, Note | Resend | mido.Message]
# (scheduled time, message, tag, timed): timed messages count towards lateness statistics.
_Out = tuple[float, mido.Message, object | None, bool]


class Sender:
    """The dedicated output thread: sends notes to every sink at their exact times.

    All public methods are thread-safe and return quickly (the sinks are only ever called
    by the sender thread, or by the caller of ``panic``/``close`` when that thread is not
    running). Times are ``time.monotonic()`` seconds.

    ``lead_s`` sends every event that much early (latency compensation, e.g. half a JACK
    period). ``late_drop_s``: a note-on whose turn comes more than this after its time is
    dropped with its note-off, never played late. ``max_note_s`` caps note length, so a
    lost note-off can never hang a note. ``spin_s`` is the minimum busy-wait before each
    event; it grows up to ``max_spin_s`` (and at most to 0.9 switch intervals) when
    wake-ups are observed late, from GIL contention or a busy machine.
    ``panic_all_channels`` makes panic send CC 123/64 on all 16 channels, not only on the
    channels used. ``realtime_priority``: run the thread SCHED_FIFO at this priority (Linux,
    needs root or an rtprio limit; refused quietly otherwise) so that other processes
    cannot preempt it; keep it below JACK's client threads (JACK gives them the server's
    priority minus 5, i.e. 5 with the default 10), e.g. 3.
    """

    MIN_NOTE_S = 0.002
    """Shortest note sent: an off at (or before) its on would reach a synth as nothing."""

    def __init__(
        self,
        *,
        sinks: Sequence[Sink],
        on_sent: Callable[[Sent], None] | None = None,
        max_note_s: float = 8.0,
        spin_s: float = 0.0008,
        lead_s: float = 0.0,
        late_drop_s: float = 0.02,
        max_spin_s: float = 0.002,
        panic_all_channels: bool = False,
        realtime_priority: int | None = None,
        name: str = "divergent-sender",
    ) -> None:
        if max_note_s <= 0 or spin_s < 0 or lead_s < 0 or late_drop_s < 0 or max_spin_s < 0:
            raise ValueError("sender times must be non-negative (max_note_s positive)")
        self._sinks: tuple[Sink, ...] = tuple(sinks)
        self._on_sent = on_sent
        self._max_note_s = float(max_note_s)
        self._spin_s = float(spin_s)
        self._lead_s = float(lead_s)
        self._late_drop_s = float(late_drop_s)
        self._max_spin_s = max(float(max_spin_s), self._spin_s)
        self._panic_all_channels = panic_all_channels
        self._realtime_priority = realtime_priority
        self._name = name

        self._cond = threading.Condition(threading.Lock())
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._pending: set[Note] = set()
        self._sounding: dict[tuple[int, int], Note] = {}
        self._channels: set[int] = set()
        # Release (panic/close) requests, numbered: asked for, taken (sounding set emptied)
        # and done (messages sent), so panic(wait=...) can wait for the sending itself.
        self._release_req = 0
        self._release_taken = 0
        self._release_done = 0
        self._release_ccs = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._closed = False
        # How late wake-ups from the timed wait have been lately (a decaying maximum): the
        # spin starts that much earlier. Only the sender thread touches it.
        self._wake_late_s = 0.0
        # Rate-limited sink error logging, per sink index; only the emitting thread uses it.
        self._sink_errors = SinkErrorLog(self._sinks, every_s=_ERROR_LOG_EVERY_S)
        # Pre-built panic messages: nothing to construct when it matters.
        self._cc_all_off = [
            mido.Message("control_change", channel=ch, control=123, value=0) for ch in range(16)
        ]
        self._cc_sustain_off = [
            mido.Message("control_change", channel=ch, control=64, value=0) for ch in range(16)
        ]
        self._c = Counters()  # under self._cond
        # recent note-offs and release CCs, for resend_lost_offs
        self._recent_offs: deque[Recent] = deque(maxlen=_RECENT_OFFS_MAX)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (a daemon). Notes scheduled before this wait for it."""
        with self._cond:
            if self._closed:
                raise RuntimeError("sender is closed")
            if self._thread is not None:
                raise RuntimeError("sender already started")
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._running = True
        self._thread.start()

    def close(self, *, panic: bool = True, timeout: float = 1.0) -> None:
        """Stop the thread: drop pending notes, send a note-off for every sounding note.

        With ``panic`` (the default) CC 123 (all notes off) and CC 64 = 0 (sustain off)
        follow on every channel used. Joins the thread for at most ``timeout`` seconds.
        Notes and messages given afterwards are ignored (counted in ``stats.refused``).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._drop_pending_locked()
            self._request_release_locked(ccs=panic)
            self._stopping = True
            self._cond.notify_all()
            running = self._running
            thread = self._thread
        if not running:
            self._release_inline()
            return
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("sender thread %s did not stop within %.1f s", self._name, timeout)

    def __enter__(self) -> Sender:
        """Start the thread (if not started) and return the sender."""
        with self._cond:
            started = self._thread is not None
        if not started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close with panic: nothing is left sounding."""
        self.close(panic=True)

    # --- feeding it ----------------------------------------------------------------------

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
        """Play a note from ``on`` to ``off`` (``time.monotonic()`` seconds).

        The note-off goes at ``min(off, on + max_note_s)`` (and at least ``MIN_NOTE_S``
        after the on). A note-on for a pitch already sounding on that channel sends that
        note's note-off first, so every note-on gets exactly one note-off. ``tag`` groups
        notes for ``cancel`` (e.g. a phrase id) and comes back in ``Sent``.
        """
        if not (math.isfinite(on) and math.isfinite(off)):
            raise ValueError(f"note times must be finite, got on={on!r} off={off!r}")
        if not 0 <= pitch <= 127:
            raise ValueError(f"pitch must be 0..127, got {pitch}")
        if not 1 <= velocity <= 127:
            raise ValueError(f"velocity must be 1..127 (0 is a note-off), got {velocity}")
        if not 0 <= channel <= 15:
            raise ValueError(f"channel must be 0..15, got {channel}")
        clipped = off > on + self._max_note_s
        off = max(min(off, on + self._max_note_s), on + self.MIN_NOTE_S)
        # mido validates on construction (tens of microseconds): do it here, on the
        # caller's thread, not on the sender's timing path.
        note = Note(
            msg_on=mido.Message("note_on", channel=channel, note=pitch, velocity=velocity),
            msg_off=mido.Message("note_off", channel=channel, note=pitch, velocity=64),
            on=float(on),
            off=float(off),
            tag=tag,
            droppable=True,
        )
        with self._cond:
            if self._closed:
                self._c.refused += 1
                return
            self._c.clipped += clipped
            self._channels.add(channel)
            self._pending.add(note)
            self._push_locked(note.on, _ON, note)
            self._push_locked(note.off, _OFF, note)

    def send_now(self, msg: mido.Message) -> None:
        """Send a message as soon as possible, in order with everything else (e.g. a CC).

        Note messages are tracked too: a note-on passed through here is sounding until a
        note-off for it passes through, and panic/close turn it off if it does not.
        """
        now = time.monotonic()
        payload: Note | mido.Message = msg
        kind = _RAW
        if msg.type == "note_on" and msg.velocity > 0:
            payload = Note(
                msg_on=msg,
                msg_off=mido.Message("note_off", channel=msg.channel, note=msg.note, velocity=64),
                on=now,
                off=math.inf,
                tag=None,
                droppable=False,
            )
            kind = _ON
        with self._cond:
            if self._closed:
                self._c.refused += 1
                return
            channel = getattr(msg, "channel", None)
            if channel is not None:
                self._channels.add(int(channel))
            # Lead does not apply: "now" minus lead is already due.
            self._push_locked(now, kind, payload)

    def cancel(self, tag: object | None = None) -> int:
        """Drop pending note-ons (all, or those whose tag equals ``tag``); return how many.

        Notes already sounding keep their scheduled note-off, so nothing sticks.
        """
        with self._cond:
            doomed = [n for n in self._pending if n.droppable and (tag is None or n.tag == tag)]
            for note in doomed:
                note.state = DONE
                self._pending.discard(note)
            if doomed:
                self._heap = [e for e in self._heap if self._live(e)]
                heapq.heapify(self._heap)
                self._c.cancelled += len(doomed)
                self._cond.notify_all()
            return len(doomed)

    def panic(self, *, wait: float = 0.0) -> bool:
        """Drop everything pending; send a note-off for every sounding note, then CC 123
        (all notes off) and CC 64 = 0 (sustain off) on every channel used (all 16 with
        ``panic_all_channels``).

        Pending notes are dropped before this returns; the messages go out on the sender
        thread right away. Waits at most ``wait`` seconds for them and returns whether
        they have been sent.
        """
        with self._cond:
            self._drop_pending_locked()
            gen = self._request_release_locked(ccs=True)
            self._cond.notify_all()
            running = self._running
        if not running:
            self._release_inline()
            return True
        deadline = time.monotonic() + wait
        with self._cond:
            while self._release_done < gen and self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._release_done >= gen

    def resend_lost_offs(self, window_s: float = RESEND_WINDOW_S) -> int:
        """Send again every note-off (and CC 123/64) sent in the last ``window_s`` seconds:
        the MIDI system reported lost events (a JACK xrun), and a lost note-off is a stuck
        note at the receiver. Thread-safe; returns how many were queued.

        A note-off whose pitch sounds again by the time it is due (a new note-on on that
        channel and key) is skipped, and so is a CC 123 on a channel with a sounding note:
        the repeat must never cut a note that started since. A repeated note-off for a
        note already off is harmless at the receiver.
        """
        now = time.monotonic()
        with self._cond:
            if self._closed and not self._running:
                return 0
            recent = [
                r
                for r in self._recent_offs
                if r.sent_at >= now - window_s and r.repeats < _MAX_REPEATS
            ]
            for r in recent:
                self._push_locked(now, _OFF, Resend(r))
            return len(recent)

    def sounding(self) -> int:
        """How many notes are on right now."""
        with self._cond:
            return len(self._sounding)

    @property
    def stats(self) -> SenderStats:
        """A consistent snapshot of the counters."""
        with self._cond:
            return self._c.snapshot(pending=len(self._pending), sounding=len(self._sounding))

    @property
    def lead_s(self) -> float:
        """How early every event is sent (half a JACK period); settable from any thread."""
        return self._lead_s

    @lead_s.setter
    def lead_s(self, lead_s: float) -> None:
        if not lead_s >= 0:
            raise ValueError(f"lead_s must be non-negative, got {lead_s!r}")
        with self._cond:
            self._lead_s = float(lead_s)
            self._cond.notify_all()  # the thread's next wake-up moves with it

    # --- internals (``_locked``: caller holds self._cond) ---------------------------------

    def _push_locked(self, t: float, kind: int, payload: Note | Resend | mido.Message) -> None:
        entry: _Entry = (t, kind, next(self._seq), payload)
        heapq.heappush(self._heap, entry)
        # Wake the thread only when its next deadline moved earlier: every needless
        # wake-up costs a GIL hand-over, which under load is the expensive part.
        if self._heap[0] is entry:
            self._cond.notify_all()

    @staticmethod
    def _live(entry: _Entry) -> bool:
        _, kind, _, payload = entry
        if not isinstance(payload, Note):
            return True
        if kind == _ON:
            return payload.state == PENDING
        return payload.state != DONE

    def _drop_pending_locked(self) -> None:
        for note in self._pending:
            note.state = DONE
        self._c.cancelled += sum(1 for n in self._pending if n.droppable)
        self._pending.clear()
        # Sounding notes' note-offs are in the heap too: the release sends them now.
        self._heap.clear()

    def _request_release_locked(self, *, ccs: bool) -> int:
        self._release_req += 1
        self._release_ccs = self._release_ccs or ccs
        return self._release_req

    def _take_release_locked(self) -> tuple[int, list[_Out]]:
        now = time.monotonic()
        out: list[_Out] = []
        for note in self._sounding.values():
            note.state = DONE
            # a note-on goes out up to a lead early, so a release can come before the
            # time it was scheduled for; the note-off is never reported before it (the
            # take would hold an off before its on, and a note hanging to the end)
            out.append((max(now, note.on), note.msg_off, note.tag, False))
        self._sounding.clear()
        if self._release_ccs:
            channels: Iterable[int] = (
                range(16) if self._panic_all_channels else sorted(self._channels)
            )
            for ch in channels:
                out.append((now, self._cc_all_off[ch], None, False))
                out.append((now, self._cc_sustain_off[ch], None, False))
        self._release_ccs = False
        self._release_taken = self._release_req
        return self._release_taken, out

    def _send_release(self, gen: int, out: list[_Out]) -> None:
        results = self._emit(out)
        with self._cond:
            self._release_done = max(self._release_done, gen)
            self._cond.notify_all()
        self._finish(results)

    def _release_inline(self) -> None:
        """Release on the caller's thread: only when the sender thread is not running."""
        with self._cond:
            if self._running or self._release_taken >= self._release_req:
                return
            gen, out = self._take_release_locked()
        self._send_release(gen, out)

    def _take_due_locked(self, now: float) -> list[_Out]:
        """Pop every entry due by ``now`` and update the sounding set accordingly."""
        out: list[_Out] = []
        horizon = now + self._lead_s
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            t, kind, _, payload = heapq.heappop(heap)
            if isinstance(payload, Resend):
                if cuts_nothing(payload.recent.msg, self._sounding):
                    self._c.resent += 1
                    out.append((t, payload.recent.msg, payload.recent, False))
            elif isinstance(payload, Note):
                note = payload
                if kind == _ON:
                    if note.state != PENDING:
                        continue
                    self._pending.discard(note)
                    if note.droppable and horizon - t > self._late_drop_s:
                        note.state = DONE
                        self._c.dropped_late += 1
                        continue
                    prev = self._sounding.get(note.key)
                    if prev is not None:
                        # One note-off per note-on: end the sounding one first; its own
                        # scheduled note-off is then skipped.
                        prev.state = DONE
                        self._c.retriggered += 1
                        out.append((t, prev.msg_off, prev.tag, note.droppable))
                    note.state = SOUNDING
                    self._sounding[note.key] = note
                    out.append((t, note.msg_on, note.tag, note.droppable))
                else:
                    if note.state != SOUNDING:
                        continue
                    note.state = DONE
                    del self._sounding[note.key]
                    out.append((t, note.msg_off, note.tag, True))
            else:
                msg = payload
                if msg.type in ("note_off", "note_on"):
                    # A passed-through note-off ends whatever sounds on that key.
                    ended = self._sounding.pop((int(msg.channel), int(msg.note)), None)
                    if ended is not None:
                        ended.state = DONE
                        t = max(t, ended.on)  # as for a release: never before its on
                out.append((t, msg, None, False))
        return out

    def _emit(self, out: list[_Out]) -> list[tuple[Sent, bool, list[tuple[int, Exception]]]]:
        """Call the sinks: the timing-critical part, so nothing else happens here."""
        results: list[tuple[Sent, bool, list[tuple[int, Exception]]]] = []
        for scheduled, msg, tag, timed in out:
            actual = time.monotonic()
            errors: list[tuple[int, Exception]] = []
            for i, sink in enumerate(self._sinks):
                try:
                    sink(msg)
                except Exception as e:  # a broken sink must not stop the others
                    errors.append((i, e))
            results.append((Sent(scheduled, actual, msg, tag), timed, errors))
        return results

    def _finish(self, results: list[tuple[Sent, bool, list[tuple[int, Exception]]]]) -> None:
        """After sending: counters, error logs and ``on_sent``, off the timing path."""
        if not results:
            return
        with self._cond:
            for sent, timed, errors in results:
                self._c.sent += 1
                if isinstance(sent.tag, Recent):
                    # a repeat: not a new note-off; it may be repeated again (bounded)
                    sent.tag.sent_at = sent.actual
                    sent.tag.repeats += 1
                    self._c.sink_errors += len(errors)
                    continue
                if sent.message.type == "note_on":
                    self._c.notes_on += 1
                elif sent.message.type == "note_off":
                    self._c.notes_off += 1
                if is_release(sent.message):
                    self._recent_offs.append(Recent(sent.actual, sent.message))
                self._c.sink_errors += len(errors)
                if timed:
                    lateness = sent.actual - (sent.scheduled - self._lead_s)
                    self._c.max_lateness_s = max(self._c.max_lateness_s, lateness)
                    self._c.late += lateness > _LATE_S
        for sent, _, errors in results:
            for i, err in errors:
                self._sink_errors.log(i, sent.message, err)
        if self._on_sent is None:
            return
        n_failed = 0
        for sent, _, _ in results:
            if isinstance(sent.tag, Recent):
                continue  # the take and the trace hold each note-off once
            try:
                self._on_sent(sent)
            except Exception:
                n_failed += 1
                if n_failed == 1:
                    log.exception("sender on_sent callback failed")
        if n_failed:
            with self._cond:
                self._c.callback_errors += n_failed

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        set_realtime(self._realtime_priority)
        try:
            while True:
                try:
                    if not self._step():
                        return
                except Exception:
                    # Never die: a dead sender would leave notes hanging on every peer.
                    log.exception("sender thread error (continuing)")
                    time.sleep(0.01)
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            # A release asked for while the thread was stopping must still happen.
            self._release_inline()

    def _spin_cap(self) -> float:
        """The longest spin that cannot be cut short by a forced GIL hand-over.

        A thread waiting for the GIL forces a switch one switch interval after it started
        waiting, which is no earlier than when this thread got the GIL: a spin no longer
        than the interval keeps the GIL until the event has gone out.
        """
        return max(self._spin_s, min(self._max_spin_s, 0.9 * sys.getswitchinterval()))

    def _step(self) -> bool:
        """Wait for the next event, spin to its time, send what is due. False: stop."""
        release: tuple[int, list[_Out]] | None = None
        target = 0.0
        with self._cond:
            while True:
                if self._release_req != self._release_taken:
                    release = self._take_release_locked()
                    break
                if self._stopping:
                    return False
                if not self._heap:
                    self._cond.wait()
                    continue
                target = self._heap[0][0] - self._lead_s
                spin = min(self._spin_s + self._wake_late_s, self._spin_cap())
                wake_at = target - spin
                now = time.monotonic()
                if now >= wake_at:
                    break
                if not self._cond.wait(wake_at - now):
                    # A timed-out wait: how late did it return? (GIL hand-over, scheduler.)
                    late = max(0.0, time.monotonic() - wake_at)
                    self._wake_late_s = min(
                        self._spin_cap(), max(late * 1.25, self._wake_late_s * 0.97)
                    )
        if release is not None:
            self._send_release(*release)
            return True
        # The spin holds the GIL on purpose: releasing it (time.sleep(0)) would let a busy
        # Python thread keep it for a whole switch interval.
        t0 = time.monotonic()
        now = t0
        while now < target:
            now = time.monotonic()
        with self._cond:
            out = self._take_due_locked(now)
            self._c.max_spin_s = max(self._c.max_spin_s, now - t0)
        self._finish(self._emit(out))
        return True
