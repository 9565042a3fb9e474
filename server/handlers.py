"""The control address space: one thin setter per OSC (and MQTT) address.

Each handler declares its address, arguments and documentation with ``@control`` (see
``server.control``); ranges and choices come from the option of the same meaning in
``server.config`` (:func:`~divergent.server.config.arg_range`), so a control and its flag
accept the same values. The handlers only set a value or hand the request on: the policy
is the performance state machine's, the lifecycle the app's. :class:`ControlHandlers` is
a base of :class:`~divergent.server.app.Server`.
"""

from __future__ import annotations

import functools
import logging
import time
from abc import ABC, abstractmethod
from typing import Any

import mido

from divergent.bridges.clock import Clock, InternalClock, LinkClock
from divergent.bridges.mqtt import MqttBridge, PayloadError, parse_payload
from divergent.model.concept import ConceptError, check_name
from divergent.server.concepts import canonical_spec
from divergent.server.config import arg_range
from divergent.server.control import (
    PREFIX,
    Arg,
    Control,
    ControlError,
    control,
    controls_of,
    dispatch,
)
from divergent.server.performance import Performance, Request
from divergent.server.recorder import sanitize_name
from divergent.server.telemetry import Stats

__all__ = ["VERSION", "ControlHandlers"]

VERSION = "0.1.0"

log = logging.getLogger("divergent.server")


