"""Concepts in the server, in-process (a fake MIDI port, the bundled model, a concept
learned here on it): switching between answers, the list, status, the take's mark,
errors, determinism, the MQTT path, the played-notes reference."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import mido
import numpy as np
import pytest

from divergent.model.concept import ConceptError, LearnConfig, activate, learn_concept
from divergent.model.generate import Generator, ids_from_notes
from divergent.model.played_refs import played_reference
from divergent.server.app import Server
from divergent.server.concepts import MIN_LEARN_NOTES, PlayedNotes
from tests.server.test_app import Recording, serve_in_process, wait_until

#: A concept learned in seconds: a handful of steps on small windows (not a good style,
#: a real one: its own deltas, identifiers and base-model hash).
TINY = LearnConfig(steps=2, batch=2, window=48, fisher_windows=2, threads=1, bf16=False)
PHRASE = [60, 62, 64, 65, 67, 65, 64, 62]


def learn_tiny(folder: Path, name: str) -> Path:
    """Learn concept ``name`` on the bundled model into ``folder`` (a few seconds)."""
    ref = played_reference("played_blues", folder / f"{name}.ref.mid", seconds=20.0)
    _, path, _ = learn_concept(name, [ref], config=TINY, concepts_dir=folder, progress=False)
    return path


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A concepts folder holding ``riff`` and ``waltz``."""
    folder = tmp_path_factory.mktemp("concepts")
    learn_tiny(folder, "riff")
    learn_tiny(folder, "waltz")
    return folder


@pytest.fixture(scope="module")
def generator() -> Any:
    from divergent.model.runtime import OnnxModel

    return Generator(OnnxModel(None, threads=1))


def _capture(server: Server) -> list[tuple[str, tuple[Any, ...]]]:
    """Every reply the server sends from now on (instead of UDP)."""
    sent: list[tuple[str, tuple[Any, ...]]] = []
    server._send = lambda address, *args: sent.append((address, args))  # type: ignore[method-assign]
    return sent


def _replies(sent: list[tuple[str, tuple[Any, ...]]], address: str) -> list[tuple[Any, ...]]:
    return [args for a, args in sent if a == address]


def test_switch_lands_between_answers_and_is_marked(
    tmp_path: Path, concepts: Path, generator: Any
) -> None:
    slow = Recording(generator, hang_s=0.6)  # the first answer is still generating

    async def body(server: Server, port: Any) -> None:
        sent = _capture(server)
        assert server.status_args()[-2] == "none"
        port.play(PHRASE)
        await wait_until(lambda: server.stats.midi_in >= 2 * len(PHRASE))
        server._control("/divergent/generate", [])
        await wait_until(lambda: len(slow.calls) == 1)
        server._control("/divergent/concept", ["riff"])
        await wait_until(lambda: server.concept == "riff")
        (spec, load_ms), *_ = _replies(sent, "/divergent/concept")
        assert spec == "riff" and 0 < load_ms <= 1000
        assert server.status_args()[-2] == "riff" and server.status_dict()["concept"] == "riff"
        # the answer under way keeps the model it began with and finishes
        assert server.answers is not None
        assert server.answers.generator is not slow
        assert server.answers.generator.concept.spec == "riff"
        await wait_until(lambda: server.stats.answers == 1)
        assert len(slow.calls) == 1
        # the next answer is the concept's
        server._control("/divergent/generate", [])
        await wait_until(lambda: server.stats.answers == 2)
        assert len(slow.calls) == 1
        server._control("/divergent/concept", ["NONE"])  # none, any case: the base model
        assert server.concept == "none" and server.answers.generator is slow
        server._control("/divergent/record/stop", [])
        await asyncio.sleep(0.3)

    serve_in_process(tmp_path, body, gen=slow, concepts=str(concepts), seed=3)
    (take,) = (tmp_path / "sessions").glob("*.mid")
    texts = [m.text for tr in mido.MidiFile(take).tracks for m in tr if m.type == "text"]
    # the take starts from the state, then marks every switch
    assert [t for t in texts if t.startswith("concept=")] == [
        "concept=none",
        "concept=riff",
        "concept=none",
    ]


