"""The performance state machine on a fake clock: no JACK, no threads, no model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from divergent.server.performance import (
    STALE_HOLD_S,
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
    Timeline,
    YieldTurn,
    jam_anchor_seed,
)

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """Time that moves only when told."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: FakeClock, **kw: object) -> Performance:
    grid = Timeline(0.0, 0.0, 120.0)  # 0.5 s a beat, 2 s a bar
    kw.setdefault("phrase_silence_s", 0.3)
    return Performance(now=clock, grid=lambda: grid, **kw)  # type: ignore[arg-type]


def play(perf: Performance, clock: FakeClock, pitches: list[int]) -> list[Request]:
    """A phrase: each note 0.1 s on, 0.02 s apart; the requests it caused."""
    out: list[Request] = []
    for p in pitches:
        out += perf.performer_note(clock.t, True, p, 80, 0)
        clock.t += 0.1
        out += perf.performer_note(clock.t, False, p, 0, 0)
        clock.t += 0.02
    return out


def run_until(perf: Performance, clock: FakeClock, t_end: float) -> list[Request]:
    """Advance the clock deadline by deadline up to ``t_end``, ticking at each."""
    out: list[Request] = []
    while True:
        d = perf.next_deadline()
        if d is None or d > t_end:
            clock.t = t_end
            return out
        clock.t = max(clock.t, d)
        out += perf.tick()


def of(kind: type, reqs: list[Request]) -> list[Request]:
    return [r for r in reqs if isinstance(r, kind)]


