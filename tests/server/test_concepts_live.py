"""Concepts live, end to end: a real ``divergent serve`` process (JACK MIDI, real UDP,
real files) driven over OSC as a client: the concepts list, switching (also mid-jam),
errors, the status and the take, learning over OSC, and learning without torch."""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.model.concept import TrainingExtraMissing
from divergent.server.livepeer import ServeProcess, stuck_notes
from tests.server.test_concepts_app import learn_tiny
from tests.server.test_live import _wait_silent

#: Learning in the live tests: the server's learn process takes this many steps.
LEARN_STEPS = "2"


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("concepts")
    learn_tiny(folder, "riff")
    learn_tiny(folder, "waltz")
    return folder


@pytest.fixture
def serve(tmp_path: Path, jack_server: Any):  # type: ignore[no-untyped-def]
    """Start ``divergent serve`` processes on JACK; all are stopped at the end."""
    started: list[ServeProcess] = []

    def start(*extra: str) -> ServeProcess:
        name = f"dvc{os.getpid() % 10000}x{random.randrange(10**6)}"
        sp = ServeProcess(
            ["--midi-backend", "jack", *extra],
            workdir=tmp_path / f"s{len(started)}",
            name=name,
        )
        sp.workdir.mkdir(parents=True, exist_ok=True)
        started.append(sp)
        return sp.start(timeout=30)

    yield start
    for sp in started:
        sp.stop(signal.SIGKILL if sp.proc and sp.proc.poll() is None else signal.SIGTERM)


def _play(sp: ServeProcess, pitches: list[int], gap: float = 0.06) -> None:
    for p in pitches:
        sp.osc.send("/divergent/note", p, 90, 1)
        time.sleep(gap)
        sp.osc.send("/divergent/note", p, 0, 1)
        time.sleep(0.02)


