"""Answers with the bundled model, a list for a note sink and a fixed grid (no JACK)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from divergent.model.generate import CONCEPT_STRENGTH
from divergent.server.answers import Answers, AnswerSettings
from divergent.server.performance import StartAnswer, Timeline

SETTINGS = AnswerSettings(
    bars=1,
    divergence=0.0,
    temperature=1.0,
    top_p=0.9,
    seed=1,
    quantize="off",
    channel=0,
    concept_strength=CONCEPT_STRENGTH,
)
NOTES = ((0.0, 60, 0.5, 80), (1.0, 62, 0.5, 80), (2.0, 64, 0.5, 80), (3.0, 65, 0.5, 80))


class ListSink:
    """Remembers every note it is asked to play and every cancel."""

    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []
        self.cancelled: list[object] = []

    def schedule_note(self, **note: Any) -> None:
        self.notes.append(note)

    def cancel(self, tag: object | None = None) -> int:
        self.cancelled.append(tag)
        return 0


class Failing:
    """The real model's tokenizer, and a generation that fails (a bug in the worker)."""

    def __init__(self, generator: Any) -> None:
        self.model = generator.model

    def continue_ids(self, ids: Any, **kw: Any) -> Any:
        time.sleep(0.05)
        raise RuntimeError("boom in the worker")


@pytest.fixture(scope="module")
def generator() -> Any:
    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    return Generator(OnnxModel(None, threads=1))


def request(answer_id: int = 1, *, speculative: bool = False) -> StartAnswer:
    return StartAnswer(
        answer_id=answer_id,
        t=time.monotonic(),
        reason="phrase",
        notes=NOTES,
        origin=0.0,
        velocity=70,
        performer_notes=4,
        speculative=speculative,
    )


def make(gen: Any, sink: ListSink, **kw: Any) -> Answers:
    t0 = time.monotonic()
    return Answers(generator=gen, grid=lambda: Timeline(t0, 4.0, 240.0), sink=sink, **kw)


def test_a_speculative_answer_sounds_only_when_released(generator: Any) -> None:
    sink = ListSink()
    over: list[int] = []

    async def main() -> None:
        answers = make(generator, sink, on_over=lambda job: over.append(job.answer_id))
        job = answers.start(request(speculative=True), SETTINGS)
        while not job.done:
            await asyncio.sleep(0.01)
        assert sink.notes == [] and job.pending, "held back until released"
        answers.release(1)
        answers.close()

    asyncio.run(main())
    assert sink.notes and {n["tag"] for n in sink.notes} == {1}
    assert {n["velocity"] for n in sink.notes} == {70}
    assert over == [1]


def test_stop_drops_the_rest_of_an_answer(generator: Any) -> None:
    sink = ListSink()

    async def main() -> None:
        answers = make(generator, sink)
        job = answers.start(request(), SETTINGS)
        answers.release(1)
        answers.stop(1)
        await answers.drain(10.0)
        assert job.cancel.is_set()
        answers.close()

    asyncio.run(main())
    assert sink.cancelled == [1]


def test_a_failed_generation_at_shutdown_is_reported(
    generator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    failed: list[int] = []

    async def main() -> None:
        answers = make(Failing(generator), ListSink(), on_failed=lambda j: failed.append(1))
        answers.start(request(speculative=True), SETTINGS)
        await answers.drain(5.0)
        answers.close()

    with caplog.at_level(logging.ERROR, logger="divergent.server"):
        asyncio.run(main())
    assert failed == [1]
    assert any("boom in the worker" in r.getMessage() for r in caplog.records), caplog.text


def test_a_generation_outlasting_the_drain_is_reported(
    generator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Slow(Failing):
        def continue_ids(self, ids: Any, **kw: Any) -> Any:
            time.sleep(0.5)  # ignores cancel: a worker stuck in one call
            raise RuntimeError("too late")

    async def main() -> None:
        answers = make(Slow(generator), ListSink())
        answers.start(request(), SETTINGS)
        assert not await answers.drain(0.05)
        answers.close()

    with caplog.at_level(logging.WARNING, logger="divergent.server"):
        asyncio.run(main())
    assert any("still generating at shutdown" in r.getMessage() for r in caplog.records)


def test_after_job_runs_on_the_worker_after_every_answer_and_cannot_fail_one(
    generator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The heap trim's hook: on the inference thread, after a generated and a failed
    answer alike; an error in it is logged and the answer still sounds."""
    import threading

    threads: list[str] = []

    def after() -> None:
        threads.append(threading.current_thread().name)
        raise OSError("housekeeping failed")

    sink = ListSink()

    async def main() -> None:
        answers = make(generator, sink, after_job=after)
        job = answers.start(request(), SETTINGS)
        answers.release(1)
        while not job.done:
            await asyncio.sleep(0.01)
        answers.generator = Failing(generator)
        answers.start(request(2), SETTINGS)
        await answers.drain(5.0)
        answers.close()

    with caplog.at_level(logging.ERROR, logger="divergent.server"):
        asyncio.run(main())
    assert sink.notes and {n["tag"] for n in sink.notes} == {1}
    assert len(threads) == 2 and all(t.startswith("divergent-infer") for t in threads)
    assert sum("after an answer" in r.getMessage() for r in caplog.records) == 2