def test_errors_leave_the_concept_and_the_server_as_they_were(
    tmp_path: Path, concepts: Path, generator: Any
) -> None:
    async def body(server: Server, port: Any) -> None:
        sent = _capture(server)
        server._control("/divergent/concept", ["riff"])
        await wait_until(lambda: server.concept == "riff")
        for bad, why in (
            ("../x", "bad concept name"),
            ("riff+riff", "names a concept twice"),
            ("", "a concept needs a name"),
        ):
            server._control("/divergent/concept", [bad])
            assert why in _replies(sent, "/divergent/error")[-1][0], bad
        server._control("/divergent/concept", ["nope"])
        await wait_until(lambda: len(_replies(sent, "/divergent/error")) == 4)
        message = _replies(sent, "/divergent/error")[-1][0]
        assert message.startswith("/divergent/concept: no concept named 'nope'"), message
        assert "known: riff, waltz" in message and "still riff" in message
        server._control("/divergent/concept", [3])
        assert "must be a string" in _replies(sent, "/divergent/error")[-1][0]
        assert server.concept == "riff"
        server._control("/divergent/ping", [])
        assert _replies(sent, "/divergent/pong")

    serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts))


def test_list_combination_latest_switch_wins_and_mqtt(
    tmp_path: Path, concepts: Path, generator: Any
) -> None:
    async def body(server: Server, port: Any) -> None:
        sent = _capture(server)
        server._control("/divergent/concepts", [])
        await wait_until(lambda: bool(_replies(sent, "/divergent/concepts")))
        assert _replies(sent, "/divergent/concepts") == [("riff", "waltz")]
        # a switch overtaken by a later one never lands, even when it loads later
        server._control("/divergent/concept", ["riff"])
        server._control("/divergent/concept", ["none"])
        await asyncio.sleep(1.0)
        assert server.concept == "none"
        assert [a[0] for a in _replies(sent, "/divergent/concept")] == ["none"]
        # the MQTT control of the same name, the same checks
        server._on_mqtt("concept", b"riff+waltz")
        await wait_until(lambda: server.concept == "riff+waltz")
        assert server.answers is not None
        assert len(server.answers.generator.concept_prefix) == 4  # both identifiers
        server._on_mqtt("concept/learn", b'["../x", 30]')
        assert "bad concept name" in _replies(sent, "/divergent/error")[-1][0]

    serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts))


def test_concept_answers_are_deterministic_per_seed(
    tmp_path: Path, concepts: Path, generator: Any
) -> None:
    """The server's concept model answers like ``generate --concept`` for the same seed."""
    got: list[Any] = []

    async def body(server: Server, port: Any) -> None:
        server._control("/divergent/concept", ["riff"])
        await wait_until(lambda: server.concept == "riff")
        assert server.answers is not None
        got.append(server.answers.generator)

    serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts))
    live = got[0]
    offline = Generator(generator.model, concept=activate("riff", generator.model, concepts))
    ids = ids_from_notes(generator.model, [(i * 0.5, p, 0.5, 80) for i, p in enumerate(PHRASE)])

    def tokens(g: Generator, seed: int) -> list[int]:
        return list(g.continue_ids(ids, bars=2, seed=seed).tokens)

    first = tokens(live, 5)
    assert first == tokens(live, 5) == tokens(offline, 5)
    assert first != tokens(live, 6)
    assert live.concept_prefix and live.concept_prefix == offline.concept_prefix