def test_module_imports_no_bridge_thread_asyncio_or_io() -> None:
    tree = ast.parse((ROOT / "server" / "performance.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    banned = ("divergent.bridges", "threading", "asyncio", "socket", "subprocess", "io", "os")
    assert not [n for n in names if n.startswith(banned) or "bridges" in n], names


def test_silence_speculates_then_the_phrase_end_releases_it() -> None:
    clock = FakeClock()
    perf = make(clock)
    assert play(perf, clock, [60, 62, 64]) == []
    t_off = clock.t - 0.02
    reqs = run_until(perf, clock, t_off + 0.11)
    (start,) = of(StartAnswer, reqs)
    assert isinstance(start, StartAnswer) and start.speculative
    assert [n[1] for n in start.notes] == [60, 62, 64]
    assert not of(Release, reqs)
    reqs = run_until(perf, clock, t_off + 0.31)
    assert of(PhraseEnd, reqs) and reqs[-1] == Release(start.answer_id, reqs[-1].t)  # type: ignore[union-attr]
    assert not of(StartAnswer, reqs), "the speculative answer is released, not redone"


def test_playing_on_drops_the_speculation() -> None:
    clock = FakeClock()
    perf = make(clock)
    play(perf, clock, [60, 62])
    reqs = run_until(perf, clock, clock.t + 0.15)
    (start,) = of(StartAnswer, reqs)
    reqs = perf.performer_note(clock.t, True, 64, 80, 0)
    assert reqs == [Drop(start.answer_id)]


def test_a_failed_speculation_gets_a_fresh_answer_at_the_phrase_end() -> None:
    clock = FakeClock()
    usable: set[int] = set()
    perf = make(clock, usable=lambda i: i in usable)
    play(perf, clock, [60, 62])
    reqs = run_until(perf, clock, clock.t + 1.0)
    starts = of(StartAnswer, reqs)
    assert [s.speculative for s in starts] == [True, False]  # type: ignore[attr-defined]
    assert of(Drop, reqs) and of(Release, reqs)[-1].answer_id == starts[1].answer_id  # type: ignore[attr-defined]


def test_a_new_answer_cuts_the_previous_one() -> None:
    clock = FakeClock()
    perf = make(clock, yield_turn=False)
    play(perf, clock, [60, 62])
    first = of(StartAnswer, run_until(perf, clock, clock.t + 1.0))[0]
    play(perf, clock, [64, 65])
    reqs = run_until(perf, clock, clock.t + 1.0)
    assert Cut(first.answer_id) in reqs


def test_the_machine_yields_at_the_performers_first_note() -> None:
    clock = FakeClock()
    perf = make(clock)
    play(perf, clock, [60, 62, 64])
    answer = of(StartAnswer, run_until(perf, clock, clock.t + 1.0))[0]
    assert perf.answering(clock.t)
    reqs = perf.performer_note(clock.t, True, 67, 80, 0)
    assert reqs == [YieldTurn(answer.answer_id)]
    assert not perf.answering(clock.t)
    # the next phrase is answered as usual, with nothing left to cut
    perf.performer_note(clock.t + 0.1, False, 67, 0, 0)
    reqs = run_until(perf, clock, clock.t + 1.0)
    assert of(Release, reqs) and not of(Cut, reqs)


def test_with_yield_off_the_answer_plays_on_until_the_next_phrase_ends() -> None:
    clock = FakeClock()
    perf = make(clock, yield_turn=False)
    play(perf, clock, [60, 62, 64])
    answer = of(StartAnswer, run_until(perf, clock, clock.t + 1.0))[0]
    assert perf.performer_note(clock.t, True, 67, 80, 0) == []
    perf.performer_note(clock.t + 0.1, False, 67, 0, 0)
    assert Cut(answer.answer_id) in run_until(perf, clock, clock.t + 1.0)


def test_no_yield_once_the_answer_has_ended_or_outside_call_mode() -> None:
    clock = FakeClock()
    perf = make(clock)
    play(perf, clock, [60, 62])
    answer = of(StartAnswer, run_until(perf, clock, clock.t + 1.0))[0]
    perf.answer_complete(answer.answer_id, clock.t + 0.5)
    clock.t += 0.6
    assert perf.performer_note(clock.t, True, 64, 80, 0) == []
    jam = make(FakeClock(), mode="jam")
    assert not of(YieldTurn, jam.performer_note(100.0, True, 60, 80, 0))


def test_echoes_are_recognised_once_each() -> None:
    clock = FakeClock()
    perf = make(clock)
    perf.machine_note(100.0, 0, 72, 90, True)
    assert perf.is_echo(100.01, 0, 72, True, 90)
    assert not perf.is_echo(100.02, 0, 72, True, 90), "one echo per sent note"
    perf.machine_note(101.0, 0, 72, 0, False)
    assert not perf.is_echo(101.2, 0, 72, False, 0), "too late to be an echo"
    assert perf.echoes == 1


def test_a_note_on_at_another_velocity_is_the_performers_not_an_echo() -> None:
    """A loop gives back the velocity it was sent: the performer striking the machine's
    pitch a few ms after it (at their own velocity) is heard, and the echo still is one."""
    clock = FakeClock()
    perf = make(clock)
    perf.machine_note(100.0, 0, 72, 90, True)
    assert not perf.is_echo(100.004, 0, 72, True, 101)
    assert perf.is_echo(100.006, 0, 72, True, 90)
    perf.machine_note(100.5, 0, 72, 0, False)
    assert perf.is_echo(100.51, 0, 72, False, 64), "a note-off's velocity is not compared"
    assert perf.echoes == 2


def test_a_lost_note_off_counts_as_released_after_a_silence() -> None:
    clock = FakeClock()
    perf = make(clock)
    perf.performer_note(clock.t, True, 60, 80, 0)  # and no note-off
    reqs = run_until(perf, clock, clock.t + STALE_HOLD_S + 1.0)
    assert any("treating as released" in r.message for r in of(Notice, reqs))  # type: ignore[attr-defined]
    assert of(Release, reqs) and not perf.held


def test_bar_ends_phrase_ends_at_the_bar_line() -> None:
    clock = FakeClock(100.3)  # beat 200.6
    perf = make(clock, phrase_silence_s=5.0, bar_ends_phrase=True)
    play(perf, clock, [60])
    assert perf._end_at == pytest.approx(102.0)  # bar line at beat 204, a beat after 201


def test_jam_asks_for_each_bar_ahead_while_the_performer_plays() -> None:
    clock = FakeClock(100.0)
    perf = make(clock, mode="jam")
    play(perf, clock, [60, 64])
    reqs = run_until(perf, clock, 104.0)
    starts = of(StartAnswer, reqs)
    assert [s.jam_bar for s in starts] == [204.0, 208.0]  # type: ignore[attr-defined]
    assert all(r.answer_id in {s.answer_id for s in starts} for r in of(Release, reqs))  # type: ignore[attr-defined]
    assert not of(Cut, reqs), "jam bars overlap nothing"
    later = of(StartAnswer, run_until(perf, clock, 112.0))
    # a note within the bars before: the bar at 212 (played at 100 s = beat 200) still jams
    assert [s.jam_bar for s in later] == [212.0], "then no jamming on its own"  # type: ignore[attr-defined]


@pytest.mark.parametrize("bars", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [None, 0, 7])
def test_jam_bars_of_one_phrase_keep_one_anchor(bars: int, seed: int | None) -> None:
    """Phrases of ``bars`` bars on the grid: one anchor seed each, a new one per phrase."""
    per_phrase = [
        {jam_anchor_seed(4.0 * (p * bars + b), bars, seed) for b in range(bars)}
        for p in range(40, 46)
    ]
    assert all(len(one) == 1 for one in per_phrase)
    assert len(set().union(*per_phrase)) == len(per_phrase)
    assert all(a >= 0 for a in set().union(*per_phrase))  # a numpy seed
    assert jam_anchor_seed(160.0, bars, 3) != jam_anchor_seed(160.0, bars, 4)


def test_mode_change_panics_and_forgets_the_phrase() -> None:
    clock = FakeClock()
    perf = make(clock)
    play(perf, clock, [60, 62])
    reqs = perf.set_mode("off")
    assert reqs == [Panic("mode call -> off")]
    assert not of(StartAnswer, run_until(perf, clock, clock.t + 2.0))


def test_generate_with_nothing_played_is_rejected() -> None:
    clock = FakeClock()
    perf = make(clock, mode="off")
    reqs = perf.generate()
    assert of(PhraseEnd, reqs) and "nothing to continue" in of(Reject, reqs)[0].message  # type: ignore[attr-defined]


def test_context_is_in_beats_from_a_bar_line_and_velocity_follows() -> None:
    clock = FakeClock(101.0)  # beat 202
    perf = make(clock)
    perf.performer_note(101.0, True, 60, 40, 0)
    perf.performer_note(101.5, False, 60, 0, 0)
    perf.machine_note(101.5, 0, 67, 90, True)
    notes, origin = perf.context(102.0)
    assert origin == 200.0
    assert notes == [(2.0, 60, 1.0, 40), (3.0, 67, 1.0, 90)]
    assert perf.velocity() == 40  # the performer's notes only


def test_timeline_is_immutable_and_retempo_keeps_the_beat() -> None:
    line = Timeline(10.0, 4.0, 120.0)
    with pytest.raises(AttributeError):
        line.tempo = 90.0  # type: ignore[misc]
    faster = line.retempo(240.0, at=11.0)
    assert faster.beat_at(11.0) == pytest.approx(line.beat_at(11.0))
    assert faster.bpm() == 240.0 and line.bpm() == 120.0


def test_machine_off_keeps_an_answer_warm_for_generate() -> None:
    """With the machine off, an answer to what was played is made once the hands are off
    the keys; /divergent/generate releases it at once instead of starting one."""
    clock = FakeClock()
    usable: set[int] = set()
    perf = make(clock, mode="off", usable=lambda i: i in usable)
    play(perf, clock, [60, 62, 64])
    reqs = run_until(perf, clock, clock.t + 0.5)
    (warm,) = of(StartAnswer, reqs)
    assert warm.speculative and warm.reason == "warm" and warm.performer_notes == 3
    assert not of(Release, reqs)  # nothing sounds until asked
    usable.add(warm.answer_id)
    clock.t += 2.0
    reqs = perf.generate()
    assert not of(StartAnswer, reqs)
    assert [(r.answer_id, r.t) for r in of(Release, reqs)] == [(warm.answer_id, clock.t)]
    # asked again with nothing new played: a fresh answer
    reqs = perf.generate()
    assert len(of(StartAnswer, reqs)) == 1 and not of(StartAnswer, reqs)[0].speculative


def test_a_warm_answer_goes_when_the_performer_plays_on_or_a_setting_changes() -> None:
    clock = FakeClock()
    usable: set[int] = set()
    perf = make(clock, mode="off", usable=lambda i: i in usable)
    play(perf, clock, [60, 62])
    (warm,) = of(StartAnswer, run_until(perf, clock, clock.t + 0.5))
    usable.add(warm.answer_id)
    # playing on: the warm answer no longer answers what was played
    reqs = perf.performer_note(clock.t, True, 65, 80, 0)
    assert [r.answer_id for r in of(Drop, reqs)] == [warm.answer_id]
    reqs = perf.performer_note(clock.t + 0.1, False, 65, 0, 0)
    clock.t += 0.1
    (warm2,) = of(StartAnswer, run_until(perf, clock, clock.t + 0.5))
    assert warm2.performer_notes == 3
    usable.add(warm2.answer_id)
    # the knob moved: the warm answer was made with the old setting
    assert [r.answer_id for r in of(Drop, perf.settings_changed())] == [warm2.answer_id]
    reqs = perf.generate()
    (fresh,) = of(StartAnswer, reqs)
    assert not fresh.speculative and fresh.answer_id not in usable
