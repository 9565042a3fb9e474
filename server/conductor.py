"""Carrying out the performance state machine's requests (a base of the app's Server).

The state machine decides; this turns each request into actions on the answers, the
sender and the peers: start, release, cut or drop an answer, yield the turn (the
answer's sounding notes off at once), panic, report. It also re-arms the one timer
that wakes the state machine at its next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

import mido

from divergent.bridges.mqtt import MqttBridge
from divergent.server.answers import AnswerJob, Answers, AnswerSettings
from divergent.server.config import ServeConfig
from divergent.server.performance import (
    Cut,
    Drop,
    Notice,
    Panic,
    Performance,
    PhraseEnd,
    Reject,
    Release,
    Request,
    StartAnswer,
    YieldTurn,
    jam_anchor_seed,
)
from divergent.server.recorder import TakeRecorder
from divergent.server.sender import Sender
from divergent.server.telemetry import Stats, Trace

__all__ = ["Conductor"]

log = logging.getLogger("divergent.server")


class Conductor(ABC):
    """Requests in, actions out; the app supplies the state below."""

    config: ServeConfig
    perf: Performance
    answers: Answers | None
    sender: Sender | None
    take: TakeRecorder | None
    mqtt: MqttBridge | None
    trace: Trace
    stats: Stats
    divergence: float
    temperature: float
    concept_strength: float
    bars: int
    seed: int | None
    quantize: str
    _timer: asyncio.TimerHandle | None
    _sounding: dict[tuple[int, int], int]
    _yielded: deque[int]

    @abstractmethod
    def _drain_sent(self) -> None:
        """Take in what the sender played."""

    @abstractmethod
    def _send(self, address: str, *args: Any) -> None:
        """Send a reply."""

    @abstractmethod
    def _error(self, message: str) -> None:
        """Report a rejected request."""

    def _rearm(self) -> None:
        """One timer for the state machine's next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.perf.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._apply(self.perf.tick())

    def _apply(self, requests: list[Request]) -> None:
        """Carry out the state machine's requests, in order, then re-arm its timer."""
        for req in requests:
            try:
                self._carry_out(req)
            except Exception:
                # one failed request (a model error, say) must not stop the others
                log.exception("request %r failed", req)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to time
            self._rearm()

    def _carry_out(self, req: Request) -> None:
        answers = self.answers
        if isinstance(req, StartAnswer):
            self._start_answer(req)
        elif isinstance(req, Release) and answers is not None:
            answers.release(req.answer_id)
        elif isinstance(req, Cut) and answers is not None:
            answers.cut(req.answer_id)
        elif isinstance(req, Drop) and answers is not None:
            answers.drop(req.answer_id)
        elif isinstance(req, YieldTurn):
            self._yield_turn(req.answer_id)
        elif isinstance(req, Panic):
            self._panic(req.why)
        elif isinstance(req, Reject):
            self._error(req.message)
        elif isinstance(req, Notice):
            log.warning("%s", req.message)
        elif isinstance(req, PhraseEnd):
            extra = {} if req.reason is None else {"reason": req.reason}
            self.trace.write("phrase_end", t=req.t, **extra)

    def _start_answer(self, req: StartAnswer) -> None:
        if self.answers is None or self.answers.generator is None:
            if not req.speculative:
                self._error(f"{req.reason}: the model is still loading (rejected)")
            self.perf.answer_failed(req.answer_id)
            return
        settings = AnswerSettings(
            bars=1 if req.jam_bar is not None else self.bars,
            divergence=self.divergence,
            temperature=self.temperature,
            top_p=self.config.top_p,
            seed=self.seed if self.seed is not None else req.answer_id,
            quantize=self.quantize,
            channel=self.config.channel - 1,
            concept_strength=self.concept_strength,
            anchor_seed=(
                None if req.jam_bar is None else jam_anchor_seed(req.jam_bar, self.bars, self.seed)
            ),
        )
        self.answers.start(req, settings)

    def _yield_turn(self, answer_id: int) -> None:
        """The performer took the turn: nothing more of the answer, its notes off now."""
        if self.answers is not None:
            self.answers.stop(answer_id)
        self._yielded.append(answer_id)
        self._drain_sent()
        for (ch, pitch), tag in list(self._sounding.items()):
            if tag == answer_id:
                self._note_off_now(ch, pitch)
        log.debug("answer %d yielded to the performer", answer_id)

    def _note_off_now(self, channel: int, pitch: int) -> None:
        if self.sender is not None:
            # a passed-through note-off ends the sounding note (its own one is skipped)
            self.sender.send_now(mido.Message("note_off", channel=channel, note=pitch))

    def _panic(self, why: str) -> None:
        if self.answers is not None:
            self.answers.stop_all()
        if self.sender is not None:
            self.sender.panic()
        log.info("panic: %s", why)

    def _first_note(self, job: AnswerJob, t_on: float) -> None:
        self.trace.write(
            "first_note",
            id=job.answer_id,
            scheduled=t_on,
            t_request=job.request.t,
            t_release=job.released_at,
            reason=job.request.reason,
        )

    def _finish_answer(self, job: AnswerJob) -> None:
        """The answer's readout: /divergent/answer, a marker in the take, the trace."""
        self.stats.answers += 1
        r = job.readout.to_dict()

        def num(key: str) -> float:
            v = r.get(key)
            return -1.0 if v is None else float(v)

        s = job.settings
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
            float(s.divergence),
        )
        if self.take is not None:
            self.take.marker(
                t_first,
                f"answer {job.answer_id}: d={s.divergence:.2f} T={s.temperature:.2f} "
                f"surprisal={num('surprisal_bits_per_note'):.2f} "
                f"copy={num('copy_rate'):.3f} dist={num('feature_distance'):.2f} "
                f"notes={r['notes']}",
            )
        if self.mqtt is not None:
            self.mqtt.publish_answer(
                {"id": job.answer_id, "divergence": s.divergence, "temperature": s.temperature, **r}
            )
        self.trace.write("answer", id=job.answer_id, readout=r, scheduled=job.scheduled)
        self.trace.flush()
