"""Concepts live: switching the concept answers are made in, and learning new ones from
what the performer played in this session (issue 10; ``docs/concepts.md``).

- :class:`ConceptLoader` builds a concept-bound generator off the event loop, on its own
  thread at a lower priority than the inference worker: the concept's deltas added and
  the attention weights re-quantized (``model.concept.activate``), a new int8 decoder
  session, one warm-up answer. The app swaps it in for the *next* answer; the answer
  playing keeps the generator it began with, so a switch never lands mid-note. The last
  few built stay: switching back to a concept reuses its generator (no new session).
- :class:`PlayedNotes` keeps the performer's notes of the last minutes and writes a
  window of them to a ``.mid`` file, the reference of a concept learned live.
- :func:`learn_in_process` runs ``python -m divergent concept learn`` in a separate,
  lower-priority process (``--nice``, one torch thread), so learning never blocks the
  loop and leaves a core to the music.

No torch here: learning happens in the child process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mido

__all__ = [
    "CACHE_SIZE",
    "LEARN_NICE",
    "MIN_LEARN_NOTES",
    "NONE",
    "ConceptLoader",
    "LearnError",
    "Played",
    "PlayedNotes",
    "canonical_spec",
    "learn_in_process",
    "stop_process",
]

log = logging.getLogger("divergent.server")

#: The spec of "no concept" (the base model).
NONE = "none"
#: Fewer performer notes than this in the window: too little to learn a style from.
MIN_LEARN_NOTES = 16
#: How much the learning process lowers its priority (``os.nice``).
LEARN_NICE = 10
#: The loader thread's nice value: below the inference worker, which must not be late.
_LOADER_NICE = 5
#: The longest window /divergent/concept/learn may ask for (the config's range).
KEEP_S = 600.0
#: How many built concept generators the loader keeps (each 25-40 MB resident once it
#: has answered: its decoder session, ORT's arena and the KV caches): switching back to
#: one of them builds nothing. Two concepts and their mix, or three, switch for free.
CACHE_SIZE = 3
#: What identifies a spec's concept files: (inode, size, modification ns) of each.
_Stamp = tuple[tuple[int, int, int], ...]


def canonical_spec(spec: str) -> str:
    """``none`` (any case) or ``A`` / ``A+B`` with checked names (raises ConceptError)."""
    from divergent.model.concept import parse_spec

    if spec.strip().lower() == NONE:
        return NONE
    return "+".join(parse_spec(spec))


def _lower_thread_priority() -> None:
    # Linux keeps a nice value per thread: this lowers the loader thread only
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOADER_NICE)
        except OSError as e:
            log.debug("cannot lower the concept loader's priority: %s", e)


class ConceptLoader:
    """Builds concept-bound generators on one low-priority thread (requests run in order).

    The base model's fp32 weights a concept applies to are read once, on first use. The
    last ``cache_size`` generators built stay (least recently used out first), keyed by
    spec and checked against their files (inode, size, modification time): switching
    back to one costs a few ``stat`` calls and allocates nothing, while a concept learned
    again under its name is rebuilt. Without it every switch, back included, built a new
    decoder session and KV caches (25-40 MB once answering) and freed the previous ones:
    RSS swung by about 30 MB a switch and settled higher (issue 12's soak).
    """

    def __init__(self, *, folder: Path, cache_size: int = CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be at least 0, got {cache_size}")
        self.folder = folder
        self.cache_size = cache_size
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="divergent-concept",
            initializer=_lower_thread_priority,
        )
        self._base_weights: Any = None  # BaseWeights, touched by the loader thread only
        # spec -> (its files' stamp, generator), least recently used first
        self._built: OrderedDict[str, tuple[_Stamp, Any]] = OrderedDict()
        self._built_for: Any = None  # the base model the cached generators copy
        self._lock = threading.Lock()  # build_now also runs on the worker at startup
        #: decoder sessions built so far (switches the cache did not answer)
        self.builds = 0

    def cached(self) -> list[str]:
        """The specs whose generators are kept, least recently used first."""
        with self._lock:
            return list(self._built)

    def _stamp(self, spec: str) -> _Stamp | None:
        """What identifies the files of ``spec`` now (None when one is missing)."""
        from divergent.model.concept import concept_path, parse_spec

        stamp = []
        for name in parse_spec(spec):
            try:
                st = concept_path(name, self.folder).stat()
            except OSError:
                return None
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamp)

    def build_now(self, spec: str, base: Any) -> tuple[Any, float]:
        """(generator, load ms) of ``spec`` over ``base``'s model, on the calling thread:
        the one kept from an earlier switch, else a new one (then kept)."""
        t0 = time.perf_counter()
        with self._lock:
            if base.model is not self._built_for:
                self._built.clear()  # copies of another model
                self._built_for = base.model
            stamp = self._stamp(spec)
            kept = self._built.pop(spec, None)
            if kept is not None and stamp is not None and kept[0] == stamp:
                self._built[spec] = kept  # the most recently used now
                return kept[1], (time.perf_counter() - t0) * 1000
            # a stale entry (its file learned again or removed) is already out; the least
            # recently used go before the new session is built, so what they held is
            # free for it (an answer still running on one keeps it until it ends)
            del kept
            while stamp is not None and self._built and len(self._built) >= self.cache_size:
                self._built.popitem(last=False)
            generator = self._build(spec, base)  # a missing file: ConceptError here
            self.builds += 1
            if stamp is not None and self.cache_size > 0:
                self._built[spec] = (stamp, generator)
        return generator, (time.perf_counter() - t0) * 1000

    def _build(self, spec: str, base: Any) -> Any:
        """A new generator of ``spec``: deltas added, weights re-quantized, a new decoder
        session, one warm-up answer."""
        from divergent.model.concept import BaseWeights, activate
        from divergent.model.generate import PROMPT_TOKENS, Generator

        model = base.model
        if self._base_weights is None:
            self._base_weights = BaseWeights(model.files.root, model.n_layer)
        active = activate(spec, model, self.folder, base=self._base_weights)
        # the base generator's read-only banks are shared, not read again
        generator = Generator(model, concept=active, like=base)
        # The new session's first run pays ORT's one-off costs here, not in an answer: one
        # prefill of the longest prompt, both decoders. Measured (riff+waltz, a 2-vCPU
        # Xeon, two runs): warm_up's 1-bar answers took 614-659 ms to build and warm
        # against 488-498 for two short prefills, the first answer no faster after them;
        # one prefill took 211-263 ms against 73-87 with none, whose first answer was
        # ~25 ms slower.
        generator.warm_prefill(PROMPT_TOKENS)
        return generator

    async def build(self, spec: str, base: Any) -> tuple[Any, float]:
        """:meth:`build_now` on the loader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.build_now, spec, base)

    async def names(self) -> list[str]:
        """The learned concepts' names (the folder is read off the loop)."""
        from divergent.model.concept import concept_names

        return await asyncio.to_thread(concept_names, self.folder)

    def close(self) -> None:
        """Stop the loader thread (a build under way finishes on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class Played:
    """One performer note message: monotonic time, on or off, pitch, velocity, channel."""

    t: float
    on: bool
    pitch: int
    velocity: int
    channel: int


class PlayedNotes:
    """The performer's notes of the last ``keep_s`` seconds (the loop owns it)."""

    def __init__(self, *, keep_s: float = KEEP_S, max_events: int = 200_000) -> None:
        self.keep_s = keep_s
        # bounded twice: by time, and by count against a flood of messages
        self._events: deque[Played] = deque(maxlen=max_events)

    def add(self, t: float, on: bool, pitch: int, velocity: int, channel: int) -> None:
        """One note-on or note-off (about a microsecond: the input path calls it)."""
        self._events.append(Played(t, on, pitch, velocity, channel))
        horizon = t - self.keep_s
        while self._events and self._events[0].t < horizon:
            self._events.popleft()

    def window(self, now: float, seconds: float) -> list[Played]:
        """The messages of the last ``seconds`` (a copy: the loop keeps adding)."""
        start = now - seconds
        return [e for e in self._events if e.t >= start]

    @staticmethod
    def notes(events: list[Played]) -> int:
        """How many notes start in ``events``."""
        return sum(1 for e in events if e.on)

    @staticmethod
    def write_midi(events: list[Played], path: Path, *, bpm: float, end: float) -> Path:
        """``events`` as a one-track ``.mid`` at ``bpm`` (the session's tempo, so the
        reference's beats are the performer's): notes already sounding at the window's
        start are left out, notes still held at ``end`` end there."""
        tpb = 480
        ticks_per_s = bpm / 60.0 * tpb
        t0 = events[0].t if events else end
        timed: list[tuple[int, mido.Message]] = []
        held: set[tuple[int, int]] = set()
        for e in events:
            key = (e.channel, e.pitch)
            tick = round((e.t - t0) * ticks_per_s)
            if e.on:
                if key in held:  # a repeated note-on: end the first one there
                    timed.append((tick, mido.Message("note_off", note=e.pitch, channel=e.channel)))
                held.add(key)
                msg = mido.Message(
                    "note_on", note=e.pitch, velocity=max(1, e.velocity), channel=e.channel
                )
                timed.append((tick, msg))
            elif key in held:  # an off without its on (before the window) is dropped
                held.discard(key)
                timed.append((tick, mido.Message("note_off", note=e.pitch, channel=e.channel)))
        last = round((end - t0) * ticks_per_s)
        for ch, pitch in sorted(held):
            timed.append((last, mido.Message("note_off", note=pitch, channel=ch)))
        track = mido.MidiTrack()
        track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=0))
        now = 0
        for tick, msg in sorted(timed, key=lambda x: (x[0], x[1].type == "note_on")):
            track.append(msg.copy(time=tick - now))
            now = tick
        mid = mido.MidiFile(ticks_per_beat=tpb)
        mid.tracks.append(track)
        mid.save(path)
        return path