def test_list_switch_status_errors_and_take(serve: Any, concepts: Path) -> None:
    sp = serve("--mode", "off", "--bpm", "240", "--bars", "1", "--concepts", str(concepts))
    assert sp.ask("/divergent/concepts", "/divergent/concepts") == ["riff", "waltz"]
    assert sp.ask("/divergent/status", "/divergent/status")[-2:] == ["none", 1.5]
    t = time.monotonic()
    concept, load_ms = sp.ask("/divergent/concept", "/divergent/concept", "riff+waltz")
    assert concept == "riff+waltz"
    assert 0 < load_ms <= 1000, load_ms  # the budget for loading
    status = sp.ask("/divergent/status", "/divergent/status")
    assert len(status) == 11 and status[-2] == "riff+waltz"
    # the heartbeat names it too (about once a second)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        beats = sp.osc.since(t, "/divergent/status")
        if any(m[2][-2] == "riff+waltz" for m in beats[1:]):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no heartbeat with the concept")
    # an unknown name: a clear error, the concept and the server stay
    err = sp.ask("/divergent/concept", "/divergent/error", "nope")[0]
    assert err.startswith("/divergent/concept: no concept named 'nope'"), err
    assert "still riff+waltz" in err
    assert "bad concept name" in sp.ask("/divergent/concept", "/divergent/error", "a/b")[0]
    assert sp.ask("/divergent/ping", "/divergent/pong")
    assert sp.ask("/divergent/status", "/divergent/status")[-2] == "riff+waltz"
    # an answer in the concept, then back to none
    _play(sp, [60, 64, 67, 72, 71, 67])
    assert sp.ask("/divergent/generate", "/divergent/answer", timeout=10)[5] > 0
    assert sp.ask("/divergent/concept", "/divergent/concept", "none") == ["none", 0.0]
    sp.osc.send("/divergent/record/stop")
    deadline = time.monotonic() + 5
    while not list(sp.sessions.glob("*.mid")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (take,) = sp.sessions.glob("*.mid")
    texts = [m.text for tr in mido.MidiFile(take).tracks for m in tr if m.type == "text"]
    marks = [s for s in texts if s.startswith("concept=")]
    assert marks == ["concept=none", "concept=riff+waltz", "concept=none"], texts


def test_switching_mid_jam_leaves_no_stuck_note_and_no_silent_bar(
    serve: Any, concepts: Path
) -> None:
    sp = serve("--mode", "jam", "--bpm", "240", "--bars", "1", "--concepts", str(concepts))
    stop = threading.Event()
    player = threading.Thread(target=sp.osc.play_loop, args=(stop,), daemon=True)
    t0 = time.monotonic()
    player.start()
    try:
        loads = []
        for at, spec in ((2.5, "riff"), (4.5, "waltz"), (6.0, "none"), (7.0, "riff")):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            loads.append(sp.ask("/divergent/concept", "/divergent/concept", spec)[1])
        time.sleep(max(0.0, t0 + 9.0 - time.monotonic()))
    finally:
        stop.set()
        player.join()
    t_end = time.monotonic()
    # the jam would go on answering a bar at a time (with gaps of silence between notes):
    # end it, so "silent" means done and every note-on's note-off is in the trace
    sp.osc.send("/divergent/mode", "off")
    sp.osc.send("/divergent/stop")
    _wait_silent(sp)
    trace = sp.trace_events()
    sent = [
        (e["actual"], 0x90 if e["type"] == "note_on" else 0x80, e["note"], 1)
        for e in trace
        if e.get("event") == "sent" and e["type"] in ("note_on", "note_off")
    ]
    assert stuck_notes(sent) == [], "a note-on without its note-off"
    switches = [e["t"] for e in trace if e.get("event") == "concept"]
    assert len(switches) == 4 and max(loads) <= 1000, loads
    # no silent bar: while the performer plays, the machine's onsets are never as much as
    # a bar and a half apart (a jam bar lost to a switch leaves a gap of about two bars)
    bar = 4 * 60 / 240
    ons = sorted(t for t, st, _, _ in sent if st == 0x90 and t <= t_end)
    assert ons and ons[0] < switches[0] - bar, "the jam was playing before the first switch"
    gaps = [(b - a, round(a - t0, 2)) for a, b in itertools.pairwise(ons)]
    answers = [e for e in trace if e.get("event") == "answer" and e["scheduled"]]
    # on failure, what each answer around the gap scheduled (seconds from t0), to tell a
    # sparse answer from a late or lost one
    gap, at = max(gaps)
    near = [
        (e["id"], [round(s - t0, 2) for s in e["scheduled"]])
        for e in trace
        if e.get("event") == "answer" and abs(min(e["scheduled"] or [t0 + at]) - t0 - at) < 3 * bar
    ]
    assert gap < 1.5 * bar, (gap, at, [round(s - t0, 2) for s in switches], near)
    # every bar after the first switch was answered
    assert (
        sum(min(e["scheduled"]) > switches[0] for e in answers) >= (t_end - switches[0]) / bar - 2
    )


def test_learn_over_osc_then_switch_to_it(serve: Any, tmp_path: Path) -> None:
    folder = tmp_path / "learned"
    sp = serve(
        "--mode", "off", "--bpm", "120", "--concepts", str(folder),
        "--concept-learn-steps", LEARN_STEPS,
    )  # fmt: skip
    assert sp.ask("/divergent/concepts", "/divergent/concepts") == []
    err = sp.ask("/divergent/concept/learn", "/divergent/error", "mine")[0]
    assert "too little played to learn from: 0 notes in the last 120 s" in err
    pitches = [60, 63, 65, 66, 67, 70, 72, 70, 67, 65, 63, 60] * 3  # a blues line, 36 notes
    _play(sp, pitches, gap=0.1)
    t = time.monotonic()
    sp.osc.send("/divergent/concept/learn", "mine", 60.0)
    # a second learn while the first runs is refused; the server answers meanwhile
    err = sp.ask("/divergent/concept/learn", "/divergent/error", "other")[0]
    assert "'mine' is still being learned" in err
    assert sp.ask("/divergent/ping", "/divergent/pong")
    got = sp.osc.wait_for("/divergent/concept/learned", after=t, timeout=120)
    assert got is not None, sp.log()[-3000:]
    name, seconds, steps, loss, notes, played_s, size = got[2]
    assert (name, steps, notes, played_s) == ("mine", int(LEARN_STEPS), len(pitches), 60.0)
    assert seconds > 0 and loss > 0 and 0 < size <= 1 << 20
    listed = sp.osc.wait_for("/divergent/concepts", after=got[0], timeout=5)
    assert listed is not None and listed[2] == ["mine"]
    assert (folder / "mine.concept.npz").exists()
    assert sp.ask("/divergent/concept", "/divergent/concept", "mine")[0] == "mine"
    assert sp.ask("/divergent/status", "/divergent/status")[-2] == "mine"


def test_learning_without_torch_says_what_to_install(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a real import failure in the learning process: a torch package that cannot load
    fake = tmp_path / "notorch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named torch (test)")\n')
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    sp = serve("--mode", "off", "--concepts", str(tmp_path / "c"), "--concept-learn-steps", "1")
    _play(sp, [60, 62, 64, 65, 67, 69, 71, 72] * 3)
    err = sp.ask("/divergent/concept/learn", "/divergent/error", "mine", timeout=60)[0]
    assert err.startswith("/divergent/concept/learn: learning needs the training extra"), err
    assert TrainingExtraMissing.install in err
    assert TrainingExtraMissing.install == "pip install torch==2.13.0 && pip install -e '.[train]'"
    assert sp.ask("/divergent/ping", "/divergent/pong")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
