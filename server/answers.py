"""Answers: the model generates on a worker thread, the loop places the notes.

:class:`Answers` receives a generator, the grid (the clock read at one moment, see
:class:`~divergent.server.performance.Timeline`) and a :class:`NoteSink` (the sender),
never the whole server. Notes cross threads once: the worker hands each bar, as soon as
it exists, to the event loop through one bounded queue; everything after that (holding a
speculative answer back, placing notes on the beat grid, the deferred notes of a followed
clock, cutting or yielding an answer) happens on the loop, so no lock guards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from divergent.server.performance import Grid, StartAnswer, Timeline

__all__ = ["DEFER_S", "AnswerJob", "AnswerSettings", "Answers", "NoteSink"]

log = logging.getLogger("divergent.server")

#: With a followed clock, notes further ahead than this wait in beats (tempo may change).
DEFER_S = 0.25
#: Time for the sender to wake and spin before the first note of an answer.
_LEAD_S = 0.002
#: Bars waiting between the worker and the loop; the worker waits when it is full.
HANDOFF_SIZE = 256


class NoteSink(Protocol):
    """Where placed notes go (the :class:`~divergent.server.sender.Sender`)."""

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
        """Play a note from ``on`` to ``off`` (monotonic seconds)."""
        ...

    def cancel(self, tag: object | None = None) -> int:
        """Drop pending notes tagged ``tag``; sounding ones keep their note-off."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerSettings:
    """The knobs an answer is generated with (the app's live parameters at its start)."""

    bars: int
    divergence: float
    temperature: float
    top_p: float
    seed: int
    quantize: str
    channel: int  # 0-15
    concept_strength: float  # no effect without a concept (model.generate)
    anchor_seed: int | None = None  # the knob's anchor (None: seed's; a jam phrase's)


@dataclass(frozen=True, slots=True)
class _BeatNote:
    on: float  # beats
    off: float
    pitch: int
    velocity: int
    channel: int
    tag: int


@dataclass(eq=False)
class AnswerJob:
    """One answer: generated on the worker (:meth:`run`), placed on the loop."""

    request: StartAnswer
    settings: AnswerSettings
    cancel: threading.Event = field(default_factory=threading.Event)
    released: bool = False
    released_at: float | None = None  # when it was let sound (a warm one: on demand)
    done: bool = False
    failed: bool = False
    readout: Any = None
    pending: list[Any] = field(default_factory=list)  # notes made before the release
    shift: float | None = None  # beats added to the model's onsets (None until the first)
    first_on: float | None = None
    last_off: float | None = None
    scheduled: list[float] = field(default_factory=list)

    @property
    def answer_id(self) -> int:
        """The answer's number (also its notes' tag)."""
        return self.request.answer_id

    def usable(self) -> bool:
        """Not failed and not stopped."""
        return not self.failed and not self.cancel.is_set()

    def run(self, generator: Any, hand: Callable[[AnswerJob, list[Any]], None]) -> Any:
        """Generate (the worker thread); each bar goes to ``hand`` as soon as it exists."""
        from divergent.model.generate import ids_from_notes

        req, s = self.request, self.settings
        ids = ids_from_notes(generator.model, list(req.notes))
        bars = s.bars
        min_onset = None
        if req.jam_bar is not None:
            # generate exactly up to the end of the jam bar: the bars between the prompt's
            # last bar and the jam bar stay empty (no onset may come before the jam bar)
            min_onset = req.jam_bar - req.origin
            last_bar = math.floor(max(n[0] for n in req.notes) / 4.0)
            bars = max(1, round(min_onset / 4.0) - last_bar)
        cont = generator.continue_ids(
            ids,
            bars=bars,
            seed=s.seed,
            temperature=s.temperature,
            top_p=s.top_p,
            divergence=s.divergence,
            min_onset_beats=min_onset,
            on_notes=lambda notes: hand(self, list(notes)),
            cancel=self.cancel,
            concept_strength=s.concept_strength,
            anchor_seed=s.anchor_seed,
        )
        return generator.readout(cont)