class ControlHandlers(ABC):
    """The ``@control`` handlers; the app supplies the state and the actions below."""

    perf: Performance
    stats: Stats
    mqtt: MqttBridge | None
    clock: Clock
    clock_source: str
    divergence: float
    temperature: float
    concept_strength: float
    bars: int
    quantize: str

    @abstractmethod
    def _apply(self, requests: list[Request]) -> None:
        """Carry out the state machine's requests."""

    @abstractmethod
    def _controlled(self, name: str, value: Any) -> None:
        """A control changed: mark it in the take, publish the status."""

    @abstractmethod
    def _send(self, address: str, *args: Any) -> None:
        """Send a reply."""

    @abstractmethod
    def _error(self, message: str) -> None:
        """Report a rejected or clamped message."""

    @abstractmethod
    def _switch_clock(self, source: str) -> None:
        """Make ``source`` the leading clock."""

    @abstractmethod
    def _request_take(self, name: str | None) -> None:
        """Start a new take (closing the current one), in the background."""

    @abstractmethod
    def _request_stop(self) -> None:
        """Finish the take (after a take start still under way), in the background."""

    @abstractmethod
    def status_args(self) -> tuple[Any, ...]:
        """The /divergent/status values."""

    @abstractmethod
    def health_args(self) -> tuple[str, str]:
        """The /divergent/health values."""

    @abstractmethod
    def sounding(self) -> int:
        """Machine notes sounding now."""

    @abstractmethod
    def _on_midi(self, t: float, msg: mido.Message, *, echo_guard: bool = True) -> None:
        """One incoming MIDI message (``echo_guard``: it may be the machine's own note
        coming back through a MIDI loop)."""

    @abstractmethod
    def _request_concept(self, spec: str) -> None:
        """Switch to concept ``spec`` (checked; ``none`` for the base model) for the next
        answer, in the background."""

    @abstractmethod
    def _request_concept_list(self) -> None:
        """Reply /divergent/concepts, in the background."""

    @abstractmethod
    def _request_learn(self, name: str, seconds: float | None) -> None:
        """Learn concept ``name`` from the last ``seconds`` played, in the background."""

    def _on_osc(self, address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        self._control(address, list(args))

    def _on_osc_error(self, what: str, exc: Exception) -> None:
        """A malformed packet (or a failed handler): counted like a rejected message."""
        self.stats.osc_errors += 1

    def _on_mqtt(self, param: str, payload: bytes) -> None:
        """``divergent/<instance>/control/<param>``: the OSC control of the same name."""
        address = PREFIX + param
        try:
            args = parse_payload(payload)
        except PayloadError as e:
            self._error(f"{address}: {e} (rejected)")
            return
        except (RecursionError, ValueError) as e:
            # JSON nested deeper than the parser's stack (hostile input): not a crash
            self._error(f"{address}: payload not readable ({type(e).__name__}) (rejected)")
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

    # ------------------------------------------------------------------ the setters

    @control(
        "/divergent/divergence",
        Arg("value", "f", **arg_range("divergence"), clamp=True),
        doc="The divergence knob d: 0 = a faithful continuation, 1 = as far from the "
        "training data as the bounds allow. Applies to the next answer (or bar, in jam).",
    )
    def _set_divergence(self, value: float) -> None:
        self.divergence = float(value)
        self._apply(self.perf.settings_changed())  # a warm answer has the old one
        self._controlled("divergence", self.divergence)

    @control(
        "/divergent/temperature",
        Arg("value", "f", **arg_range("temperature"), clamp=True),
        doc="Sampling temperature (1 = the model's own distribution).",
    )
    def _set_temperature(self, value: float) -> None:
        self.temperature = float(value)
        self._apply(self.perf.settings_changed())  # a warm answer has the old one
        self._controlled("temperature", self.temperature)

    @control(
        "/divergent/bars",
        Arg("bars", "i", **arg_range("bars"), clamp=True),
        doc="Length of an answer in bars (call mode and /divergent/generate).",
    )
    def _set_bars(self, bars: int) -> None:
        self.bars = int(bars)
        self._apply(self.perf.settings_changed())  # a warm answer has the old one
        self._controlled("bars", self.bars)

    @control(
        "/divergent/mode",
        Arg("mode", "s", **arg_range("mode")),
        doc="call: answer each phrase; jam: play along bar by bar; off: listen and record "
        "only (/divergent/generate still answers). Changing mode silences the machine.",
    )
    def _set_mode(self, mode: str) -> None:
        self._apply(self.perf.set_mode(mode))
        self._controlled("mode", mode)

    @control(
        "/divergent/quantize",
        Arg("grid", "s", **arg_range("quantize")),
        doc="Where answers start: at once (off), on the next beat, or on the next bar line.",
    )
    def _set_quantize(self, grid: str) -> None:
        self.quantize = grid
        self._controlled("quantize", grid)

    @control(
        "/divergent/tempo",
        Arg("bpm", "f", **arg_range("bpm"), clamp=True),
        doc="Tempo in BPM: sets the internal clock, or proposes it to the Link session. "
        "Rejected while following MIDI clock (the clock master sets the tempo).",
    )
    def _set_tempo(self, bpm: float) -> None:
        if not isinstance(self.clock, InternalClock | LinkClock):
            raise ControlError(
                "/divergent/tempo", "the tempo follows the MIDI clock master (rejected)"
            )
        self.clock.set_bpm(float(bpm))
        self._controlled("tempo", float(bpm))

    @control(
        "/divergent/clock",
        Arg("source", "s", **arg_range("clock")),
        doc="Which clock leads: internal (BPM from /divergent/tempo), midi (MIDI clock on "
        "the input: 24 ppqn, start/continue/stop, song position), link (Ableton Link).",
    )
    def _set_clock(self, source: str) -> None:
        if source == self.clock_source:
            return
        self._switch_clock(source)
        self._controlled("clock", source)

    @control("/divergent/generate", doc="Answer now, from what was played (every mode).")
    def _generate(self) -> None:
        self._apply(self.perf.generate())

    @control("/divergent/stop", doc="Stop the answer now: note-offs for every note, CC 123.")
    def _stop(self) -> None:
        self._apply(self.perf.stop("/divergent/stop"))

    @control(
        "/divergent/record/start",
        Arg("name", "s", optional=True),
        doc="Start a new take (closing the current one), optionally named.",
    )
    def _record_start(self, name: str | None = None) -> None:
        if name is not None:
            try:
                sanitize_name(name)  # refused here, before the take is made in a thread
            except ValueError as e:
                raise ControlError("/divergent/record/start", f"{e} (rejected)") from e
        self._request_take(name)

    @control("/divergent/record/stop", doc="Finish the take and write its .mid file.")
    def _record_stop(self) -> None:
        self._request_stop()

    @control("/divergent/ping", doc="Replies /divergent/pong.")
    def _ping(self) -> None:
        self._send("/divergent/pong", VERSION)

    @control("/divergent/status", doc="Replies /divergent/status now, then /divergent/health.")
    def _status(self) -> None:
        self._send("/divergent/status", *self.status_args())
        self._send("/divergent/health", *self.health_args())

    @control("/divergent/stats", doc="Replies /divergent/stats (counters for benchmarks).")
    def _stats(self) -> None:
        mqtt = self.mqtt.stats if self.mqtt is not None else None
        self._send(
            "/divergent/stats",
            self.stats.midi_in,
            self.stats.dropped,
            float(self.stats.lag_p99()),
            self.stats.osc_errors,
            self.stats.notes_out,
            self.sounding(),
            self.stats.midi_malformed,
            self.stats.midi_losses,
            self.stats.disk_faults,
            # the bridge's own counts: its drops happen before a message reaches dispatch
            mqtt.in_dropped if mqtt is not None else 0,
            mqtt.out_dropped if mqtt is not None else 0,
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
        # an OSC note is the performer's: the echo guard is for MIDI loops (out wired back
        # to in). Without this, a note struck just as the machine played the same pitch
        # was taken for an echo and lost (its yield of the turn with it).
        msg = mido.Message(kind, note=pitch, velocity=velocity, channel=ch)
        self._on_midi(t, msg, echo_guard=False)

    @control(
        "/divergent/concept",
        Arg("name", "s", doc="a concept's name, A+B for two, or none"),
        doc="Answer in a learned concept (see docs/concepts.md), two combined (A+B), or none "
        "(the base model). The concept loads in the background and applies from the next "
        "answer: the answer playing finishes as it began. Replies /divergent/concept when "
        "it applies; an unknown or unreadable concept gets /divergent/error and the active "
        "one stays.",
    )
    def _set_concept(self, name: str) -> None:
        try:
            spec = canonical_spec(name)  # a bad name is refused here, before any loading
        except ConceptError as e:
            raise ControlError("/divergent/concept", f"{e} (rejected)") from e
        self._request_concept(spec)

    @control(
        "/divergent/concept/strength",
        Arg("value", "f", **arg_range("concept_strength"), clamp=True),
        doc="How far a concept's answers lean into its style: 1 = as learned, more = pushed "
        "further (the --concept-strength default was measured closest to the reference), "
        "0 = the concept's weights without its identifiers. Applies to the next answer (or "
        "bar, in jam); no effect without a concept.",
    )
    def _set_concept_strength(self, value: float) -> None:
        self.concept_strength = float(value)
        self._apply(self.perf.settings_changed())  # a warm answer has the old one
        self._controlled("concept_strength", self.concept_strength)

    @control("/divergent/concepts", doc="Replies /divergent/concepts: the learned concepts.")
    def _list_concepts(self) -> None:
        self._request_concept_list()

    @control(
        "/divergent/concept/learn",
        Arg("name", "s", doc="the new concept's name (letters, digits, _ . -)"),
        Arg(
            "seconds",
            "f",
            **arg_range("concept_learn_s"),
            clamp=True,
            optional=True,
            doc="how far back to take the performer's playing (default: the "
            "concept_learn_s option, 120)",
        ),
        doc="Learn a concept from what the performer played in the last seconds, in a "
        "separate lower-priority process (needs the training extra, torch); the music "
        "goes on. Replies /divergent/concept/learned then /divergent/concepts; an error "
        "(too little played, no torch, a learn already running) on /divergent/error. A "
        "concept of the same name is replaced.",
    )
    def _learn_concept(self, name: str, seconds: float | None = None) -> None:
        try:
            check_name(name)
        except ConceptError as e:
            raise ControlError("/divergent/concept/learn", f"{e} (rejected)") from e
        self._request_learn(name, seconds)
