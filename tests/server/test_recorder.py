"""Session recorder: real journals and .mid files, reloaded with mido."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.server.recorder import (
    JOURNAL_SUFFIX,
    TICKS_PER_BEAT,
    TakeRecorder,
    default_sessions_dir,
    list_takes,
    recover,
    sanitize_name,
)

REPO = Path(__file__).resolve().parents[2]
TRACKS = ["conductor", "performer", "machine", "controls"]


def on(note: int, velocity: int = 100, channel: int = 0) -> mido.Message:
    return mido.Message("note_on", note=note, velocity=velocity, channel=channel)


def off(note: int, channel: int = 0) -> mido.Message:
    return mido.Message("note_off", note=note, velocity=0, channel=channel)


def load(path: Path) -> mido.MidiFile:
    return mido.MidiFile(path, charset="utf-8")


def absolute(track: mido.MidiTrack) -> list[tuple[int, Any]]:
    """(absolute tick, message) for every message of a track."""
    out, tick = [], 0
    for msg in track:
        tick += msg.time
        out.append((tick, msg))
    return out


def seconds(mid: mido.MidiFile) -> list[tuple[float, Any]]:
    """(playback seconds, message) as a reader computes them through the tempo map."""
    out, now = [], 0.0
    for msg in mid:
        now += msg.time
        out.append((now, msg))
    return out


def expected_tick(t: float, bpm0: float, change: tuple[float, float] | None) -> float:
    """Ticks at t, integrated by hand: an independent check of the recorder's tempo map."""
    per_s = TICKS_PER_BEAT / 60
    if change is None or t <= change[0]:
        return t * bpm0 * per_s
    tc, bpm1 = change
    return tc * bpm0 * per_s + (t - tc) * bpm1 * per_s


