"""The app's takes desk: starting and finishing takes off the loop (the journal and the
``.mid`` touch the disk), and what happens when the disk cannot be written.

A mixin of :class:`~divergent.server.app.Server`, as :class:`Conductor` is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

from divergent.server.handlers import VERSION
from divergent.server.recorder import TakeRecorder
from divergent.server.telemetry import Stats

__all__ = ["TakesDesk"]

log = logging.getLogger("divergent.server")


#: the take's two tracks
Track = Literal["performer", "machine"]


class TakesDesk(ABC):
    """Take requests in, takes on disk; the app supplies the state below."""

    take: TakeRecorder | None
    sessions: Path
    clock: Any
    clock_source: str
    divergence: float
    temperature: float
    bars: int
    concept: str
    concept_strength: float
    disk_fault: str
    stats: Stats
    _writes: set[asyncio.Task[None]]
    #: one take change at a time: a second record/start waits for the first (else the
    #: first's new take was replaced before anything closed it)
    _take_lock: asyncio.Lock
    #: notes played while a new take's journal is being made (between the old take's
    #: end and the new one's start), for the new take: none is lost in the switch
    _take_gap: list[tuple[float, Track, Any]] | None = None

    @property
    @abstractmethod
    def mode(self) -> str:
        """call, jam or off."""

    @abstractmethod
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A tracked task."""

    @abstractmethod
    def _fault(self, message: str) -> None:
        """A fault of the rig, said everywhere."""

    @abstractmethod
    def _report_health(self) -> None:
        """The health reply and the MQTT status."""

    def _request_take(self, name: str | None) -> None:
        self._spawn(self._start_take(name))

    def _request_stop(self) -> None:
        self._spawn(self._stop_take())

    async def _stop_take(self) -> None:
        """record/stop: in turn with the take starts asked for before it."""
        async with self._take_lock:
            self._close_take()

    def _record_note(self, t: float, who: Track, msg: Any) -> None:
        """A performer's or the machine's note into the take, or into the gap while a
        new take is being started."""
        if self.take is not None:
            self.take.note(t, who, msg)
        elif self._take_gap is not None:
            self._take_gap.append((t, who, msg))

    async def _start_take(self, name: str | None) -> None:
        """A new take; the journal is created in a thread (it touches the disk). What is
        played meanwhile is kept and goes into the new take."""
        async with self._take_lock:
            self._close_take()
            gap: list[tuple[float, Track, Any]] = []
            self._take_gap = gap
            try:
                await self._open_take(name)
            finally:
                self._take_gap = None
            if self.take is not None:
                for t, who, msg in gap:
                    self.take.note(t, who, msg)

    async def _open_take(self, name: str | None) -> None:
        now = time.monotonic()
        meta = {"divergent": VERSION, "clock": self.clock_source, "mode": self.mode}
        loop = asyncio.get_running_loop()

        def on_fault(message: str) -> None:  # the loop, or the thread closing the take
            loop.call_soon_threadsafe(self._take_fault, message)

        self.take = await asyncio.to_thread(
            functools.partial(
                TakeRecorder,
                folder=self.sessions,
                name=name,
                bpm=self.clock.bpm(),
                start=now,
                meta=meta,
                on_fault=on_fault,
            )
        )
        for key, value in (
            ("divergence", self.divergence),
            ("temperature", self.temperature),
            ("bars", self.bars),
            ("mode", self.mode),
            ("concept", self.concept),
            ("concept_strength", self.concept_strength),
        ):
            self.take.control(now, key, value)
        log.info("recording %s", self.take.path)

    def _close_take(self) -> None:
        """Finish the take; the .mid is written in a thread (a long take takes a while)."""
        take, self.take = self.take, None
        if take is not None:
            task = asyncio.get_running_loop().create_task(self._write_take(take))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_take(self, take: TakeRecorder) -> None:
        try:
            path = await asyncio.to_thread(take.close, time.monotonic())
        except OSError as e:
            # neither the sessions folder nor a rescue folder: what reached the journal
            # stays for `divergent sessions` to recover
            self._fault(f"cannot write the take {take.name}: {e} (its journal is kept)")
            return
        log.info("take written: %s", path)

    def _take_fault(self, message: str) -> None:
        """The take's journal cannot be written (message), or is again ("")."""
        if message and not message.startswith("take written"):
            self.stats.disk_faults += 1
            self.disk_fault = message
            self._fault(message)
            return
        self.disk_fault = ""
        if message:
            self._fault(message)  # written to the rescue folder: where it is matters
        else:
            log.warning("the take's journal is written again")
            self._report_health()