class LearnError(Exception):
    """Learning failed; the message says why, ready for ``/divergent/error``."""


async def learn_in_process(
    *,
    name: str,
    reference: Path,
    folder: Path,
    steps: int,
    model_dir: str | None,
    started: Callable[[asyncio.subprocess.Process], object] | None = None,
) -> dict[str, Any]:
    """Learn ``name`` from ``reference`` in a child process (``python -m divergent concept
    learn``, niced, one torch thread); its JSON summary. Raises :class:`LearnError`.

    ``started`` receives the process as soon as it exists (the app stops it at shutdown).
    """
    from divergent.model.concept import TrainingExtraMissing

    cmd = [
        sys.executable,
        "-m",
        "divergent",
        "concept",
        "learn",
        name,
        str(reference),
        "--json",
        "--steps",
        str(steps),
        # one thread: the other core stays with the server's loop, sender and inference
        "--threads",
        "1",
        "--nice",
        str(LEARN_NICE),
        "--concepts",
        str(folder),
    ]
    if model_dir:
        cmd += ["--model", model_dir]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    if started is not None:
        started(proc)
    out, err = await proc.communicate()
    if proc.returncode == TrainingExtraMissing.exit_code:
        raise LearnError(
            "learning needs the training extra (torch), which the server's Python cannot "
            f"import: {TrainingExtraMissing.install}"
        )
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        why = next(
            (ln.removeprefix("divergent: error: ") for ln in reversed(lines) if "error" in ln),
            lines[-1] if lines else f"exit status {proc.returncode}",
        )
        raise LearnError(f"learning {name!r} failed: {why}")
    try:
        summary = json.loads(out.decode())
    except ValueError as e:
        raise LearnError(f"learning {name!r}: unreadable summary ({e})") from e
    if not isinstance(summary, dict):
        raise LearnError(f"learning {name!r}: unreadable summary")
    return summary


async def stop_process(proc: asyncio.subprocess.Process | None, timeout: float = 2.0) -> None:
    """End a learning process still running (SIGTERM, then SIGKILL)."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