def balanced(track: mido.MidiTrack) -> bool:
    """True when every note_on is matched by a later note-off of the same channel and note."""
    sounding: dict[tuple[int, int], int] = {}
    for msg in track:
        if msg.type == "note_on" and msg.velocity > 0:
            key = (msg.channel, msg.note)
            sounding[key] = sounding.get(key, 0) + 1
        elif msg.type in ("note_on", "note_off"):
            key = (msg.channel, msg.note)
            sounding[key] = max(0, sounding.get(key, 0) - 1)
    return not any(sounding.values())


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    ("bpm0", "bpm1", "ts"),
    [(120.0, 90.0, (4, 4)), (97.3, 143.7, (3, 4)), (60.0, 60.0, (6, 8))],
)
def test_round_trip(tmp_path: Path, bpm0: float, bpm1: float, ts: tuple[int, int]) -> None:
    start = 1000.0  # explicit monotonic times: no sleeping, exact expectations
    rec = TakeRecorder(
        folder=tmp_path,
        name="round trip",
        bpm=bpm0,
        start=start,
        meta={"model": "bundled-int8", "divergent": "0.1.0"},
        time_signature=ts,
    )
    rec.control(start, "divergence", 0.0)
    rec.control(start, "temperature", 1.0)
    rec.control(start, "mode", "call")
    performer = [
        (0.5, on(60)),
        (1.0, off(60)),
        (1.25, on(64, 90, channel=2)),
        (2.75, off(64, channel=2)),
    ]
    machine = [(3.0, on(67)), (3.5, off(67)), (4.0, on(72)), (5.5, off(72))]
    for t, msg in performer:
        rec.note(start + t, "performer", msg)
    rec.note(start + 1.5, "performer", mido.Message("control_change", control=64, value=127))
    rec.note(start + 1.6, "performer", mido.Message("control_change", control=64, value=0))
    rec.note(start + 1.7, "performer", mido.Message("pitchwheel", pitch=-2000))
    rec.note(start + 1.8, "performer", mido.Message("clock"))  # not a channel message
    rec.note(start + 1.9, "performer", mido.Message("sysex", data=[1, 2]))
    rec.tempo(start + 2.0, bpm1)
    rec.marker(start + 3.0, "answer 1: d=0.50")
    # The sender reports machine notes in batches, after later performer events: out of
    # order on arrival, in order in the file.
    for t, msg in reversed(machine):
        rec.note(start + t, "machine", msg)
    rec.control(start + 3.2, "divergence", 0.5)
    rec.control(start + 4.2, "divergence", 1.0)
    rec.control(start + 4.5, "temperature", 2.0)
    rec.control(start + 4.6, "bars", 4)
    rec.marker(start + 4.0, "answer 2: d=1.00")
    assert rec.ignored == 2
    duration = 6.25
    path = rec.close(start + duration)

    assert path == tmp_path / "round trip.mid" and path.exists()
    assert not rec.journal_path.exists()
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    mid = load(path)
    assert mid.type == 1 and mid.ticks_per_beat == TICKS_PER_BEAT
    assert [t.name for t in mid.tracks] == TRACKS
    assert mid.length == pytest.approx(duration, abs=0.003)

    change = None if bpm1 == bpm0 else (2.0, bpm1)
    cond, perf, mach, ctl = (absolute(t) for t in mid.tracks)
    tempos = [(tick, m.tempo) for tick, m in cond if m.type == "set_tempo"]
    want_tempos = [(0, round(60e6 / bpm0))]
    if change:
        want_tempos.append((round(expected_tick(2.0, bpm0, None)), round(60e6 / bpm1)))
    assert [tp for _, tp in tempos] == [tp for _, tp in want_tempos]
    for (tick, _), (want, _) in zip(tempos, want_tempos, strict=True):
        assert abs(tick - want) <= 1
    sigs = [m for _, m in cond if m.type == "time_signature"]
    assert [(s.numerator, s.denominator) for s in sigs] == [ts]

    # Tick positions of the notes follow the tempo map (tempos are stored in whole
    # microseconds, so allow a tick of rounding).
    for got_track, want_events in ((perf, performer), (mach, machine)):
        notes = [(tick, m) for tick, m in got_track if m.type in ("note_on", "note_off")]
        assert len(notes) == len(want_events)
        for (tick, msg), (t, want) in zip(notes, want_events, strict=True):
            assert msg.type == want.type and msg.note == want.note
            assert msg.channel == want.channel
            assert abs(tick - expected_tick(t, bpm0, change)) <= 1.0
    # ... and so do the seconds a reader computes.
    secs = {
        (m.type, m.note, m.channel): s for s, m in seconds(mid) if m.type in ("note_on", "note_off")
    }
    for t, msg in performer + machine:
        assert secs[(msg.type, msg.note, msg.channel)] == pytest.approx(t, abs=0.001)

    assert [m.type for _, m in perf if m.type not in ("note_on", "note_off")] == [
        "track_name",
        "control_change",
        "control_change",
        "pitchwheel",
        "end_of_track",
    ]
    assert [m.pitch for _, m in perf if m.type == "pitchwheel"] == [-2000]
    assert sum(m.type == "note_on" for _, m in perf) == 2
    assert sum(m.type == "note_on" for _, m in mach) == 2
    assert balanced(mid.tracks[1]) and balanced(mid.tracks[2])

    markers = [(s, m.text) for s, m in seconds(mid) if m.type == "marker"]
    assert [text for _, text in markers] == ["answer 1: d=0.50", "answer 2: d=1.00"]
    assert [s for s, _ in markers] == pytest.approx([3.0, 4.0], abs=0.001)

    texts = [(tick, m.text) for tick, m in cond if m.type == "text"]
    at_zero = [text for tick, text in texts if tick == 0]
    assert "divergent.format=1" in at_zero
    assert "meta.model=bundled-int8" in at_zero and "meta.divergent=0.1.0" in at_zero
    assert not any(t.startswith("divergent.recovered") for t in at_zero)
    started = next(t for t in at_zero if t.startswith("divergent.started="))
    assert started.split("=", 1)[1][:4].isdigit()
    assert [text for _, text in texts if "=" in text and "." not in text.split("=")[0]] == [
        "divergence=0",
        "temperature=1",
        "mode=call",
        "divergence=0.5",
        "divergence=1",
        "temperature=2",
        "bars=4",
    ]

    ccs = [(m.control, m.value, m.channel) for _, m in ctl if m.type == "control_change"]
    assert ccs == [(20, 0, 15), (21, 64, 15), (20, 64, 15), (20, 127, 15), (21, 127, 15)]
    cc_secs = [s for s, m in seconds(mid) if m.type == "control_change" and m.channel == 15]
    assert cc_secs == pytest.approx([0.0, 0.0, 3.2, 4.2, 4.5], abs=0.001)