def test_concept_strength_is_a_live_knob(tmp_path: Path, concepts: Path, generator: Any) -> None:
    """``--concept-strength`` starts it; ``/divergent/concept/strength`` moves it for the
    next answer (clamped to the model's range), in the status and the take."""
    rec = Recording(generator)

    async def body(server: Server, port: Any) -> None:
        sent = _capture(server)
        port.play(PHRASE)
        await wait_until(lambda: server.stats.midi_in >= 2 * len(PHRASE))
        server._control("/divergent/generate", [])
        await wait_until(lambda: server.stats.answers == 1)
        server._control("/divergent/concept/strength", [0.5])
        assert server.status_dict()["concept_strength"] == 0.5
        assert server.status_args()[-1] == 0.5  # the OSC status's last field
        server._control("/divergent/generate", [])
        await wait_until(lambda: server.stats.answers == 2)
        server._control("/divergent/concept/strength", [9])
        (warning,) = _replies(sent, "/divergent/error")
        assert warning[0].endswith("clamped to 3.0 (applied)"), warning
        server._control("/divergent/concept/strength", ["high"])
        assert "(rejected)" in _replies(sent, "/divergent/error")[-1][0]
        assert server.concept_strength == 3.0
        server._control("/divergent/record/stop", [])
        await asyncio.sleep(0.3)

    serve_in_process(tmp_path, body, gen=rec, concepts=str(concepts), concept_strength=2.0)
    assert [c["concept_strength"] for c in rec.calls] == [2.0, 0.5]
    (take,) = (tmp_path / "sessions").glob("*.mid")
    texts = [m.text for tr in mido.MidiFile(take).tracks for m in tr if m.type == "text"]
    marks = [t for t in texts if t.startswith("concept_strength=")]
    assert marks == ["concept_strength=2", "concept_strength=0.5", "concept_strength=3"]


def test_starting_in_a_concept(tmp_path: Path, concepts: Path, generator: Any) -> None:
    async def body(server: Server, port: Any) -> None:
        assert server.concept == "riff+waltz"
        assert server.status_args()[-2] == "riff+waltz"
        assert server.answers is not None and server.answers.generator is not generator

    serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts), concept="riff+waltz")
    with pytest.raises(ConceptError, match="no concept named 'nope'"):
        serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts), concept="nope")


def test_learning_needs_enough_playing(tmp_path: Path, concepts: Path, generator: Any) -> None:
    async def body(server: Server, port: Any) -> None:
        sent = _capture(server)
        port.play(PHRASE)  # 8 notes: too few
        await wait_until(lambda: server.stats.midi_in >= 2 * len(PHRASE))
        server._control("/divergent/concept/learn", ["mine", 30])
        message = _replies(sent, "/divergent/error")[-1][0]
        assert "too little played to learn from: 8 notes in the last 30 s" in message
        assert f"at least {MIN_LEARN_NOTES}" in message
        server._control("/divergent/concept/learn", ["mine", 1])  # clamped to 5 s
        errors = [e[0] for e in _replies(sent, "/divergent/error")]
        assert "clamped to 5.0" in errors[-1] and "in the last 5 s" in errors[-2]
        assert server._learning is None

    serve_in_process(tmp_path, body, gen=generator, concepts=str(concepts))


def test_played_notes_make_a_reference(tmp_path: Path) -> None:
    played = PlayedNotes(keep_s=10.0)
    played.add(0.0, False, 50, 0, 0)  # an off whose on came before the window
    played.add(1.0, True, 60, 90, 0)
    played.add(1.5, False, 60, 0, 0)
    played.add(2.0, True, 62, 0 + 70, 0)  # still held at the end
    played.add(2.0, True, 64, 70, 1)
    played.add(2.5, False, 64, 0, 1)
    events = played.window(now=3.0, seconds=2.5)
    assert [e.t for e in events] == [1.0, 1.5, 2.0, 2.0, 2.5]
    assert PlayedNotes.notes(events) == 3
    path = PlayedNotes.write_midi(events, tmp_path / "ref.mid", bpm=120.0, end=3.0)
    mid = mido.MidiFile(path)
    msgs = [m for m in mid.tracks[0] if not m.is_meta]
    ticks = np.cumsum([m.time for m in mido.MidiFile(path).tracks[0]])
    ons = [(m.note, m.channel) for m in msgs if m.type == "note_on"]
    offs = [m.note for m in msgs if m.type == "note_off"]
    assert ons == [(60, 0), (62, 0), (64, 1)] and sorted(offs) == [60, 62, 64]
    assert ticks[-1] == 2 * 960  # 2 s after the first note at 120 BPM: held 62 ends at `end`
    played.add(20.0, True, 70, 80, 0)  # older than keep_s is forgotten
    assert [e.pitch for e in played.window(now=20.0, seconds=600)] == [70]
