"""The live server: MIDI (or OSC notes) in, steered continuations out, on the beat, recorded.

Shape (uvicorn-like): :class:`ServeConfig` says what to run, :class:`Server` runs it
through ``startup → main loop → shutdown`` with signal handling and a drain timeout.

Threads (see ``../shared/notes/architecture.md``):
- the asyncio loop owns all state: mode, parameters, the performer's phrase, the take;
- rtmidi's thread stamps each input event and hands it to the loop through a bounded
  queue (``loop.call_soon_threadsafe``), counting drops;
- one inference worker thread runs the model; it hands each finished bar straight to
- the precise sender thread (:class:`~server.sender.Sender`), which plays notes at their
  times and owns the sounding-notes set, so panic always balances every note-on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import mido

from divergent.bridges.clock import Clock, InternalClock, LinkClock, MidiClockFollower, make_clock
from divergent.bridges.exceptions import BridgeError
from divergent.bridges.jack import jack_period_s
from divergent.bridges.midi import MidiEvent, MidiIO, choose_backend
from divergent.bridges.mqtt import MqttBridge, PayloadError, parse_payload
from divergent.bridges.osc import OscBridge
from divergent.server.config import ServeConfig
from divergent.server.control import (
    Arg,
    Control,
    ControlError,
    Reply,
    control,
    controls_of,
    dispatch,
)
from divergent.server.recorder import TakeRecorder, default_sessions_dir, recover
from divergent.server.sender import Sender, Sent

__all__ = ["REPLIES", "VERSION", "Server"]

log = logging.getLogger("divergent.server")

VERSION = "0.1.0"

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
        ),
        doc="The server's state: the reply to /divergent/status and the heartbeat "
        "(about once a second). tempo is in BPM; recording is 1 or 0.",
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
        "/divergent/stats",
        (
            ("midi_in", "i"),
            ("dropped", "i"),
            ("loop_lag_ms_p99", "f"),
            ("osc_errors", "i"),
            ("notes_out", "i"),
            ("sounding", "i"),
        ),
        doc="Answer to /divergent/stats: input events received, input events dropped "
        "(queue full), the event loop's lag p99 over the last 2,000 samples, rejected "
        "OSC messages, machine notes sent, notes sounding now.",
    ),
)

_STATUS = next(r for r in REPLIES if r.address == "/divergent/status")

#: Seconds without any note event after which notes still held count as released.
STALE_HOLD_S = 4.0
#: With a followed clock, notes further ahead than this wait in beats (tempo may change).
DEFER_S = 0.25
#: (on beat, off beat, pitch, velocity, channel 0-15, answer id)
_BeatNote = tuple[float, float, int, int, int, int]

#: CCs and the like that pass from the performer to the take (not to the model).
_NOTE_TYPES = frozenset({"note_on", "note_off"})
_CLOCK_TYPES = frozenset({"clock", "start", "continue", "stop", "songpos"})


@dataclass
class PlayedNote:
    """A note, in monotonic seconds (``off`` None while held)."""

    on: float
    pitch: int
    velocity: int
    off: float | None = None
    machine: bool = False


@dataclass
class Stats:
    midi_in: int = 0
    dropped: int = 0
    osc_errors: int = 0
    echoes: int = 0
    answers: int = 0
    notes_out: int = 0
    lag_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    def lag_p99(self) -> float:
        if len(self.lag_ms) < 2:
            return 0.0
        return statistics.quantiles(self.lag_ms, n=100, method="inclusive")[98]


class Trace:
    """Timing events as JSON lines (``--trace``), for ``divergent bench live``."""

    def __init__(self, path: Path | None) -> None:
        self._f: IO[str] | None = path.open("a", buffering=1 << 16) if path else None
        self._lock = threading.Lock()  # written from the loop and the inference worker

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


class Server:
    """One live session: ``await Server(config).serve()`` runs until SIGINT/SIGTERM."""

    def __init__(self, config: ServeConfig, *, print_banner: bool = True) -> None:
        self.config = config
        self.print_banner = print_banner
        self.should_exit = False
        self.ready = asyncio.Event()
        self.stats = Stats()
        # live parameters (the config holds the start values)
        self.mode = config.mode
        self.quantize = config.quantize
        self.divergence = config.divergence
        self.temperature = config.temperature
        self.bars = config.bars
        self.seed = config.seed
        self.clock_source = config.clock
        # state owned by the loop
        self.held: dict[tuple[int, int], PlayedNote] = {}
        self._last_note_event = 0.0
        self.history: deque[PlayedNote] = deque(maxlen=512)
        self.phrase_start: int = 0  # index into the stream of performer notes
        self.performer_notes = 0
        self.answered_notes = 0  # performer notes already answered (call mode)
        self.answer_id = 0
        self.take: TakeRecorder | None = None
        self.midi: MidiIO | None = None
        self.osc: OscBridge | None = None
        self.mqtt: MqttBridge | None = None
        self.sender: Sender | None = None
        self.clock: Clock = InternalClock(bpm=config.bpm)
        self._free = InternalClock(bpm=config.bpm)
        self.generator: Any = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divergent-infer")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._midi_q: asyncio.Queue[MidiEvent] | None = None
        self._sent: deque[Sent] = deque()  # filled by the sender thread, drained by the loop
        # the machine's last notes (time, channel, pitch, on), to recognise echoes
        self._recent_out: deque[tuple[float, int, int, bool]] = deque(maxlen=64)
        self._phrase_timer: asyncio.TimerHandle | None = None
        self._generation: asyncio.Future[Any] | None = None
        self._cancel = threading.Event()
        self._last_tempo = config.bpm
        self.trace = Trace(Path(config.trace) if config.trace else None)
        self.sessions = Path(config.sessions) if config.sessions else default_sessions_dir()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jam_next_bar: float | None = None
        self._speculative: _AnswerJob | None = None
        self._spec_timer: asyncio.TimerHandle | None = None
        self._playing: int | None = None  # the answer now allowed to sound
        # notes of a followed clock (MIDI clock, Link) kept in beats until shortly before
        # they play; appended by the inference worker, fed to the sender by the loop
        self._deferred: list[_BeatNote] = []
        self._deferred_lock = threading.Lock()

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
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (e.g. tests)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: int | None = None) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now")
        self.should_exit = True

    async def startup(self) -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        self._loop = loop
        # a busy inference thread would otherwise hold the GIL for up to 5 ms at a time,
        # which the sender thread and the loop feel as jitter
        sys.setswitchinterval(0.0005)
        self._midi_q = asyncio.Queue(maxsize=8192)
        # the model loads in the worker while MIDI and OSC come up
        model_future = loop.run_in_executor(self.executor, self._load_model)
        self.clock = self._make_clock(self.clock_source)
        self._open_midi(loop)
        sinks: list[Callable[[mido.Message], None]] = []
        if self.midi is not None:
            sinks.append(self.midi.send)
        sinks.append(self._send_osc_note)
        lead = 0.0
        if self.midi is not None and self.midi.backend == "jack":
            # JACK plays MIDI at the next period boundary: half a period early centres
            # the onset error on zero (measured: p99 1.5 ms -> 0.8-1.6 ms at 64 frames)
            lead = (jack_period_s() or 0.0) / 2
        self.sender = Sender(
            sinks=sinks,
            on_sent=self._sent.append,
            max_note_s=self.config.max_note_s,
            lead_s=lead,
            # below JACK's client threads (priority 5 under jackd's 10); refused quietly
            # without the right to real-time scheduling
            realtime_priority=3 if sys.platform.startswith("linux") else None,
        )
        self.sender.start()
        await model_future
        # OSC opens once the model is loaded, so a /divergent/pong means "ready to play"
        reply_host, reply_port = self.config.reply_address
        self.osc = OscBridge(
            host=self.config.osc_host,
            port=self.config.osc_port,
            reply_host=reply_host,
            reply_port=reply_port,
            on_message=self._on_osc,
        )
        await self.osc.__aenter__()
        if self.config.mqtt_address is not None:
            host, mport = self.config.mqtt_address
            self.mqtt = MqttBridge(
                host=host,
                port=mport,
                instance=self.config.instance,
                username=self.config.mqtt_username,
                password=self.config.mqtt_password,
                tls=self.config.mqtt_tls,
                cafile=self.config.mqtt_cafile,
                on_control=self._on_mqtt,
                # retry every <= 2 s: telemetry is back within seconds of the broker
                backoff=(0.25, 2.0),
            )
            # returns at once even when the broker is down: it reconnects on its own
            await self.mqtt.__aenter__()
        recovered = await loop.run_in_executor(None, recover, self.sessions)
        for path in recovered:
            log.info("recovered an unfinished take: %s", path)
        if self.config.record:
            self._start_take(None)
        self._spawn(self._consume_midi())
        self._spawn(self._heartbeat())
        self._spawn(self._housekeeping())
        self._spawn(self._lag_monitor())
        self._spawn(self._jam_loop())
        self._spawn(self._feed_deferred())
        self.cold_start_s = time.monotonic() - t0
        if self.print_banner:
            print(self.banner(), flush=True)
        self.trace.write("ready", t=time.monotonic(), cold_start_s=self.cold_start_s)
        self.trace.flush()
        self.ready.set()

    async def main_loop(self) -> None:
        while not self.should_exit:
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """Stop generating, silence every note, finish the take, close ports."""
        self._cancel.set()
        if self._phrase_timer is not None:
            self._phrase_timer.cancel()
        if self._generation is not None and not self._generation.done():
            # drain: the worker stops at its next token; wait a little for it
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._generation), 1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sender is not None:
            self.sender.close(panic=True)
        self._drain_sent()
        self._close_take()
        if self.mqtt is not None:
            self.mqtt.publish_status(self.status_dict())
            await self.mqtt.__aexit__(None, None, None)
            self.mqtt = None
        if self.osc is not None:
            await self.osc.__aexit__(None, None, None)
            self.osc = None
        if self.midi is not None:
            self.midi.close()
            self.midi = None
        if isinstance(self.clock, LinkClock):
            self.clock.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.trace.close()
        log.info("stopped")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %r", task.exception())
            self._panic("internal error")

    def _load_model(self) -> None:
        from divergent.model.generate import Generator
        from divergent.model.runtime import OnnxModel

        model = OnnxModel(self.config.model_dir, precision=self.config.precision, threads=1)
        self.generator = Generator(model)
        self._warm_up()

    def _warm_up(self) -> None:
        # one tiny generation so the first answer does not pay ORT's first-run costs
        from divergent.model.generate import ids_from_notes

        ids = ids_from_notes(self.generator.model, [(0.0, 60, 1.0, 80), (1.0, 64, 1.0, 80)])
        self.generator.continue_ids(ids, bars=1, seed=0, max_tokens=8)

    @property
    def grid(self) -> Clock:
        """The clock answers are placed on: the leading one, or free time at its tempo
        while a MIDI clock master is stopped or silent (its position is frozen then)."""
        clock = self.clock
        if isinstance(clock, MidiClockFollower) and not clock.running():
            if abs(self._free.bpm() - clock.bpm()) > 1e-6:
                self._free.set_bpm(clock.bpm())
            return self._free
        return clock

    def _make_clock(self, source: str) -> Clock:
        bpm = self.clock.bpm() if hasattr(self, "clock") else self.config.bpm
        if source == "link":
            return LinkClock(bpm=bpm)
        return make_clock(source, bpm=bpm)

    def _open_midi(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            backend = choose_backend(self.config.midi_backend)
            self.midi = MidiIO(
                backend=backend,
                client_name=self.config.midi_client,
                in_name=self.config.midi_in,
                out_name=self.config.midi_out,
                on_event=lambda ev: loop.call_soon_threadsafe(self._enqueue_midi, ev),
            )
            self.midi.open()
        except BridgeError as e:
            log.warning("no MIDI ports (%s): notes travel over OSC only", e)
            self.midi = None
            self.midi_error = str(e)

    def banner(self) -> str:
        cfg = self.config
        host, port = cfg.reply_address
        lines = ["divergent is listening"]
        if self.midi is not None:
            lines.append(f"  MIDI in    {self.midi.input_name}")
            lines.append(
                f"  MIDI out   {self.midi.output_name}   (MIDI only: route it to an instrument)"
            )
        else:
            lines.append(f"  MIDI       none ({getattr(self, 'midi_error', '?')}); use OSC notes")
        lines.append(f"  OSC in     {cfg.osc_host}:{self.osc.port if self.osc else cfg.osc_port}")
        lines.append(f"  OSC reply  {host}:{port}")
        lines.append(f"  clock      {self.clock_source} ({self.clock.bpm():.1f} BPM)")
        lines.append(f"  mode       {self.mode} (quantize {self.quantize})")
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

    def _on_midi(self, t: float, msg: mido.Message) -> None:
        if msg.type in _CLOCK_TYPES:
            if isinstance(self.clock, MidiClockFollower):
                what = self.clock.feed(t, msg)
                if what in ("start", "stop") and self.take is not None:
                    self.take.control(t, "transport", what)
            return
        if msg.type in _NOTE_TYPES:
            if self._is_echo(t, msg):
                return
            self._performer_note(t, msg.type, msg.note, msg.velocity, msg.channel)
        if self.take is not None and not msg.is_meta and hasattr(msg, "channel"):
            self.take.note(t, "performer", msg)

    def _is_echo(self, t: float, msg: mido.Message) -> bool:
        """A machine note coming back in (``divergent out`` routed into ``divergent in``,
        as loopMIDI on Windows does): ignored, or the machine would answer itself."""
        self._drain_sent()
        on = msg.type == "note_on" and msg.velocity > 0
        for i, (sent_t, ch, note, sent_on) in enumerate(self._recent_out):
            # -5..+50 ms: two stamps taken in different places (after our send, at rtmidi's
            # arrival), and a VM that may stall between them
            same = ch == msg.channel and note == msg.note and sent_on == on
            if same and -0.005 <= t - sent_t <= 0.05:
                del self._recent_out[i]
                self.stats.echoes += 1
                if self.stats.echoes == 1:
                    log.warning(
                        "divergent's own notes are coming back on its input (is `divergent "
                        "out` routed into `divergent in`?): ignoring the echoes"
                    )
                return True
        return False

    def _performer_note(self, t: float, kind: str, pitch: int, velocity: int, channel: int) -> None:
        key = (channel, pitch)
        self._last_note_event = t
        if kind == "note_on" and velocity > 0:
            prev = self.held.pop(key, None)
            if prev is not None:
                prev.off = t
            note = PlayedNote(on=t, pitch=pitch, velocity=velocity)
            self.held[key] = note
            self.history.append(note)
            self.performer_notes += 1
            if self._phrase_timer is not None:
                self._phrase_timer.cancel()
                self._phrase_timer = None
            self._drop_speculation()
        else:
            note_off = self.held.pop(key, None)
            if note_off is None:
                return
            note_off.off = t
            if not self.held and self.mode == "call":
                self._arm_phrase_timer(t)

    def _arm_phrase_timer(self, t_off: float) -> None:
        assert self._loop is not None
        if self._phrase_timer is not None:
            self._phrase_timer.cancel()
        end = t_off + self.config.phrase_silence_s
        self._drop_speculation()
        # speculate after a third of the silence (at most 100 ms): not on every short gap
        # inside a phrase, but early enough to have the answer ready when the phrase ends
        spec_delay = min(0.1, self.config.phrase_silence_s / 3)
        self._spec_timer = self._loop.call_later(
            max(0.0, t_off + spec_delay - time.monotonic()), self._speculate
        )
        if self.config.bar_ends_phrase:
            # or at the first bar line after at least one silent beat, if that is sooner
            bpb = 4.0
            beat = self.grid.beat_at(t_off) + 1.0
            end = min(end, self.grid.time_at(math.ceil(beat / bpb) * bpb))
        # the loop's clock is time.monotonic() on Linux, the clock every stamp uses
        delay = max(0.0, end - time.monotonic())
        self._phrase_timer = self._loop.call_later(delay, self._phrase_end)

    def _phrase_end(self) -> None:
        self._phrase_timer = None
        if self.held or self.mode != "call":
            return
        if self.performer_notes <= self.answered_notes:
            return
        t = time.monotonic()
        self.trace.write("phrase_end", t=t)
        self.answered_notes = self.performer_notes
        job = self._speculative
        self._speculative = None
        if job is not None and job.performer_notes == self.performer_notes and job.usable():
            self._release(job, t)
        else:
            self._answer(t, reason="phrase")

    def _speculate(self) -> None:
        """Start the answer during the silence, before the phrase is known to be over.

        When the silence lasts, the phrase end only has to release notes that already
        exist (a response of a few milliseconds); when the performer plays on, the
        speculative answer is cancelled and nothing of it sounds.
        """
        self._spec_timer = None
        if self.held or self.mode != "call" or self.generator is None:
            return
        if self.performer_notes <= self.answered_notes:
            return
        self._speculative = self._answer(time.monotonic(), reason="phrase", speculative=True)

    def _drop_speculation(self) -> None:
        if self._spec_timer is not None:
            self._spec_timer.cancel()
            self._spec_timer = None
        if self._speculative is not None:
            self._speculative.cancel.set()
            self._speculative = None

    def _release(self, job: _AnswerJob, t: float) -> None:
        """Let an answer sound: the previous answer stops, this one starts now (or on grid)."""
        if self.sender is not None and self._playing is not None:
            self.sender.cancel(tag=self._playing)
            self._drop_deferred(self._playing)
        self._playing = job.answer_id
        job.release(t)
        if job.readout is not None:
            self._finish_answer(job)

    def _context_notes(
        self, t_end: float, bars_back: int = 8
    ) -> tuple[list[tuple[float, int, float, int]], float]:
        """Recent notes (both parts) in beats from a bar line, and that bar line's beat."""
        bpb = 4.0
        end_beat = self.grid.beat_at(t_end)
        notes = [n for n in self.history if n.on <= t_end]
        if not notes:
            return [], 0.0
        first = max(self.grid.beat_at(notes[0].on), end_beat - bars_back * bpb)
        origin = math.floor(first / bpb) * bpb
        out = []
        for n in notes:
            b = self.grid.beat_at(n.on)
            if b < origin:
                continue
            off = n.off if n.off is not None else t_end
            dur = max(self.grid.beat_at(off) - b, 1 / 12)
            out.append((b - origin, n.pitch, dur, n.velocity))
        return out, origin

    def _answer(
        self, t: float, *, reason: str, jam_bar: float | None = None, speculative: bool = False
    ) -> _AnswerJob | None:
        """Start an answer in the worker (cancelling one still generating).

        A speculative answer is generated but held back until :meth:`_release`.
        """
        if self.generator is None:
            if not speculative:
                self._error(f"{reason}: the model is still loading (rejected)")
            return None
        notes, origin = self._context_notes(t)
        if not notes:
            if not speculative:
                self._error(f"{reason}: nothing to continue yet - play something first (rejected)")
            return None
        if self._generation is not None and not self._generation.done():
            self._cancel.set()  # the old answer stops at its next token
        self._cancel = threading.Event()
        self.answer_id += 1
        job = _AnswerJob(
            server=self,
            answer_id=self.answer_id,
            notes=notes,
            origin=origin,
            t_request=t,
            bars=1 if jam_bar is not None else self.bars,
            jam_bar=jam_bar,
            divergence=self.divergence,
            temperature=self.temperature,
            seed=self.seed if self.seed is not None else self.answer_id,
            quantize=self.quantize,
            cancel=self._cancel,
            performer_notes=self.performer_notes,
            velocity=self._velocity(),
        )
        assert self._loop is not None
        fut = self._loop.run_in_executor(self.executor, job.run)
        self._generation = fut
        fut.add_done_callback(lambda f: self._answer_done(job, f))
        if not speculative:
            if jam_bar is None:
                self._release(job, t)
            else:
                job.release(t)  # jam bars overlap nothing: no cancel of the previous one
        return job

    def _velocity(self) -> int:
        """The machine's velocity: fixed, or (0) the mean of the performer's last 8 notes,
        so a soft phrase gets a soft answer."""
        if self.config.velocity > 0:
            return self.config.velocity
        played = [n.velocity for n in self.history if not n.machine][-8:]
        return max(1, min(127, round(sum(played) / len(played)))) if played else 90

    def _answer_done(self, job: _AnswerJob, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            job.failed = True
            return
        exc = fut.exception()
        if exc is not None:
            from divergent.model.generate import GenerateError

            job.failed = True
            if not job.released:
                return  # a speculative answer: the phrase end starts a fresh one
            if isinstance(exc, GenerateError):
                self._error(f"answer {job.answer_id}: {exc} (rejected)")
            else:
                log.error("answer %d failed: %r", job.answer_id, exc)
                self._error(f"answer {job.answer_id} failed: {exc}")
            return
        readout = fut.result()
        if readout is None:
            job.failed = not job.released
            return
        job.readout = readout
        if job.released:
            self._finish_answer(job)

    def _finish_answer(self, job: _AnswerJob) -> None:
        """The answer's readout: /divergent/answer, a marker in the take, the trace."""
        self.stats.answers += 1
        r = job.readout.to_dict()

        def num(key: str) -> float:
            v = r.get(key)
            return -1.0 if v is None else float(v)

        t_first = job.first_on if job.first_on is not None else time.monotonic()
        self._send(
            "/divergent/answer",
            job.answer_id,
            num("surprisal_bits_per_note"),
            num("copy_rate"),
            num("feature_distance"),
            num("in_scale"),
            int(r["notes"]),
            num("compute_ms"),
            float(job.divergence),
        )
        if self.take is not None:
            self.take.marker(
                t_first,
                f"answer {job.answer_id}: d={job.divergence:.2f} T={job.temperature:.2f} "
                f"surprisal={num('surprisal_bits_per_note'):.2f} "
                f"copy={num('copy_rate'):.3f} dist={num('feature_distance'):.2f} "
                f"notes={r['notes']}",
            )
        if self.mqtt is not None:
            self.mqtt.publish_answer(
                {
                    "id": job.answer_id,
                    "divergence": job.divergence,
                    "temperature": job.temperature,
                    **r,
                }
            )
        self.trace.write("answer", id=job.answer_id, readout=r, scheduled=job.scheduled)
        self.trace.flush()

    # ------------------------------------------------------------------ jam mode

    async def _jam_loop(self) -> None:
        """In jam mode: generate each next bar shortly before it starts."""
        while True:
            if self.mode != "jam" or self.generator is None:
                self._jam_next_bar = None
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            bpb = 4.0
            beat = self.grid.beat_at(now)
            next_bar = math.floor(beat / bpb) * bpb + bpb
            if self._jam_next_bar is not None and next_bar <= self._jam_next_bar:
                next_bar = self._jam_next_bar + bpb
            # ahead by half a beat (at least 150 ms): late enough to hear the performer's
            # bar, early enough for a bar's worth of tokens on a slow machine
            lead = max(0.15, 30.0 / max(self.clock.bpm(), 1.0))
            when = self.grid.time_at(next_bar) - lead
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            if self.mode != "jam":
                continue
            self._jam_next_bar = next_bar
            # only while the performer plays (a note in the last two bars): the machine
            # does not jam on its own echo
            since = self.grid.time_at(next_bar - 3 * bpb)
            if any(n.on >= since and not n.machine for n in self.history):
                try:
                    self._answer(time.monotonic(), reason="jam", jam_bar=next_bar)
                except Exception:
                    # skip this bar, keep jamming
                    log.exception("jam bar at beat %s failed", next_bar)

    # ------------------------------------------------------------------ output

    def _send_osc_note(self, msg: mido.Message) -> None:
        # runs on the sender thread: OscBridge.send is a plain UDP sendto (thread-safe)
        if self.osc is None or msg.type not in _NOTE_TYPES:
            return
        vel = msg.velocity if msg.type == "note_on" else 0
        self.osc.send("/divergent/out/note", msg.note, vel, msg.channel + 1)

    def _drain_sent(self) -> None:
        while self._sent:
            s = self._sent.popleft()
            if s.message.type in _NOTE_TYPES:
                on = s.message.type == "note_on" and s.message.velocity > 0
                self._recent_out.append((s.actual, s.message.channel, s.message.note, on))
            if s.message.type == "note_on":
                self.stats.notes_out += 1
                self.history.append(
                    PlayedNote(
                        on=s.actual, pitch=s.message.note, velocity=s.message.velocity, machine=True
                    )
                )
            elif s.message.type == "note_off":
                for n in reversed(self.history):
                    if n.machine and n.pitch == s.message.note and n.off is None:
                        n.off = s.actual
                        break
            if self.take is not None:
                self.take.note(s.scheduled, "machine", s.message)
            self.trace.write(
                "sent",
                scheduled=s.scheduled,
                actual=s.actual,
                type=s.message.type,
                note=getattr(s.message, "note", -1),
            )

    def schedule(self, note: _BeatNote, clock: Clock) -> None:
        """Hand a note (in beats) to the sender, timed by ``clock`` now (any thread)."""
        b_on, b_off, pitch, velocity, channel, tag = note
        if self.sender is not None:
            self.sender.schedule_note(
                on=clock.time_at(b_on),
                off=clock.time_at(b_off),
                pitch=pitch,
                velocity=velocity,
                channel=channel,
                tag=tag,
            )

    def defer(self, note: _BeatNote) -> None:
        """Keep a note in beats until shortly before it plays (any thread)."""
        with self._deferred_lock:
            self._deferred.append(note)

    def _drop_deferred(self, tag: int | None = None) -> None:
        with self._deferred_lock:
            self._deferred = [n for n in self._deferred if tag is not None and n[5] != tag]

    async def _feed_deferred(self) -> None:
        """Every 20 ms: notes due within DEFER_S go to the sender, timed by the clock as
        it stands then, so a tempo change of the clock master moves the notes with it."""
        while True:
            await asyncio.sleep(0.02)
            if not self._deferred:
                continue
            clock = self.grid
            horizon = time.monotonic() + DEFER_S
            due: list[_BeatNote] = []
            later: list[_BeatNote] = []
            with self._deferred_lock:
                for n in self._deferred:
                    (due if clock.time_at(n[0]) <= horizon else later).append(n)
                self._deferred = later
            for note in due:
                self.schedule(note, clock)

    def _panic(self, why: str) -> None:
        self._drop_speculation()
        self._cancel.set()
        self._drop_deferred()
        if self.sender is not None:
            self.sender.panic()
        log.info("panic: %s", why)

    def _send(self, address: str, *args: Any) -> None:
        if self.osc is not None:
            self.osc.send(address, *args)

    def _error(self, message: str) -> None:
        self.stats.osc_errors += 1
        log.info("error: %s", message)
        self._send("/divergent/error", message)
        if self.mqtt is not None:
            self.mqtt.publish_error(message)

    def status_dict(self) -> dict[str, Any]:
        """The status as JSON-ready fields (MQTT's retained status)."""
        names = [a.name for a in _STATUS.args]
        return dict(zip(names, self.status_args(), strict=True))

    def status_args(self) -> tuple[Any, ...]:
        return (
            self.mode,
            float(self.clock.bpm()),
            self.clock_source,
            float(self.divergence),
            int(self.take is not None),
            float(self.temperature),
            int(self.bars),
            self.quantize,
            int(self.stats.answers),
        )

    async def _heartbeat(self) -> None:
        if self.config.heartbeat_s <= 0:
            return
        while True:
            self._send("/divergent/status", *self.status_args())
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

    def _release_stale_notes(self) -> None:
        """Held notes with no other input for STALE_HOLD_S: their note-off was lost (a
        dropped MIDI event, a stuck key). Treat them as released, or call mode would wait
        for a phrase end forever."""
        now = time.monotonic()
        if not self.held or now - self._last_note_event < STALE_HOLD_S:
            return
        log.warning(
            "no note-off for %s after %.0f s of silence: treating as released",
            sorted(p for _, p in self.held),
            STALE_HOLD_S,
        )
        for note in self.held.values():
            note.off = now
        self.held.clear()
        if self.mode == "call":
            self._arm_phrase_timer(now - self.config.phrase_silence_s)

    def _housekeep(self) -> None:
        self._release_stale_notes()
        self._drain_sent()
        bpm = self.clock.bpm()
        if abs(bpm - self._last_tempo) >= 0.5:
            self._last_tempo = bpm
            if self.take is not None:
                self.take.tempo(time.monotonic(), bpm)
        if self.take is not None:
            self.take.flush()
        self.trace.flush()

    async def _lag_monitor(self) -> None:
        interval = 0.005
        while True:
            t = time.monotonic()
            await asyncio.sleep(interval)
            self.stats.lag_ms.append(max(0.0, (time.monotonic() - t - interval) * 1000))

    # ------------------------------------------------------------------ takes

    def _start_take(self, name: str | None) -> None:
        self._close_take()
        self.take = TakeRecorder(
            folder=self.sessions,
            name=name,
            bpm=self.clock.bpm(),
            meta={"divergent": VERSION, "clock": self.clock_source, "mode": self.mode},
        )
        now = time.monotonic()
        for key, value in (
            ("divergence", self.divergence),
            ("temperature", self.temperature),
            ("bars", self.bars),
            ("mode", self.mode),
        ):
            self.take.control(now, key, value)
        log.info("recording %s", self.take.path)

    def _close_take(self) -> None:
        """Finish the take; the .mid is written in a thread (a long take takes a while)."""
        take, self.take = self.take, None
        if take is None:
            return
        t = time.monotonic()
        if self._loop is not None and self._loop.is_running() and not self.should_exit:
            fut = self._loop.run_in_executor(None, take.close, t)
            fut.add_done_callback(lambda f: self._take_written(f, take))
        else:
            self._take_written(None, take)

    def _take_written(self, fut: Any, take: TakeRecorder) -> None:
        try:
            path = take.close() if fut is None else fut.result()
        except OSError as e:
            # the journal stays on disk: `divergent sessions` recovers it
            log.error("cannot write %s: %s (the journal is kept)", take.path, e)
            return
        log.info("take written: %s", path)

    def _controlled(self, name: str, value: Any) -> None:
        if self.take is not None:
            self.take.control(time.monotonic(), name, value)
        if self.mqtt is not None:
            self.mqtt.publish_status(self.status_dict())

    # ------------------------------------------------------------------ OSC control

    def _on_osc(self, address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        self._control(address, list(args))

    def _on_mqtt(self, param: str, payload: bytes) -> None:
        """``divergent/<instance>/control/<param>``: the OSC control of the same name."""
        address = "/divergent/" + param
        try:
            args = parse_payload(payload)
        except PayloadError as e:
            self._error(f"{address}: {e} (rejected)")
            return
        self._control(address, args)

    def _control(self, address: str, args: list[Any]) -> None:
        """Validate and apply one control message (OSC or MQTT: the same checks)."""
        try:
            warning = dispatch(self, self.controls, address, args)
        except ControlError as e:
            self._error(str(e))
            return
        except Exception as e:  # a handler bug must never take the server down on stage
            log.exception("handler for %s failed", address)
            self._error(f"{address}: internal error: {e} (rejected)")
            return
        if warning:
            self._error(warning)

    @functools.cached_property
    def controls(self) -> dict[str, Control]:
        """The declared address space, by address (built once)."""
        return {c.address: c for c in controls_of(type(self))}

    @control(
        "/divergent/divergence",
        Arg("value", "f", lo=0.0, hi=1.0, clamp=True),
        doc="The divergence knob d: 0 = a faithful continuation, 1 = as far from the "
        "training data as the bounds allow. Applies to the next answer (or bar, in jam).",
    )
    def _set_divergence(self, value: float) -> None:
        self.divergence = float(value)
        self._controlled("divergence", self.divergence)

    @control(
        "/divergent/temperature",
        Arg("value", "f", lo=0.05, hi=2.0, clamp=True),
        doc="Sampling temperature (1 = the model's own distribution).",
    )
    def _set_temperature(self, value: float) -> None:
        self.temperature = float(value)
        self._controlled("temperature", self.temperature)

    @control(
        "/divergent/bars",
        Arg("bars", "i", lo=1, hi=16, clamp=True),
        doc="Length of an answer in bars (call mode and /divergent/generate).",
    )
    def _set_bars(self, bars: int) -> None:
        self.bars = int(bars)
        self._controlled("bars", self.bars)

    @control(
        "/divergent/mode",
        Arg("mode", "s", choices=("call", "jam", "off")),
        doc="call: answer each phrase; jam: play along bar by bar; off: listen and record "
        "only (/divergent/generate still answers). Changing mode silences the machine.",
    )
    def _set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self._panic(f"mode {self.mode} -> {mode}")
            self.mode = mode
            self.answered_notes = self.performer_notes
        self._controlled("mode", mode)

    @control(
        "/divergent/quantize",
        Arg("grid", "s", choices=("off", "beat", "bar")),
        doc="Where answers start: at once (off), on the next beat, or on the next bar line.",
    )
    def _set_quantize(self, grid: str) -> None:
        self.quantize = grid
        self._controlled("quantize", grid)

    @control(
        "/divergent/tempo",
        Arg("bpm", "f", lo=20.0, hi=300.0, clamp=True),
        doc="Tempo in BPM: sets the internal clock, or proposes it to the Link session. "
        "Rejected while following MIDI clock (the clock master sets the tempo).",
    )
    def _set_tempo(self, bpm: float) -> None:
        if isinstance(self.clock, InternalClock | LinkClock):
            self.clock.set_bpm(float(bpm))
            self._controlled("tempo", float(bpm))
        else:
            raise ControlError(
                "/divergent/tempo", "the tempo follows the MIDI clock master (rejected)"
            )

    @control(
        "/divergent/clock",
        Arg("source", "s", choices=("internal", "midi", "link")),
        doc="Which clock leads: internal (BPM from /divergent/tempo), midi (MIDI clock on "
        "the input: 24 ppqn, start/continue/stop, song position), link (Ableton Link).",
    )
    def _set_clock(self, source: str) -> None:
        if source == self.clock_source:
            return
        old = self.clock
        self.clock = self._make_clock(source)
        if isinstance(old, LinkClock):
            old.close()
        self.clock_source = source
        self._controlled("clock", source)

    @control("/divergent/generate", doc="Answer now, from what was played (every mode).")
    def _generate(self) -> None:
        t = time.monotonic()
        self.trace.write("phrase_end", t=t, reason="generate")
        self.answered_notes = self.performer_notes
        self._answer(t, reason="/divergent/generate")

    @control("/divergent/stop", doc="Stop the answer now: note-offs for every note, CC 123.")
    def _stop(self) -> None:
        self._panic("/divergent/stop")

    @control(
        "/divergent/record/start",
        Arg("name", "s", optional=True),
        doc="Start a new take (closing the current one), optionally named.",
    )
    def _record_start(self, name: str | None = None) -> None:
        try:
            self._start_take(name)
        except ValueError as e:
            raise ControlError("/divergent/record/start", f"{e} (rejected)") from e

    @control("/divergent/record/stop", doc="Finish the take and write its .mid file.")
    def _record_stop(self) -> None:
        self._close_take()

    @control("/divergent/ping", doc="Replies /divergent/pong.")
    def _ping(self) -> None:
        self._send("/divergent/pong", VERSION)

    @control("/divergent/status", doc="Replies /divergent/status now.")
    def _status(self) -> None:
        self._send("/divergent/status", *self.status_args())

    @control("/divergent/stats", doc="Replies /divergent/stats (counters for benchmarks).")
    def _stats(self) -> None:
        self._send(
            "/divergent/stats",
            self.stats.midi_in,
            self.stats.dropped,
            float(self.stats.lag_p99()),
            self.stats.osc_errors,
            self.stats.notes_out,
            self.sender.sounding() if self.sender else 0,
        )

    @control(
        "/divergent/note",
        Arg("pitch", "i", lo=0, hi=127),
        Arg("velocity", "i", lo=0, hi=127),
        Arg("channel", "i", lo=1, hi=16, optional=True),
        doc="A performer note over OSC (velocity 0 = note off): the OSC note transport.",
    )
    def _note(self, pitch: int, velocity: int, channel: int | None = None) -> None:
        t = time.monotonic()
        ch = (channel or 1) - 1
        kind = "note_on" if velocity > 0 else "note_off"
        msg = mido.Message(kind, note=pitch, velocity=velocity, channel=ch)
        self._on_midi(t, msg)


@dataclass
class _AnswerJob:
    """One answer, run in the inference worker; schedules each bar as soon as it exists."""

    server: Server
    answer_id: int
    notes: list[tuple[float, int, float, int]]
    origin: float
    t_request: float
    bars: int
    jam_bar: float | None
    divergence: float
    temperature: float
    seed: int
    quantize: str
    cancel: threading.Event
    performer_notes: int = 0  # how many performer notes the answer has heard
    velocity: int = 90
    shift: float | None = None  # beats added to the model's onsets (None until the first)
    first_on: float | None = None
    scheduled: list[float] = field(default_factory=list)
    released: bool = False
    failed: bool = False
    readout: Any = None
    pending: list[Any] = field(default_factory=list)  # notes made before the release
    lock: threading.Lock = field(default_factory=threading.Lock)

    def usable(self) -> bool:
        return not self.failed and not self.cancel.is_set()

    def release(self, t: float) -> None:
        """Let the notes sound: those already made now, the rest as they come."""
        with self.lock:
            self.released = True
            pending, self.pending = self.pending, []
            if pending:
                self._schedule(pending)

    def run(self) -> Any:
        from divergent.model.generate import ids_from_notes

        srv = self.server
        gen = srv.generator
        ids = ids_from_notes(gen.model, self.notes)
        bars = self.bars
        min_onset = None
        if self.jam_bar is not None:
            # generate exactly up to the end of the jam bar: the bars between the prompt's
            # last bar and the jam bar stay empty (no onset may come before the jam bar)
            min_onset = self.jam_bar - self.origin
            last_bar = math.floor(max(n[0] for n in self.notes) / 4.0)
            bars = max(1, round(min_onset / 4.0) - last_bar)
        cont = gen.continue_ids(
            ids,
            bars=bars,
            seed=self.seed,
            temperature=self.temperature,
            divergence=self.divergence,
            min_onset_beats=min_onset,
            on_notes=self._play,
            cancel=self.cancel,
        )
        if self.cancel.is_set() and not self.scheduled:
            return None
        return gen.readout(cont)

    def _play(self, notes: list[Any]) -> None:
        # the worker thread: held back until released, then scheduled at once
        with self.lock:
            if not self.released:
                self.pending.extend(notes)
                return
            self._schedule(notes)

    def _schedule(self, notes: list[Any]) -> None:
        srv = self.server
        sender = srv.sender
        if sender is None or self.cancel.is_set() or not notes:
            return
        clock = srv.grid
        cfg = srv.config
        lead = 0.002  # time for the sender to wake and spin
        if self.shift is None:
            earliest = time.monotonic() + lead
            first = self.origin + notes[0].onset_beats
            if self.jam_bar is not None:
                self.shift = 0.0
            elif self.quantize == "off":
                # free time: the first note sounds now, the rest keep their spacing
                self.shift = clock.beat_at(earliest) - first
            else:
                unit = 1.0 if self.quantize == "beat" else 4.0
                need = clock.beat_at(earliest) - first
                self.shift = max(0.0, math.ceil(need / unit) * unit)
        now = time.monotonic()
        following = isinstance(clock, MidiClockFollower | LinkClock)
        for n in notes:
            b = self.origin + n.onset_beats + self.shift
            t_on = clock.time_at(b)
            if t_on < now - 0.005:
                continue  # a late note is dropped, never played late
            note = (
                b,
                b + n.duration_beats,
                n.pitch,
                self.velocity,
                cfg.channel - 1,
                self.answer_id,
            )
            if following and t_on - now > DEFER_S:
                # a followed clock may change tempo before this note: its time is taken
                # from the clock just before it plays (see Server._feed_deferred)
                srv.defer(note)
            else:
                srv.schedule(note, clock)
            self.scheduled.append(t_on)
            if self.first_on is None:
                self.first_on = t_on
                srv.trace.write(
                    "first_note", id=self.answer_id, scheduled=t_on, t_request=self.t_request
                )