def test_times_before_start_clamp_and_end_covers_late_events(tmp_path: Path) -> None:
    rec = TakeRecorder(folder=tmp_path, name="clamp", bpm=120, start=50.0)
    rec.note(49.0, "performer", on(60))  # before the take: at 0
    rec.note(50.5, "performer", off(60))
    rec.note(52.0, "machine", on(61))
    rec.note(52.5, "machine", off(61))
    mid = load(rec.close(51.0))  # an end before the last event never cuts it off
    notes = [(tick, m.type) for tick, m in absolute(mid.tracks[1]) if m.type.startswith("note")]
    assert notes == [(0, "note_on"), (960, "note_off")]
    assert mid.length == pytest.approx(2.5, abs=0.002)


def test_long_take_has_no_drift(tmp_path: Path) -> None:
    """An hour at an awkward tempo with many tempo changes still lands on the wall clock."""
    rec = TakeRecorder(folder=tmp_path, name="long", bpm=133.33, start=0.0)
    for k in range(1, 60):
        rec.tempo(k * 60.0 + 0.123, 80 + k * 1.7)
    for k in range(0, 3600, 7):
        rec.note(k + 0.5, "machine", on(60))
        rec.note(k + 0.9, "machine", off(60))
    mid = load(rec.close(3600.0))
    assert mid.length == pytest.approx(3600.0, abs=0.002)
    got = [s for s, m in seconds(mid) if m.type == "note_on"]
    assert max(abs(s - (k + 0.5)) for s, k in zip(got, range(0, 3600, 7), strict=True)) < 0.001


def test_close_is_idempotent_and_later_calls_are_ignored(tmp_path: Path) -> None:
    with TakeRecorder(folder=tmp_path, name="idem", bpm=100, start=0.0) as rec:
        rec.note(0.1, "performer", on(60))
        rec.note(0.2, "performer", off(60))
        first = rec.close(1.0)
        data = first.read_bytes()
    assert rec.closed and rec.events == 2
    rec.note(2.0, "performer", on(61))
    rec.marker(2.0, "late")
    rec.control(2.0, "divergence", 0.3)
    rec.tempo(2.0, 90)
    rec.flush()
    assert rec.ignored == 4
    assert rec.close(5.0) == first and first.read_bytes() == data


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        TakeRecorder(folder=tmp_path, bpm=0)
    with pytest.raises(ValueError):
        TakeRecorder(folder=tmp_path, bpm=120, time_signature=(4, 3))
    rec = TakeRecorder(folder=tmp_path, name="bad", bpm=120, start=0.0)
    with pytest.raises(ValueError):
        rec.note(0.0, "drums", on(60))  # type: ignore[arg-type]
    rec.tempo(1.0, float("nan"))  # a lost clock must not raise on the event loop
    rec.tempo(1.0, 0)
    assert rec.ignored == 2 and rec.events == 0
    mid = load(rec.close(1.0))
    assert [m.tempo for m in mid.tracks[0] if m.type == "set_tempo"] == [500_000]


# ------------------------------------------------------------------------------ stuck notes


