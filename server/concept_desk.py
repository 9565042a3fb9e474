"""The app's concept desk: live switching, listing and learning of named concepts.

A mixin of :class:`~divergent.server.app.Server`, as :class:`Conductor` and
:class:`ControlHandlers` are: the handlers ask (``_request_*``), this carries it out off
the loop (a niced loader thread, a niced learning process) and answers on OSC and MQTT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from divergent.bridges.mqtt import MqttBridge
from divergent.model.concept import ConceptError
from divergent.model.runtime import ModelError
from divergent.server.answers import Answers
from divergent.server.concepts import (
    MIN_LEARN_NOTES,
    NONE,
    ConceptLoader,
    LearnError,
    PlayedNotes,
    learn_in_process,
    stop_process,
)
from divergent.server.config import ServeConfig
from divergent.server.performance import Performance
from divergent.server.recorder import TakeRecorder
from divergent.server.telemetry import Trace

__all__ = ["ConceptDesk"]

log = logging.getLogger("divergent.server")


class ConceptDesk(ABC):
    """Concept requests in, a switched generator and replies out; the app supplies the
    state below."""

    config: ServeConfig
    answers: Answers | None
    take: TakeRecorder | None
    mqtt: MqttBridge | None
    trace: Trace
    perf: Performance
    clock: Any
    concept: str
    concepts_dir: Path
    _base_generator: Any
    _concept_loader: ConceptLoader
    _concept_seq: int
    _played: PlayedNotes
    _learning: tuple[str, asyncio.Task[None]] | None
    _learn_proc: asyncio.subprocess.Process | None

    @abstractmethod
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A tracked task."""

    @abstractmethod
    def _send(self, address: str, *args: Any) -> None:
        """Send a reply."""

    @abstractmethod
    def _error(self, message: str) -> None:
        """Report a rejected request."""

    @abstractmethod
    def _apply(self, requests: list[Any]) -> None:
        """Carry out the state machine's requests."""

    @abstractmethod
    def _controlled(self, name: str, value: Any) -> None:
        """A control changed: the take's mark, the MQTT status."""

    # ------------------------------------------------------------------ concepts

    def _request_concept(self, spec: str) -> None:
        self._concept_seq += 1
        if spec == NONE:
            self._concept_switched(NONE, self._base_generator, 0.0)
            return
        self._spawn(self._switch_concept(spec, self._concept_seq))

    async def _switch_concept(self, spec: str, seq: int) -> None:
        """Build the concept's generator off the loop; it applies from the next answer (an
        answer under way keeps the generator it began with, so no note is cut)."""
        try:
            generator, ms = await self._concept_loader.build(spec, self._base_generator)
        except (ConceptError, ModelError, OSError) as e:
            self._error(f"/divergent/concept: {e} (rejected; still {self.concept})")
            return
        except Exception as e:  # a loading bug must not reach the music: the old one stays
            log.exception("loading concept %s failed", spec)
            self._error(f"/divergent/concept: internal error: {e} (rejected; still {self.concept})")
            return
        if seq != self._concept_seq:
            log.info("concept %s loaded, but a later switch replaced it", spec)
            return
        self._concept_switched(spec, generator, ms)

    def _concept_switched(self, spec: str, generator: Any, load_ms: float) -> None:
        if self.answers is not None and generator is not None:
            self.answers.generator = generator
        self._apply(self.perf.settings_changed())  # a warm answer has the old concept
        self.concept = spec
        log.info("concept: %s (loaded in %.0f ms)", spec, load_ms)
        self.trace.write("concept", t=time.monotonic(), concept=spec, load_ms=load_ms)
        self._send("/divergent/concept", spec, float(load_ms))
        if self.mqtt is not None:
            self.mqtt.publish("concept", {"concept": spec, "load_ms": round(load_ms, 1)})
        self._controlled("concept", spec)  # the take's mark, the MQTT status

    def _request_concept_list(self) -> None:
        self._spawn(self._reply_concepts())

    async def _reply_concepts(self) -> None:
        names = await self._concept_loader.names()
        self._send("/divergent/concepts", *names)
        if self.mqtt is not None:
            self.mqtt.publish("concepts", names, retain=True)

    def _request_learn(self, name: str, seconds: float | None) -> None:
        address = "/divergent/concept/learn"
        if self._learning is not None:
            self._error(f"{address}: {self._learning[0]!r} is still being learned (rejected)")
            return
        span = self.config.concept_learn_s if seconds is None else float(seconds)
        now = time.monotonic()
        events = self._played.window(now, span)
        notes = PlayedNotes.notes(events)
        if notes < MIN_LEARN_NOTES:
            self._error(
                f"{address}: too little played to learn from: {notes} notes in the last "
                f"{span:g} s, at least {MIN_LEARN_NOTES} needed (rejected)"
            )
            return
        self._learning = (name, self._spawn(self._learn(name, events, span, now)))

    async def _learn(self, name: str, events: list[Any], span: float, now: float) -> None:
        address = "/divergent/concept/learn"
        notes = PlayedNotes.notes(events)
        log.info("learning concept %s from %d notes (%.0f s)", name, notes, span)
        try:
            with tempfile.TemporaryDirectory(prefix="divergent-learn-") as tmp:
                ref = Path(tmp) / f"{name}.mid"
                await asyncio.to_thread(
                    PlayedNotes.write_midi, events, ref, bpm=self.clock.bpm(), end=now
                )
                summary = await learn_in_process(
                    name=name,
                    reference=ref,
                    folder=self.concepts_dir,
                    steps=self.config.concept_learn_steps,
                    model_dir=self.config.model_dir,
                    started=functools.partial(setattr, self, "_learn_proc"),
                )
        except (LearnError, OSError) as e:
            self._error(f"{address}: {e} (rejected)")
            return
        finally:
            # on cancellation (shutdown) _learn_proc stays: _stop_learning ends the process
            self._learning = None
        self._learn_proc = None
        loss = summary.get("loss_last")
        figures = (
            name,
            float(summary.get("learn_seconds", -1.0)),
            int(summary.get("steps", 0)),
            -1.0 if loss is None else float(loss),
            notes,
            float(span),
            int(summary.get("bytes", 0)),
        )
        log.info("learned concept %s: %s", name, summary)
        self._send("/divergent/concept/learned", *figures)
        if self.mqtt is not None:
            self.mqtt.publish("concept/learned", {**summary, "notes": notes, "played_s": span})
        if self.take is not None:
            self.take.marker(time.monotonic(), f"learned concept {name} ({notes} notes)")
        await self._reply_concepts()

    async def _stop_learning(self) -> None:
        await stop_process(self._learn_proc)