class Answers:
    """Runs answer jobs one at a time and places their notes; every method but the
    worker's runs on the event loop.

    Callbacks (all on the loop): ``on_first_note(job, t_on)``; ``on_readout(job)`` once a
    released answer's readout exists; ``on_over(job)`` once a released answer is fully
    placed (``job.last_off`` known); ``on_failed(job)`` when an answer ends without
    sounding; ``on_error(message)`` for a failure worth telling the peers. For the
    browser view: ``on_notes(job, notes, placed)`` with each bar as it arrives (model
    notes, before the release) and as it is placed (grid notes with ``on``, ``off``,
    ``pitch``, ``velocity`` in beats, after they went to the sink), ``on_cancel(answer_id)``
    when an answer's notes still to come go (None: every answer's); both must return at
    once (they run on the placement path). ``after_job()`` runs on the worker after each
    job, generated or failed (the server gives the C heap's free pages back there).
    """

    def __init__(
        self,
        *,
        generator: Any,
        grid: Callable[[], Grid],
        sink: NoteSink,
        now: Callable[[], float] = time.monotonic,
        on_first_note: Callable[[AnswerJob, float], None] | None = None,
        on_readout: Callable[[AnswerJob], None] | None = None,
        on_over: Callable[[AnswerJob], None] | None = None,
        on_failed: Callable[[AnswerJob], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_notes: Callable[[AnswerJob, list[Any], bool], None] | None = None,
        on_cancel: Callable[[int | None], None] | None = None,
        handoff_size: int = HANDOFF_SIZE,
        after_job: Callable[[], object] | None = None,
    ) -> None:
        self.generator = generator
        self._grid = grid
        self._sink = sink
        self._now = now
        self._on_first_note = on_first_note or (lambda job, t: None)
        self._on_readout = on_readout or (lambda job: None)
        self._on_over = on_over or (lambda job: None)
        self._on_failed = on_failed or (lambda job: None)
        self._on_error = on_error or (lambda message: None)
        self._on_notes = on_notes or (lambda job, notes, placed: None)
        self._on_cancel = on_cancel or (lambda answer_id: None)
        self._after_job = after_job or (lambda: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divergent-infer")
        # the one hand-off between threads: (job, notes) from the worker to the loop
        self._handoff: queue.Queue[tuple[AnswerJob, list[Any]]] = queue.Queue(handoff_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, AnswerJob] = {}
        self._generating: tuple[AnswerJob, asyncio.Future[Any]] | None = None
        # notes of a followed clock kept in beats until shortly before they play
        self._deferred: list[_BeatNote] = []

    # ------------------------------------------------------------------ the worker

    def call_in_worker(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the worker thread (e.g. loading the model)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _run(self, job: AnswerJob, generator: Any) -> Any:
        # the worker thread: the job, then what is done between answers
        try:
            return job.run(generator, self._hand)
        finally:
            try:
                self._after_job()
            except Exception:  # housekeeping: the answer must not fail because of it
                log.exception("after an answer")

    def _hand(self, job: AnswerJob, notes: list[Any]) -> None:
        # the worker thread: waits while the loop is behind by a whole queue, never drops
        loop = self._loop
        if loop is None or job.cancel.is_set():
            return
        while not job.cancel.is_set():
            try:
                self._handoff.put((job, notes), timeout=0.1)
                break
            except queue.Full:
                continue
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody listens
            loop.call_soon_threadsafe(self._take)

    def _take(self) -> None:
        while True:
            try:
                job, notes = self._handoff.get_nowait()
            except queue.Empty:
                return
            if job.cancel.is_set():
                continue
            if not job.released:
                job.pending.extend(notes)
                self._on_notes(job, notes, False)  # the preview: generated, not yet placed
            else:
                self._place(job, notes)

    # ------------------------------------------------------------------ requests

    def start(self, request: StartAnswer, settings: AnswerSettings) -> AnswerJob:
        """Start generating (one job at a time: a job still generating stops)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._generating is not None:
            self._generating[0].cancel.set()  # the old answer stops at its next token
        job = AnswerJob(request=request, settings=settings)
        self._jobs[job.answer_id] = job
        fut = loop.run_in_executor(self._executor, self._run, job, self.generator)
        self._generating = (job, fut)
        fut.add_done_callback(lambda f: self._done(job, f))
        return job

    @property
    def busy(self) -> bool:
        """Whether an answer is being generated now."""
        return self._generating is not None

    def usable(self, answer_id: int) -> bool:
        """Whether answer ``answer_id`` may still be released."""
        job = self._jobs.get(answer_id)
        return job is not None and job.usable()

    def release(self, answer_id: int) -> None:
        """Let the notes sound: those already made now, the rest as they come."""
        job = self._jobs.get(answer_id)
        if job is None or job.released:
            return
        job.released = True
        job.released_at = self._now()
        pending, job.pending = job.pending, []
        if pending:
            self._place(job, pending)
        if job.done and not job.failed:
            if job.readout is not None:
                self._on_readout(job)
            self._over(job)

    def cut(self, answer_id: int) -> None:
        """A newer answer takes over: pending notes go, sounding ones end as written."""
        self._sink.cancel(tag=answer_id)
        self._drop_deferred(answer_id)
        self._on_cancel(answer_id)

    def drop(self, answer_id: int) -> None:
        """Stop an answer that never sounded."""
        job = self._jobs.get(answer_id)
        if job is not None:
            job.cancel.set()
        self._on_cancel(answer_id)

    def stop(self, answer_id: int) -> None:
        """Stop an answer now: no more generation, no more of its notes placed."""
        self.drop(answer_id)
        self.cut(answer_id)

    def stop_all(self) -> None:
        """Stop every answer (panic): generation ends, deferred notes go."""
        for job in self._jobs.values():
            job.cancel.set()
        self._deferred.clear()
        self._on_cancel(None)

    # ------------------------------------------------------------------ completion

    def _done(self, job: AnswerJob, fut: asyncio.Future[Any]) -> None:
        if self._generating is not None and self._generating[0] is job:
            self._generating = None
        self._take()  # bars handed just before the end are placed first
        job.done = True
        if fut.cancelled():
            self._fail(job)
            return
        exc = fut.exception()
        if exc is not None:
            self._report(job, exc)
            self._fail(job)
            return
        readout = fut.result()
        if job.cancel.is_set() and not job.scheduled and not job.pending:
            self._fail(job)  # stopped before any note was made: nothing to read out
            return
        job.readout = readout
        if job.released:
            self._on_readout(job)
            self._over(job)

    def _report(self, job: AnswerJob, exc: BaseException) -> None:
        from divergent.model.generate import GenerateError

        if isinstance(exc, GenerateError):
            if job.released:  # a speculative answer's: the phrase end starts a fresh one
                self._on_error(f"answer {job.answer_id}: {exc} (rejected)")
            return
        # a bug, never only the peers' business: logged even for a speculative answer
        log.error("answer %d failed: %r", job.answer_id, exc, exc_info=exc)
        if job.released:
            self._on_error(f"answer {job.answer_id} failed: {exc}")

    def _fail(self, job: AnswerJob) -> None:
        job.failed = True
        self._jobs.pop(job.answer_id, None)
        self._on_failed(job)
        self._on_cancel(job.answer_id)

    def _over(self, job: AnswerJob) -> None:
        if job.last_off is None:
            job.last_off = self._now()
        self._jobs.pop(job.answer_id, None)
        self._on_over(job)

    async def drain(self, timeout: float, forced: asyncio.Event | None = None) -> bool:
        """Stop generating and wait up to ``timeout`` s (or until ``forced`` is set) for
        the worker to finish; True when it did. A failure is reported by the job itself."""
        current = self._generating
        for job in self._jobs.values():
            job.cancel.set()
        if current is None or current[1].done():
            return True
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.shield(current[1]))}
        force_wait = None
        if forced is not None:
            force_wait = asyncio.ensure_future(forced.wait())
            waits.add(force_wait)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if not current[1].done():
            why = "forced exit" if forced is not None and forced.is_set() else "drain timeout"
            log.warning(
                "answer %d still generating at shutdown (%s): abandoned", current[0].answer_id, why
            )
            return False
        return True

    def close(self) -> None:
        """Stop the worker (a job still running ends at its next token)."""
        for job in self._jobs.values():
            job.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ placement

    def _place(self, job: AnswerJob, notes: list[Any]) -> None:
        """Put notes on the grid: the first on the beat (or bar) the quantize asks for."""
        if job.cancel.is_set() or not notes:
            return
        clock = self._grid()
        req = job.request
        now = self._now()
        if job.shift is None:
            job.shift = self._shift(job, clock, now, req.origin + notes[0].onset_beats)
        followed = isinstance(clock, Timeline) and clock.followed
        placed: list[_BeatNote] = []
        for n in notes:
            b = req.origin + n.onset_beats + job.shift
            t_on = clock.time_at(b)
            if t_on < now - 0.005:
                continue  # a late note is dropped, never played late
            note = _BeatNote(
                b, b + n.duration_beats, n.pitch, req.velocity, job.settings.channel, job.answer_id
            )
            if followed and t_on - now > DEFER_S:
                # a followed clock may change tempo before this note: its time is taken
                # from the clock just before it plays (see feed_deferred)
                self._deferred.append(note)
            else:
                self._schedule(note, clock)
            placed.append(note)
            t_off = clock.time_at(note.off)
            job.last_off = t_off if job.last_off is None else max(job.last_off, t_off)
            job.scheduled.append(t_on)
            if job.first_on is None:
                job.first_on = t_on
                self._on_first_note(job, t_on)
        if placed:
            self._on_notes(job, placed, True)  # after every note went to the sink

    def _shift(self, job: AnswerJob, clock: Grid, now: float, first: float) -> float:
        earliest = now + _LEAD_S
        quantize = job.settings.quantize
        if job.request.jam_bar is not None:
            return 0.0
        if quantize == "off":
            # free time: the first note sounds now, the rest keep their spacing
            return clock.beat_at(earliest) - first
        unit = 1.0 if quantize == "beat" else 4.0
        need = clock.beat_at(earliest) - first
        return max(0.0, math.ceil(need / unit) * unit)

    def _schedule(self, note: _BeatNote, clock: Grid) -> None:
        self._sink.schedule_note(
            on=clock.time_at(note.on),
            off=clock.time_at(note.off),
            pitch=note.pitch,
            velocity=note.velocity,
            channel=note.channel,
            tag=note.tag,
        )

    def _drop_deferred(self, tag: int) -> None:
        self._deferred = [n for n in self._deferred if n.tag != tag]

    def feed_deferred(self) -> None:
        """Deferred notes due within DEFER_S go to the sink, timed by the grid as it stands
        now, so a tempo change of the clock master moves the notes with it."""
        if not self._deferred:
            return
        clock = self._grid()
        horizon = self._now() + DEFER_S
        due = [n for n in self._deferred if clock.time_at(n.on) <= horizon]
        if due:
            self._deferred = [n for n in self._deferred if clock.time_at(n.on) > horizon]
            for note in due:
                self._schedule(note, clock)