@pytest.mark.parametrize("finish", ["close", "recover"])
def test_hanging_notes_are_closed_at_the_end(tmp_path: Path, finish: str) -> None:
    rec = TakeRecorder(folder=tmp_path, name="stuck", bpm=120, start=0.0)
    rec.note(0.5, "machine", on(60))
    rec.note(0.6, "machine", on(60))  # the same pitch twice: two note-offs owed
    rec.note(0.7, "machine", off(60))
    rec.note(0.8, "machine", on(64, channel=3))
    rec.note(0.9, "performer", on(48))
    rec.note(1.0, "performer", on(50, velocity=0))  # a note-off in note_on clothing
    rec.note(1.1, "performer", mido.Message("control_change", control=64, value=100))
    rec.note(2.0, "performer", off(55))  # an unmatched note-off is kept and harmless
    if finish == "close":
        path = rec.close(3.0)
        end_s = 3.0
    else:
        rec.flush()
        rec._file.close()  # what a crash does to the lock, without the rest
        [path] = recover(tmp_path)
        end_s = 2.0  # a recovered take ends at its last event
    mid = load(path)
    assert balanced(mid.tracks[1]) and balanced(mid.tracks[2])
    end_tick = round(end_s * 2 * TICKS_PER_BEAT)
    closing = [
        (m.type, m.channel, m.note)
        for tick, m in absolute(mid.tracks[2])
        if tick == end_tick and m.type == "note_off"
    ]
    assert sorted(closing) == [("note_off", 0, 60), ("note_off", 3, 64)]
    pedal = [
        (tick, m.value)
        for tick, m in absolute(mid.tracks[1])
        if m.type == "control_change" and m.control == 64
    ]
    assert pedal == [(round(1.1 * 2 * TICKS_PER_BEAT), 100), (end_tick, 0)]


