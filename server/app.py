"""The live server: MIDI (or OSC notes) in, steered continuations out, on the beat, recorded.

Shape (uvicorn-like): :class:`ServeConfig` says what to run, :class:`Server` runs it
through ``startup → main loop → shutdown`` with signal handling and a drain timeout.
The rooms (see ``README.md``):

- :class:`~divergent.server.performance.Performance` decides (phrases, speculation,
  jam bars, turn-taking, echoes): notes and time in, requests out, no I/O;
- :class:`~divergent.server.answers.Answers` generates on one worker thread and places
  the notes on the loop;
- this module owns the lifecycle (every bridge entered through one ``AsyncExitStack``),
  input, carrying out the requests, takes, status; the control setters are
  :class:`~divergent.server.handlers.ControlHandlers`.

Threads: the asyncio loop owns all state; rtmidi's poller hands input events to it
through a bounded queue; the inference worker hands finished bars to it through another
(``Answers``); the sender thread plays notes at their times and reports what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mido

from divergent.bridges.clock import Clock, InternalClock, LinkClock, MidiClockFollower, make_clock
from divergent.bridges.midi import MidiEvent, MidiIO
from divergent.bridges.mqtt import MqttBridge
from divergent.bridges.osc import OscBridge
from divergent.model.concept import default_concepts_dir
from divergent.model.runtime import check_device
from divergent.server.answers import Answers
from divergent.server.concept_desk import ConceptDesk
from divergent.server.concepts import (
    NONE,
    ConceptLoader,
    PlayedNotes,
    canonical_spec,
)
from divergent.server.conductor import Conductor
from divergent.server.config import ServeConfig
from divergent.server.doors import Doors
from divergent.server.handlers import VERSION, ControlHandlers
from divergent.server.health import HealthDesk
from divergent.server.heap import HeapTrimmer
from divergent.server.performance import Performance, Timeline
from divergent.server.ports import (
    MidiPort,
    MidiPortFactory,
    SenderSink,
    open_midi_port,
    sender_lead,
)
from divergent.server.recorder import (
    TakeRecorder,
    default_sessions_dir,
    recover,
    rescue_dirs,
    writable_problem,
)
from divergent.server.sender import Sender, Sent
from divergent.server.takes_desk import TakesDesk
from divergent.server.telemetry import REPLIES, STATUS, Stats, Trace
from divergent.server.web import WebView
from divergent.server.web_desk import WebDesk

__all__ = ["REPLIES", "VERSION", "MidiPort", "MidiPortFactory", "Server", "open_midi_port"]

log = logging.getLogger("divergent.server")

_NOTE_TYPES = frozenset({"note_on", "note_off"})
_CLOCK_TYPES = frozenset({"clock", "start", "continue", "stop", "songpos"})
# the sender's timing needs the GIL handed over often (see server.sender)
_SWITCH_INTERVAL_S = 0.0005


def load_on_device(config: ServeConfig) -> Any:
    """The model ``config`` asks for (decoder and device), warmed up: the worker thread's
    first job. A device that cannot run it raises DeviceError (a ModelError)."""
    from divergent.model.generate import serving_generator

    generator = serving_generator(config.model_dir, decoder=config.decoder, device=config.device)
    log.info("%s", generator.decoder_choice.banner())
    return generator


class Server(Conductor, ConceptDesk, HealthDesk, TakesDesk, ControlHandlers, Doors, WebDesk):
    """One live session: ``await Server(config).serve()`` runs until SIGINT/SIGTERM.

    ``midi_factory`` opens the MIDI port (tests pass a fake); ``generator_factory`` loads
    the model (called on the worker thread; default: the ONNX model of the config).
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        print_banner: bool = True,
        midi_factory: MidiPortFactory = open_midi_port,
        generator_factory: Callable[[ServeConfig], Any] | None = None,
    ) -> None:
        self.config = config
        self.print_banner = print_banner
        self.midi_factory = midi_factory
        self.generator_factory = generator_factory or load_on_device
        self.should_exit = False
        self.force_exit = False
        self.ready = asyncio.Event()
        self.stats = Stats()
        # live parameters (the config holds the start values)
        self.quantize = config.quantize
        self.divergence = config.divergence
        self.temperature = config.temperature
        self.concept_strength = config.concept_strength
        self.bars = config.bars
        self.seed = config.seed
        self.clock_source = config.clock
        self.clock: Clock = InternalClock(bpm=config.bpm)
        self._free = Timeline(time.monotonic(), 0.0, config.bpm)
        self.perf = Performance(
            now=time.monotonic,
            grid=lambda: self.grid,
            mode=config.mode,
            phrase_silence_s=config.phrase_silence_s,
            bar_ends_phrase=config.bar_ends_phrase,
            velocity=config.velocity,
            yield_turn=config.yield_ == "on",
            usable=lambda answer_id: self.answers is not None and self.answers.usable(answer_id),
        )
        self.answers: Answers | None = None
        self.take: TakeRecorder | None = None
        self._take_lock = asyncio.Lock()
        self.midi: MidiPort | None = None
        self.midi_error = ""
        # what does not work right now ("" when it does): /divergent/health, MQTT status
        self.midi_fault = ""
        self.disk_fault = ""
        self._malformed_said = 0.0  # when malformed MIDI input was last reported
        self.osc: OscBridge | None = None
        self.mqtt: MqttBridge | None = None
        self.sender: Sender | None = None
        self.web: WebView | None = None  # the browser view (web.py), None without one
        self.web_error = ""
        self.trace = Trace(Path(config.trace) if config.trace else None)
        self.sessions = Path(config.sessions) if config.sessions else default_sessions_dir()
        self.cold_start_s = 0.0
        self.warmed_prefills = 0  # prompt lengths prefilled after start (_warm_prefills)
        self._stack = contextlib.AsyncExitStack()
        self._forced = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: set[asyncio.Task[None]] = set()  # takes being written (awaited at exit)
        self._midi_q: asyncio.Queue[MidiEvent] | None = None
        self._sent: deque[Sent] = deque()  # filled by the sender thread, drained by the loop
        self._timer: asyncio.TimerHandle | None = None
        self._last_tempo = config.bpm
        # machine notes sounding now, by (channel, pitch): their answer's id
        self._sounding: dict[tuple[int, int], int] = {}
        self._yielded: deque[int] = deque(maxlen=8)  # answers that gave the turn back
        # concepts: the active one, the base model's generator, the loader, what was played
        self.concept = NONE
        self.concepts_dir = Path(config.concepts) if config.concepts else default_concepts_dir()
        self._base_generator: Any = None
        self._concept_loader = ConceptLoader(folder=self.concepts_dir)
        self._concept_seq = 0  # the latest switch request: an older one that loads later loses
        self._played = PlayedNotes()
        self._learning: tuple[str, asyncio.Task[None]] | None = None
        self._learn_proc: asyncio.subprocess.Process | None = None

    @property
    def mode(self) -> str:
        """call, jam or off (the state machine's)."""
        return self.perf.mode

    @property
    def grid(self) -> Timeline:
        """The grid answers are placed on: an immutable snapshot of the leading clock, or
        free time at its tempo while a MIDI clock master is stopped or silent (its
        position is frozen then). A reader's snapshot never changes under it."""
        clock, now = self.clock, time.monotonic()
        if isinstance(clock, MidiClockFollower) and not clock.running():
            bpm = clock.bpm()
            if abs(self._free.tempo - bpm) > 1e-6:
                self._free = self._free.retempo(bpm, now)  # replaced, never changed
            return self._free
        followed = isinstance(clock, MidiClockFollower | LinkClock)
        return Timeline(now, clock.beat_at(now), clock.bpm(), followed)

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """startup → run until asked to exit → shutdown (always)."""
        self.install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask to exit; a second one stops waiting (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (e.g. tests)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: int | None = None) -> None:
        """First signal: shut down in order. Second: stop waiting for the answer (uvicorn's
        force exit); notes are still silenced and the journal kept."""
        if self.should_exit:
            log.warning("second signal: exiting now")
            self.force_exit = True
            self._forced.set()
        self.should_exit = True

    async def startup(self) -> None:
        """Open everything through the exit stack; ``ready`` is set at the end."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        # a device this ONNX Runtime cannot use is refused before anything opens
        await asyncio.to_thread(check_device, self.config.device)
        stack = self._stack
        stack.callback(sys.setswitchinterval, sys.getswitchinterval())
        # a busy inference thread would otherwise hold the GIL for up to 5 ms at a time,
        # which the sender thread and the loop feel as jitter
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        stack.callback(self.trace.close)
        self._midi_q = asyncio.Queue(maxsize=8192)
        answers = self._make_answers()
        stack.callback(answers.close)
        stack.callback(self._concept_loader.close)
        # a learning process still running ends with the server
        stack.push_async_callback(self._stop_learning)
        # the model loads in the worker while MIDI and OSC come up
        model_future = answers.call_in_worker(functools.partial(self._load_model, answers))
        if self.config.device != "cpu":
            # the GPU's own checks (its provider started, every compute node placed on
            # it) before any port opens: a refusal leaves nothing half-open
            await model_future
        stack.callback(self._close_clock)
        self.clock = self._make_clock(self.clock_source)
        await self._open_midi(loop)
        await model_future
        # the take first: a performer's first note may come the moment OSC answers a
        # ping, and it must be recorded
        problem = await asyncio.to_thread(writable_problem, self.sessions)
        if problem is not None:
            # said at start, loudly; takes are still kept (in memory, then a rescue folder)
            self.disk_fault = (
                f"sessions folder not writable: {problem}; takes are kept in memory and "
                f"written to {rescue_dirs()[0]} if it stays so"
            )
            log.error("%s", self.disk_fault)
            print(f"divergent: {self.disk_fault}", file=sys.stderr, flush=True)
        recovered = await asyncio.to_thread(recover, self.sessions)
        for path in recovered:
            log.info("recovered an unfinished take: %s", path)
        if self.config.record:
            await self._start_take(None)
        await self._open_osc()
        await self._open_mqtt()
        await self._open_web()
        if self.midi_fault:
            # no JACK server yet, or a named port not there yet: the watchdog waits for
            # it; said where the performer looks (error, health, MQTT), not only the log
            self._fault(self.midi_fault)
        self._start_sender()
        for coro in (self._consume_midi(), self._heartbeat(), self._housekeeping()):
            self._spawn(coro)
        self._spawn(self._lag_monitor())
        self._spawn(self._feed_deferred())
        if self.config.warm_prefills:
            self._spawn(self._warm_prefills(self.config.warm_prefills))
        self._rearm()
        self.cold_start_s = time.monotonic() - t0
        if self.print_banner:
            print(self.banner(), flush=True)
        self.trace.write("ready", t=time.monotonic(), cold_start_s=self.cold_start_s)
        self.trace.flush()
        self.ready.set()

    def _make_answers(self) -> Answers:
        self.answers = Answers(
            generator=None,
            grid=lambda: self.grid,
            sink=SenderSink(lambda: self.sender),
            on_first_note=self._first_note,
            on_readout=self._finish_answer,
            on_over=lambda job: self.perf.answer_complete(job.answer_id, job.last_off or 0.0),
            on_failed=lambda job: self.perf.answer_failed(job.answer_id),
            on_error=self._error,
            on_notes=self._web_notes,
            on_cancel=lambda answer_id: self._publish("cancel", time.monotonic(), answer_id),
            after_job=HeapTrimmer().maybe_trim,
        )
        return self.answers

    def _load_model(self, answers: Answers) -> None:
        self._base_generator = answers.generator = self.generator_factory(self.config)
        if self.config.concept is not None and canonical_spec(self.config.concept) != NONE:
            # the first answer is already in the concept (a bad one stops the start)
            spec = canonical_spec(self.config.concept)
            answers.generator, ms = self._concept_loader.build_now(spec, self._base_generator)
            self.concept = spec
            log.info("concept %s loaded in %.0f ms", spec, ms)

    def _start_sender(self) -> None:
        sinks: list[Callable[[mido.Message], None]] = []
        if self.midi is not None:
            sinks.append(self.midi.send)
        sinks.append(self._send_osc_note)
        self.sender = Sender(
            sinks=sinks,
            on_sent=self._sent.append,
            max_note_s=self.config.max_note_s,
            # half the period the ports opened on; a JACK server that appears later sets
            # it then (HealthDesk._midi_state)
            lead_s=sender_lead(self.midi),
            # below JACK's client threads (priority 5 under jackd's 10); refused quietly
            # without the right to real-time scheduling
            realtime_priority=3 if sys.platform.startswith("linux") else None,
        )
        self.sender.start()
        # closed first (the stack unwinds backwards): its note-offs still reach MIDI and
        # OSC, and the take gets them before it is written
        self._stack.push_async_callback(self._finish_output)

    async def _finish_output(self) -> None:
        if self.sender is not None:
            self.sender.close(panic=True)
        self._drain_sent()
        take, self.take = self.take, None
        if take is not None:
            await self._write_take(take)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def main_loop(self) -> None:
        """Wait until asked to exit."""
        while not self.should_exit:
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """Stop generating, silence every note, finish the take, close everything."""
        if self._timer is not None:
            self._timer.cancel()
        if self.answers is not None and not self.force_exit:
            # drain: the worker stops at its next token; a second signal stops the wait
            await self.answers.drain(self.config.drain_s, self._forced)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()
        log.info("stopped")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %r", task.exception())
            self._apply(self.perf.stop("internal error"))

    def _make_clock(self, source: str) -> Clock:
        bpm = self.clock.bpm()
        if source == "link":
            return LinkClock(bpm=bpm)
        return make_clock(source, bpm=bpm)

    def _switch_clock(self, source: str) -> None:
        old = self.clock
        self.clock = self._make_clock(source)
        if isinstance(old, LinkClock):
            old.close()
        self.clock_source = source

    def _close_clock(self) -> None:
        if isinstance(self.clock, LinkClock):
            self.clock.close()

    def banner(self) -> str:
        """What the server listens on, printed when ready."""
        cfg = self.config
        host, port = cfg.reply_address
        lines = ["divergent is listening"]
        if isinstance(self.midi, MidiIO) and self.midi.waiting:
            lines.append(f"  MIDI       down, waiting: {self.midi_fault or self.midi.fault}")
        elif self.midi is not None:
            lines.append(f"  MIDI in    {self.midi.input_name}")
            lines.append(
                f"  MIDI out   {self.midi.output_name}   (MIDI only: route it to an instrument)"
            )
        else:
            lines.append(f"  MIDI       none ({self.midi_error or '?'}); use OSC notes")
        lines.append(f"  OSC in     {cfg.osc_host}:{self.osc.port if self.osc else cfg.osc_port}")
        lines.append(f"  OSC reply  {host}:{port}")
        web = self.web.url if self.web else f"none ({self.web_error})" if self.web_error else "off"
        lines.append(f"  web        {web}")
        lines.append(f"  clock      {self.clock_source} ({self.clock.bpm():.1f} BPM)")
        lines.append(f"  mode       {self.mode} (quantize {self.quantize})")
        choice = getattr(self._base_generator, "decoder_choice", None)
        if choice is not None:
            lines.append(f"  {choice.banner()}")
        rec = str(self.take.path) if self.take else f"{self.sessions} (not recording)"
        lines.append(f"  sessions   {rec}")
        lines.append(f"  ready in   {self.cold_start_s:.2f} s")
        return "\n".join(lines)

    # ------------------------------------------------------------------ input

    def _enqueue_midi(self, ev: MidiEvent) -> None:
        assert self._midi_q is not None
        try:
            self._midi_q.put_nowait(ev)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning(
                "MIDI input queue full: dropped %s (%d so far)", ev.message.type, self.stats.dropped
            )

    async def _consume_midi(self) -> None:
        assert self._midi_q is not None
        while True:
            ev = await self._midi_q.get()
            self.stats.midi_in += 1
            try:
                self._on_midi(ev.time, ev.message)
            except Exception:
                # one bad event must not end the input path on stage
                log.exception("MIDI input %s failed", ev.message)

    def _on_midi(self, t: float, msg: mido.Message, *, echo_guard: bool = True) -> None:
        if msg.type in _CLOCK_TYPES:
            if isinstance(self.clock, MidiClockFollower):
                what = self.clock.feed(t, msg)
                if what in ("start", "stop") and self.take is not None:
                    self.take.control(t, "transport", what)
            return
        if msg.type in _NOTE_TYPES:
            on = msg.type == "note_on" and msg.velocity > 0
            self._drain_sent()  # the echo guard needs the machine's latest notes
            if echo_guard and self.perf.is_echo(t, msg.channel, msg.note, on, msg.velocity):
                self.stats.echoes = self.perf.echoes
                if self.perf.echoes == 1:
                    log.warning(
                        "divergent's own notes are coming back on its input (is `divergent "
                        "out` routed into `divergent in`?): ignoring the echoes"
                    )
                return
            self._apply(self.perf.performer_note(t, on, msg.note, msg.velocity, msg.channel))
            self._publish("performer", t, on, msg.note, msg.velocity)
            # the material /divergent/concept/learn learns from
            self._played.add(t, on, msg.note, msg.velocity, msg.channel)
        if not msg.is_meta and hasattr(msg, "channel"):
            self._record_note(t, "performer", msg)

    # ------------------------------------------------------------------ output

    def _send_osc_note(self, msg: mido.Message) -> None:
        # runs on the sender thread: OscBridge.send is a plain UDP sendto (thread-safe)
        osc = self.osc
        if osc is None or msg.type not in _NOTE_TYPES:
            return
        vel = msg.velocity if msg.type == "note_on" else 0
        osc.send("/divergent/out/note", msg.note, vel, msg.channel + 1)

    def _drain_sent(self) -> None:
        """What the sender played: to the state machine, the take and the trace."""
        while self._sent:
            s = self._sent.popleft()
            msg = s.message
            if msg.type in _NOTE_TYPES:
                on = msg.type == "note_on" and msg.velocity > 0
                key = (msg.channel, msg.note)
                self.perf.machine_note(s.actual, msg.channel, msg.note, msg.velocity, on)
                if on:
                    self.stats.notes_out += 1
                    if isinstance(s.tag, int):
                        self._sounding[key] = s.tag
                    if s.tag in self._yielded:
                        self._note_off_now(msg.channel, msg.note)  # it left as we yielded
                else:
                    self._sounding.pop(key, None)
                self._publish("sounded", s.actual, s.tag, msg.note, on)
            self._record_note(s.scheduled, "machine", msg)
            self.trace.write(
                "sent",
                scheduled=s.scheduled,
                actual=s.actual,
                type=msg.type,
                note=getattr(msg, "note", -1),
            )

    def sounding(self) -> int:
        """Machine notes sounding now (the sender's count)."""
        return self.sender.sounding() if self.sender else 0

    async def _feed_deferred(self) -> None:
        """Every 20 ms: deferred notes due soon go to the sender (see Answers)."""
        while True:
            await asyncio.sleep(0.02)
            if self.answers is not None:
                self.answers.feed_deferred()

    def _send(self, address: str, *args: Any) -> None:
        if self.osc is not None:
            self.osc.send(address, *args)
        self._publish("reply", time.monotonic(), address, args)

    def _error(self, message: str) -> None:
        self.stats.osc_errors += 1
        log.info("error: %s", message)
        self._send("/divergent/error", message)
        if self.mqtt is not None:
            self.mqtt.publish_error(message)

    # ------------------------------------------------------------------ status

    def status_dict(self) -> dict[str, Any]:
        """The status as JSON-ready fields (MQTT's retained status)."""
        names = [a.name for a in STATUS.args]
        status = dict(zip(names, self.status_args(), strict=True))
        status["midi"], status["disk"] = self.health_args()
        return status

    def status_args(self) -> tuple[Any, ...]:
        """The /divergent/status values, in declaration order."""
        return (
            self.mode,
            float(self.clock.bpm()),
            self.clock_source,
            float(self.divergence),
            # 2: recording, but the journal cannot reach the disk (kept in memory)
            (2 if self.take.fault else 1) if self.take is not None else 0,
            float(self.temperature),
            int(self.bars),
            self.quantize,
            int(self.stats.answers),
            self.concept,
            float(self.concept_strength),
        )

    async def _heartbeat(self) -> None:
        if self.config.heartbeat_s <= 0:
            return
        while True:
            self._send("/divergent/status", *self.status_args())
            if self.midi_fault or self.disk_fault:
                self._send("/divergent/health", *self.health_args())
            if self.mqtt is not None:
                self.mqtt.publish_status(self.status_dict())
            await asyncio.sleep(self.config.heartbeat_s)

    async def _housekeeping(self) -> None:
        """Every 50 ms: record what the sender played, flush the take, note tempo changes."""
        while True:
            await asyncio.sleep(0.05)
            try:
                self._housekeep()
            except OSError as e:
                # a full disk must not stop the music: the journal keeps what it has
                log.error("housekeeping: %s", e)

    def _housekeep(self) -> None:
        self._drain_sent()
        self._count_malformed_midi()
        bpm = self.clock.bpm()
        if abs(bpm - self._last_tempo) >= 0.5:
            self._last_tempo = bpm
            if self.take is not None:
                self.take.tempo(time.monotonic(), bpm)
        if self.take is not None:
            self.take.flush()
        self.trace.flush()

    async def _warm_prefills(self, count: int) -> None:
        """The model's prefills at ``count`` prompt lengths, one at a time on the worker,
        only while it has no answer to make: an answer asked for meanwhile waits for one
        prefill at most (``Generator.warm_prefill`` says why)."""
        from divergent.model.generate import warm_lengths

        generator, answers = self._base_generator, self.answers
        assert answers is not None  # started before this task
        t0, done = time.monotonic(), 0
        for length in warm_lengths(count):
            while answers.busy:
                await asyncio.sleep(0.05)
            try:
                await answers.call_in_worker(functools.partial(generator.warm_prefill, length))
            except Exception:  # the answers do not need it: said, and no more of it
                log.exception("warming the model at prompt length %d failed", length)
                return
            done += 1
        log.info("warmed %d prefill lengths in %.1f s", done, time.monotonic() - t0)
        self.warmed_prefills = done

    async def _lag_monitor(self) -> None:
        interval = 0.005
        while True:
            t = time.monotonic()
            await asyncio.sleep(interval)
            self.stats.lag_ms.append(max(0.0, (time.monotonic() - t - interval) * 1000))

    def _controlled(self, name: str, value: Any) -> None:
        if self.take is not None:
            self.take.control(time.monotonic(), name, value)
        if self.mqtt is not None:
            self.mqtt.publish_status(self.status_dict())