# ------------------------------------------------------------------------------ crash & recovery


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import mido
    from divergent.server.recorder import TakeRecorder

    t0 = time.monotonic()
    rec = TakeRecorder(folder=Path(sys.argv[1]), name="crash", bpm=120, start=t0,
                       meta={"model": "test"})
    i = 0
    while time.monotonic() - t0 < 1.5:
        now = time.monotonic()
        rec.note(now, "performer", mido.Message("note_on", note=40 + i % 40, velocity=99))
        rec.marker(now, str(i))
        rec.note(now + 0.005, "machine", mido.Message("note_on", note=40 + i % 40))
        # what was recorded, for the test: a pipe write reaches the parent at once
        print(i, now - t0, flush=True)
        i += 1
        time.sleep(0.01)
    print("kill", time.monotonic() - t0, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush, no atexit
""")


def test_sigkill_loses_at_most_the_last_second(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == -9, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    kill_s = float(lines[-1][1])
    sent = {int(i): float(t) for i, t in lines[:-1]}
    assert (tmp_path / f"crash{JOURNAL_SUFFIX}").exists() and not (tmp_path / "crash.mid").exists()

    [path] = recover(tmp_path)
    assert path == tmp_path / "crash.mid"
    assert not (tmp_path / f"crash{JOURNAL_SUFFIX}").exists()
    mid = load(path)
    got = {int(m.text): s for s, m in seconds(mid) if m.type == "marker"}
    must_have = {i for i, t in sent.items() if t <= kill_s - 1.0}
    assert must_have and must_have <= set(got)
    assert sorted(got) == list(range(len(got)))  # what survived is a prefix, no gaps
    for i, s in got.items():
        assert s == pytest.approx(sent[i], abs=0.001)
    assert sum(m.type == "note_on" and m.velocity for m in mid.tracks[1]) >= len(must_have)
    assert balanced(mid.tracks[1]) and balanced(mid.tracks[2])
    texts = {m.text for m in mid.tracks[0] if m.type == "text"}
    assert {"divergent.recovered=1", "meta.model=test"} <= texts

    # Idempotent: nothing left to recover, and the file is untouched.
    data = path.read_bytes()
    assert recover(tmp_path) == [] and path.read_bytes() == data


def write_journal(folder: Path, name: str, lines: list[str], cut: int = 0) -> Path:
    """A journal as a crash leaves it, the last ``cut`` characters lost."""
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / f"{name}{JOURNAL_SUFFIX}"
    text = "".join(line + "\n" for line in lines)
    journal.write_text(text[: len(text) - cut] if cut else text, encoding="utf-8")
    return journal


HEADER = json.dumps(
    {
        "format": "divergent-take-journal",
        "version": 1,
        "started": "2026-01-02T03:04:05+00:00",
        "bpm": 120.0,
        "time_signature": [4, 4],
        "meta": {},
    }
)


@pytest.mark.parametrize(("cut", "last_kept"), [(1, True), (2, False), (5, False), (12, False)])
def test_truncated_last_line_is_skipped(tmp_path: Path, cut: int, last_kept: bool) -> None:
    lines = [
        HEADER,
        '[0.5,"p",144,60,100]',
        '[1.0,"p",128,60,0]',
        '[1.5,"M","answer 1"]',
        '[2.0,"m",144,62,100]',
    ]
    write_journal(tmp_path, "cut", lines, cut=cut)
    [path] = recover(tmp_path)
    mid = load(path)
    assert [m.text for m in mid.tracks[0] if m.type == "marker"] == ["answer 1"]
    assert [m.type for m in mid.tracks[1] if m.type.startswith("note")] == ["note_on", "note_off"]
    # Losing only the newline loses nothing; losing more drops just that line.
    machine = [m.type for m in mid.tracks[2] if m.type.startswith("note")]
    assert machine == (["note_on", "note_off"] if last_kept else [])
    assert mid.length == pytest.approx(2.0 if last_kept else 1.5, abs=0.002)


def test_journal_with_garbage_and_without_header(tmp_path: Path) -> None:
    lines = [
        '{"format": "divergent-take-jou',
        '[0.25,"p",144,60,100]',
        "not json",
        '["x","p",1]',
        '[0.5,"p",144,200,100]',
        '[0.75,"p",128,60,0]',
        "[]",
        '{"a": 1}',
    ]
    write_journal(tmp_path, "garbage", lines)
    write_journal(tmp_path, "empty", [])
    paths = recover(tmp_path)
    assert [p.name for p in paths] == ["empty.mid", "garbage.mid"]
    mid = load(tmp_path / "garbage.mid")
    notes = [(tick, m.type) for tick, m in absolute(mid.tracks[1]) if m.type.startswith("note")]
    assert notes == [(480, "note_on"), (1440, "note_off")]  # 120 bpm assumed
    assert load(tmp_path / "empty.mid").length == 0
    assert not list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))


def test_recover_leaves_live_takes_alone(tmp_path: Path) -> None:
    rec = TakeRecorder(folder=tmp_path, name="live", bpm=120, start=0.0)
    rec.note(0.1, "performer", on(60))
    rec.flush()
    assert recover(tmp_path) == []
    assert rec.journal_path.exists()
    rec.note(0.2, "performer", off(60))
    path = rec.close(1.0)
    assert sum(m.type.startswith("note") for m in load(path).tracks[1]) == 2


def test_flush_interval_at_append_time(tmp_path: Path) -> None:
    """Appends hand the buffer to the OS once 0.25 s have passed since the last flush."""
    rec = TakeRecorder(folder=tmp_path, name="flush", bpm=120, start=0.0)
    size0 = rec.journal_path.stat().st_size
    rec.note(0.1, "performer", on(60))
    assert rec.journal_path.stat().st_size == size0  # buffered, not yet written
    rec._last_flush -= 0.3  # as if 0.3 s had passed, without sleeping
    rec.note(0.2, "performer", off(60))
    assert rec.journal_path.stat().st_size > size0
    size1 = rec.journal_path.stat().st_size
    rec.marker(0.3, "answer")
    rec.flush()
    assert rec.journal_path.stat().st_size > size1
    rec.close(1.0)


class FullDisk:
    """Stands in for the journal file when the disk is full."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_full_disk_is_counted_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = TakeRecorder(folder=tmp_path, name="full", bpm=120, start=0.0)
    real = rec._file
    rec._file = FullDisk(real)  # type: ignore[assignment]
    rec._last_flush -= 1.0
    rec.note(0.1, "performer", on(60))
    rec.flush()
    assert rec.write_errors == 2 and rec.events == 1
    assert sum("journal write failed" in r.message for r in caplog.records) == 1  # said once
    rec._file = real
    rec.close(1.0)


def _long_take(rec: TakeRecorder, n: int) -> None:
    """``n`` note-ons and -offs of both parts and a knob move every 16 events, flushed
    as the server does (every 0.25 s of take time)."""
    for i in range(n):
        t = i * 0.01
        track = "performer" if i % 3 else "machine"
        rec.note(t, track, on(40 + i % 48, 64 + i % 60) if i % 2 == 0 else off(40 + (i - 1) % 48))
        if i % 16 == 0:
            rec.control(t, "divergence", round((i % 100) / 100, 2))
        if i % 25 == 0:
            rec.flush()


def test_a_long_take_holds_its_journal_compressed(tmp_path: Path) -> None:
    """What is on disk is kept in memory compressed, not as it is: a long set's take
    costs a fraction of its journal's size, and the .mid still holds every event."""
    rec = TakeRecorder(folder=tmp_path, name="long", bpm=120, start=0.0)
    n = 40_000
    _long_take(rec, n)
    rec.flush()
    journal = rec.journal_path.stat().st_size
    assert journal > 1_000_000
    assert rec.memory_bytes < journal / 4, (rec.memory_bytes, journal)
    path = rec.close(n * 0.01 + 1)
    mid = load(path)
    by_name = {t.name: t for t in mid.tracks}
    notes = sum(1 for tr in ("performer", "machine") for m in by_name[tr] if m.type == "note_on")
    assert notes == n // 2  # every note-on (the offs may be written as note_on velocity 0)
    assert sum(1 for m in by_name["controls"] if m.type == "marker" or m.is_meta) > 0


def test_a_vanished_journal_still_gives_the_whole_take(tmp_path: Path) -> None:
    """The disk goes away after the journal's start was written: the .mid is built from
    memory (the compressed copy), with every event."""
    rec = TakeRecorder(folder=tmp_path / "sessions", name="gone", bpm=120, start=0.0)
    _long_take(rec, 2_000)
    rec.flush()
    rec.journal_path.unlink()  # what was written can no longer be read back
    _long_take_tail = [(20.0 + i * 0.01, on(60) if i % 2 == 0 else off(60)) for i in range(20)]
    for t, msg in _long_take_tail:
        rec.note(t, "performer", msg)
    path = rec.close(30.0)
    mid = load(path)
    by_name = {t.name: t for t in mid.tracks}
    ons = [m for tr in ("performer", "machine") for m in by_name[tr] if m.type == "note_on"]
    assert len([m for m in ons if m.velocity > 0]) == 1_000 + 10


def test_past_the_memory_limit_the_part_on_disk_is_read_back(tmp_path: Path) -> None:
    """With the compressed copy let go (past memory_limit), closing reads the journal's
    start back from disk: nothing is lost while the disk is there."""
    rec = TakeRecorder(folder=tmp_path, name="limit", bpm=120, start=0.0, memory_limit=20_000)
    _long_take(rec, 4_000)
    rec.flush()
    assert rec.memory_bytes <= 20_000 and rec.lost == 0
    mid = load(rec.close(50.0))
    by_name = {t.name: t for t in mid.tracks}
    ons = [m for tr in ("performer", "machine") for m in by_name[tr] if m.type == "note_on"]
    assert len([m for m in ons if m.velocity > 0]) == 2_000


def test_note_is_cheap(tmp_path: Path) -> None:
    """note() runs on the event loop at up to 2,000 events/s: it must stay microseconds."""
    rec = TakeRecorder(folder=tmp_path, name="perf", bpm=120, start=0.0)
    msgs = [on(60), off(60)]
    n = 20_000
    t0 = time.perf_counter()
    for i in range(n):
        rec.note(i * 0.0005, "performer", msgs[i & 1])
    per_event_us = (time.perf_counter() - t0) / n * 1e6
    rec.close(n * 0.0005)
    # Measured ~2 µs; a generous bound so a loaded CI machine does not flake.
    assert per_event_us < 50


# ------------------------------------------------------------------------------ listing


def test_list_takes(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    a = TakeRecorder(
        folder=sessions, name="b-second", bpm=120, start=time.monotonic() - 60, meta={"model": "m1"}
    )
    a.note(a._start + 0.5, "performer", on(60))
    a.note(a._start + 1.0, "performer", off(60))
    a.marker(a._start + 1.0, "answer 1")
    a.note(a._start + 1.0, "machine", on(62))
    a.note(a._start + 1.5, "machine", off(62))
    a.close(a._start + 2.0)
    b = TakeRecorder(folder=sessions, name="a-first", bpm=90, start=time.monotonic() - 7200)
    b.close(b._start + 1.0)
    # A crashed take (its journal only) and a broken file.
    write_journal(sessions, "c-crashed", [HEADER, '[0.5,"m",144,60,100]', '[0.75,"M","x"]'])
    (sessions / "d-broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    live = TakeRecorder(folder=sessions, name="e-live", bpm=120)

    takes = list_takes(sessions)
    by_name = {t.name: t for t in takes}
    assert set(by_name) == {"a-first", "b-second", "c-crashed", "d-broken"}
    # Oldest first by start time (names sort the other way for the first two).
    assert [t.name for t in takes[:3]] == ["c-crashed", "a-first", "b-second"]
    second = by_name["b-second"]
    assert (second.performer_notes, second.machine_notes, second.answers) == (1, 1, 1)
    assert second.duration_s == pytest.approx(2.0, abs=0.002)
    assert second.meta == {"model": "m1"} and not second.recovered and second.error is None
    assert second.path == sessions / "b-second.mid"
    crashed = by_name["c-crashed"]
    assert crashed.recovered and crashed.started == "2026-01-02T03:04:05+00:00"
    assert (crashed.machine_notes, crashed.answers) == (1, 1)
    broken = by_name["d-broken"]
    assert broken.error and broken.duration_s == 0
    assert live.journal_path.exists()  # the live take is not "recovered" under its recorder
    live.close()
    assert "e-live" in {t.name for t in list_takes(sessions)}
    assert list_takes(tmp_path / "missing") == []


# ------------------------------------------------------------------------------ names & dirs


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("my take", "my take"),
        ("my/take", "my_take"),
        ("..\\..\\windows", "windows"),
        ("../../etc/passwd", "etc_passwd"),
        ("  .hidden  ", "hidden"),
        ("jam.MID", "jam"),
        ("a\x00b\tc", "a_b c"),
        ("Öl-üdeniz_3", "Öl-üdeniz_3"),
        ("con", "_con"),
        ("x" * 300, "x" * 100),
    ],
)
def test_sanitize_name(given: str, want: str) -> None:
    assert sanitize_name(given) == want


@pytest.mark.parametrize("given", ["", "   ", "///", "...", ".mid", "\x00"])
def test_sanitize_name_rejects_empty(given: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sanitize_name(given)
    with pytest.raises(ValueError):
        TakeRecorder(folder=tmp_path, name=given, bpm=120)
    assert not list(tmp_path.iterdir())


def test_names_never_overwrite(tmp_path: Path) -> None:
    first = TakeRecorder(folder=tmp_path, name="../jam", bpm=120, start=0.0)
    second = TakeRecorder(folder=tmp_path, name="jam", bpm=120, start=0.0)  # while live
    assert first.path == tmp_path / "jam.mid" and second.path == tmp_path / "jam_2.mid"
    first.close(1.0)
    second.close(1.0)
    third = TakeRecorder(folder=tmp_path, name="jam", bpm=120, start=0.0)  # after
    assert third.path == tmp_path / "jam_3.mid"
    third.close(1.0)
    default = TakeRecorder(folder=tmp_path, bpm=120)
    again = TakeRecorder(folder=tmp_path, bpm=120, start=default._start)
    assert len(default.name) == len("2026-11-21_14-03-22")
    assert default.name[4] == "-" and default.name[10] == "_" and default.name[13] == "-"
    assert again.name == f"{default.name}_2"
    default.close()
    again.close()


def test_default_sessions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DIVERGENT_SESSIONS", raising=False)
    monkeypatch.delenv("XDG_MUSIC_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    default = tmp_path / "Music" / "divergent" / "sessions"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_sessions_dir() == default
    monkeypatch.setattr(sys, "platform", "linux")
    assert default_sessions_dir() == default
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user-dirs.dirs").write_text(
        '# written by xdg-user-dirs-update\nXDG_MUSIC_DIR="$HOME/Musik"\n', encoding="utf-8"
    )
    assert default_sessions_dir() == tmp_path / "Musik" / "divergent" / "sessions"
    monkeypatch.setenv("XDG_MUSIC_DIR", str(tmp_path / "tunes"))
    assert default_sessions_dir() == tmp_path / "tunes" / "divergent" / "sessions"
    monkeypatch.setenv("DIVERGENT_SESSIONS", "~/takes")
    assert default_sessions_dir() == tmp_path / "takes"
