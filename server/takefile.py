"""From journal to ``.mid``: reading a take's journal, building the multitrack file,
recovering takes a crash left unfinished, listing the sessions folder.

The journal's format and the file's tracks are described in :mod:`divergent.server.recorder`,
which writes journals while a take runs; everything after the take is here.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import mido

__all__ = [
    "CC_AUTOMATION",
    "JOURNAL_SUFFIX",
    "TICKS_PER_BEAT",
    "TakeInfo",
    "list_takes",
    "parse_journal",
    "read_head",
    "read_journal",
    "recover",
    "try_lock",
    "write_mid",
]

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "divergent-take-journal"
JOURNAL_VERSION = 1
TRACK_CODES = {"performer": "p", "machine": "m"}
CHANNEL_TYPES = frozenset(
    {
        "note_off",
        "note_on",
        "polytouch",
        "control_change",
        "program_change",
        "aftertouch",
        "pitchwheel",
    }
)
# set_tempo stores whole microseconds per beat in 24 bits: about 3.6 bpm at the slowest.
_MAX_TEMPO_US = 0xFFFFFF
_DEFAULT_BPM = 120.0

#: Resolution of the written files: 960 ticks per beat is 0.52 ms at 120 bpm.
TICKS_PER_BEAT = 960
#: Buffered journal lines reach the operating system at least this often (seconds).
FLUSH_INTERVAL_S = 0.25
#: A take's journal is ``<take><JOURNAL_SUFFIX>`` in the sessions folder.
JOURNAL_SUFFIX = ".journal.jsonl"
#: Controls recorded as CC automation on channel 16: name -> (controller, lo, hi); the
#: value is scaled linearly from lo..hi to 0..127 and clamped. Temperature spans 0..2
#: because the server accepts 0.05..2 with 1.0 (the model's own distribution) as default,
#: which lands mid-range instead of pinning the CC at 127.
CC_AUTOMATION: dict[str, tuple[int, float, float]] = {
    "divergence": (20, 0.0, 1.0),
    "temperature": (21, 0.0, 2.0),
}
#: MIDI channel 16 (mido counts channels from 0).
CONTROLS_CHANNEL = 15


# ---------------------------------------------------------------------------- names & dirs


def valid_bpm(bpm: Any) -> bool:
    return (
        isinstance(bpm, int | float)
        and not isinstance(bpm, bool)
        and (math.isfinite(bpm) and bpm > 0)
    )


def check_bpm(bpm: float) -> None:
    if not valid_bpm(bpm):
        raise ValueError(f"bpm must be a positive number, got {bpm!r}")


# ---------------------------------------------------------------------------- journal -> .mid


@dataclass
class _Take:
    """A parsed journal: everything needed to write the ``.mid``."""

    started: str
    bpm: float
    time_signature: tuple[int, int]
    meta: dict[str, Any]
    recovered: bool
    # (seconds, kind, payload) in journal order; sorted (stably) when the file is built.
    events: list[tuple[float, str, Any]] = field(default_factory=list)
    end: float | None = None
    bad_lines: int = 0


def read_journal(path: Path, *, recovered: bool) -> _Take:
    """Parse a journal, skipping lines that do not parse (a crash truncates the last)."""
    started = datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_journal(f, recovered=recovered, started=started, name=path.name)


def read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a journal (the part a long take let go from memory)."""
    with open(path, "rb") as f:
        return f.read(n)


def parse_journal(
    lines: Iterable[str], *, recovered: bool, started: datetime, name: str = "journal"
) -> _Take:
    """Parse journal lines (a file, or a take's journal held in memory); ``started`` is
    the start to assume when the header has none."""
    take = _Take(
        started=started.isoformat(timespec="seconds"),
        bpm=_DEFAULT_BPM,
        time_signature=(4, 4),
        meta={},
        recovered=recovered,
    )
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            take.bad_lines += 1
            continue
        if i == 0 and isinstance(rec, dict):
            _apply_header(take, rec)
            continue
        if not (
            isinstance(rec, list)
            and len(rec) >= 2
            and isinstance(rec[0], int | float)
            and math.isfinite(rec[0])
            and isinstance(rec[1], str)
        ):
            take.bad_lines += 1
            continue
        t, kind, payload = max(0.0, float(rec[0])), rec[1], rec[2:]
        if kind == "E":
            take.end = t if take.end is None else max(take.end, t)
        else:
            take.events.append((t, kind, payload))
    if take.bad_lines:
        log.warning("%s: skipped %d unreadable journal line(s)", name, take.bad_lines)
    return take


def _apply_header(take: _Take, header: dict[str, Any]) -> None:
    if header.get("format") != JOURNAL_FORMAT:
        log.warning("journal header has unknown format %r; reading it anyway", header.get("format"))
    bpm = header.get("bpm")
    if isinstance(bpm, int | float) and math.isfinite(bpm) and bpm > 0:
        take.bpm = float(bpm)
    ts = header.get("time_signature")
    if isinstance(ts, list) and len(ts) == 2 and all(isinstance(x, int) for x in ts):
        take.time_signature = (ts[0], ts[1])
    if isinstance(header.get("started"), str):
        take.started = header["started"]
    if isinstance(header.get("meta"), dict):
        take.meta = header["meta"]


def _tempo_us(bpm: float) -> int:
    return min(_MAX_TEMPO_US, max(1, round(60_000_000 / bpm)))


class _TempoMap:
    """Seconds -> ticks through a piecewise-constant tempo map.

    Every segment starts at a whole tick (where its set_tempo sits), and the seconds of
    that tick are computed the way a reader does (whole ticks times the stored tempo), so
    readers agree with the wall clock to within half a tick everywhere, with no drift.
    """

    def __init__(self, changes: list[tuple[float, int]]) -> None:
        # changes: (seconds, microseconds per beat), sorted, the first at 0.
        self.times: list[float] = []
        self.ticks: list[int] = []
        self.secs: list[float] = []
        self.tempos: list[int] = []
        for t, us in changes:
            if not self.times:
                tick, sec = 0, 0.0
            else:
                spt = self.tempos[-1] / 1e6 / TICKS_PER_BEAT
                tick = max(self.ticks[-1], self.ticks[-1] + round((t - self.secs[-1]) / spt))
                sec = self.secs[-1] + (tick - self.ticks[-1]) * spt
            self.times.append(t)
            self.ticks.append(tick)
            self.secs.append(sec)
            self.tempos.append(us)

    def tick(self, t: float) -> int:
        i = bisect.bisect_right(self.times, t) - 1
        spt = self.tempos[i] / 1e6 / TICKS_PER_BEAT
        # Never before the segment's own set_tempo: keeps ticks monotonic in t.
        return max(self.ticks[i], self.ticks[i] + round((t - self.secs[i]) / spt))


def _tempo_changes(take: _Take, events: list[tuple[float, str, Any]]) -> list[tuple[float, int]]:
    changes: list[tuple[float, int]] = [(0.0, _tempo_us(take.bpm))]
    for t, kind, payload in events:
        if kind != "T" or not payload or not isinstance(payload[0], int | float):
            continue
        bpm = float(payload[0])
        if not (math.isfinite(bpm) and bpm > 0):
            continue
        us = _tempo_us(bpm)
        if t <= changes[-1][0]:
            changes[-1] = (changes[-1][0], us)  # same instant: the later one wins
        elif us != changes[-1][1]:
            changes.append((t, us))
    # A replacement above may have made two neighbours equal: keep only real changes.
    return [c for i, c in enumerate(changes) if i == 0 or c[1] != changes[i - 1][1]]


def _scaled_cc(name: str, value: Any) -> tuple[int, int] | None:
    spec = CC_AUTOMATION.get(name)
    if spec is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    controller, lo, hi = spec
    return controller, min(127, max(0, round((value - lo) / (hi - lo) * 127)))


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


# Status nibble -> (type, data byte names); pitchwheel is handled on its own.
_DECODE: dict[int, tuple[str, tuple[str, ...]]] = {
    0x80: ("note_off", ("note", "velocity")),
    0x90: ("note_on", ("note", "velocity")),
    0xA0: ("polytouch", ("note", "value")),
    0xB0: ("control_change", ("control", "value")),
    0xC0: ("program_change", ("program",)),
    0xD0: ("aftertouch", ("value",)),
    0xE0: ("pitchwheel", ("lsb", "msb")),
}


def _decode_channel(data: Any) -> mido.Message | None:
    """Journal bytes -> a channel message, or None if they are not one.

    Validated here and built with skip_checks: mido.Message.from_bytes spends most of a
    long take's close time re-checking bytes this function has already checked.
    """
    if not isinstance(data, list) or not data or not all(type(b) is int for b in data):
        return None
    status = data[0]
    spec = _DECODE.get(status & 0xF0)
    if spec is None or len(data) != len(spec[1]) + 1 or not all(0 <= b < 128 for b in data[1:]):
        return None
    kind, names = spec
    channel = status & 0x0F
    if kind == "pitchwheel":
        pitch = data[1] | (data[2] << 7)
        return mido.Message(kind, channel=channel, pitch=pitch - 8192, skip_checks=True)
    return mido.Message(
        kind, channel=channel, skip_checks=True, **dict(zip(names, data[1:], strict=True))
    )


def _to_track(
    name: str, items: list[tuple[int, mido.Message | mido.MetaMessage]], end_tick: int
) -> mido.MidiTrack:
    """Absolute-tick items (already in order) -> a track with delta times."""
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("track_name", name=name, time=0))
    now = 0
    for tick, msg in items:
        tick = max(tick, now)
        msg.time = tick - now
        track.append(msg)
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=max(0, end_tick - now)))
    return track


def _close_hanging(items: list[tuple[int, mido.Message | mido.MetaMessage]], end_tick: int) -> int:
    """Append note-offs for notes still sounding (and sustain-pedal releases) at the end.

    Counts note-ons per (channel, note) so overlapping repeats of a pitch balance too.
    Returns how many messages were added.
    """
    sounding: dict[tuple[int, int], int] = {}
    pedal: dict[int, int] = {}
    for _, msg in items:
        if msg.type == "note_on" and msg.velocity > 0:
            key = (msg.channel, msg.note)
            sounding[key] = sounding.get(key, 0) + 1
        elif msg.type in ("note_off", "note_on"):
            key = (msg.channel, msg.note)
            if sounding.get(key, 0) > 0:
                sounding[key] -= 1
        elif msg.type == "control_change" and msg.control == 64:
            pedal[msg.channel] = msg.value
    added = 0
    for (channel, note), count in sorted(sounding.items()):
        for _ in range(count):
            items.append(
                (end_tick, mido.Message("note_off", channel=channel, note=note, velocity=0))
            )
            added += 1
    for channel, value in sorted(pedal.items()):
        if value >= 64:
            items.append(
                (end_tick, mido.Message("control_change", channel=channel, control=64, value=0))
            )
            added += 1
    return added


def _build_mid(take: _Take, name: str) -> mido.MidiFile:
    """Lay a parsed journal out as a Type-1 file (conductor, performer, machine, controls)."""
    # Stable sort: events stamped at the same time keep the order they were recorded in.
    events = sorted(take.events, key=lambda e: e[0])
    last = events[-1][0] if events else 0.0
    end = max(last, take.end if take.end is not None else last)
    tmap = _TempoMap(_tempo_changes(take, events))
    end_tick = tmap.tick(end)

    conductor: list[tuple[int, mido.Message | mido.MetaMessage]] = []
    num, den = take.time_signature
    conductor.append((0, mido.MetaMessage("time_signature", numerator=num, denominator=den)))
    for tick, us in zip(tmap.ticks, tmap.tempos, strict=True):
        conductor.append((tick, mido.MetaMessage("set_tempo", tempo=us)))
    texts = [f"divergent.format={JOURNAL_VERSION}", f"divergent.started={take.started}"]
    if take.recovered:
        texts.append("divergent.recovered=1")
    texts += [f"meta.{k}={_fmt_value(v)}" for k, v in take.meta.items()]
    conductor += [(0, mido.MetaMessage("text", text=s)) for s in texts]

    tracks: dict[str, list[tuple[int, mido.Message | mido.MetaMessage]]] = {
        "p": [],
        "m": [],
        "controls": [],
    }
    for t, kind, payload in events:
        if kind in ("p", "m"):
            msg = _decode_channel(payload)
            if msg is None:
                log.warning("skipping unreadable MIDI bytes %r", payload)
                continue
            tracks[kind].append((tmap.tick(t), msg))
        elif kind == "M" and payload:
            conductor.append((tmap.tick(t), mido.MetaMessage("marker", text=str(payload[0]))))
        elif kind == "C" and len(payload) >= 2:
            cname, value = str(payload[0]), payload[1]
            tick = tmap.tick(t)
            conductor.append((tick, mido.MetaMessage("text", text=f"{cname}={_fmt_value(value)}")))
            cc = _scaled_cc(cname, value)
            if cc is not None:
                tracks["controls"].append(
                    (
                        tick,
                        mido.Message(
                            "control_change", channel=CONTROLS_CHANNEL, control=cc[0], value=cc[1]
                        ),
                    )
                )
    # Tempo changes join the conductor in time order (stable, so time 0 keeps its layout).
    conductor.sort(key=lambda item: item[0])
    for kind in ("p", "m"):
        added = _close_hanging(tracks[kind], end_tick)
        if added:
            log.info("%s: closed %d hanging note(s)/pedal(s) at the end", name, added)

    mid = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT, charset="utf-8")
    mid.tracks.append(_to_track("conductor", conductor, end_tick))
    mid.tracks.append(_to_track("performer", tracks["p"], end_tick))
    mid.tracks.append(_to_track("machine", tracks["m"], end_tick))
    mid.tracks.append(_to_track("controls", tracks["controls"], end_tick))
    return mid


def write_mid(take: _Take, path: Path) -> None:
    """Write atomically: readers see the old file or the whole new one, never half."""
    mid = _build_mid(take, path.stem)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        mid.save(file=f)
        f.flush()
        # The journal is deleted next; make sure what replaces it is on disk first.
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- recovery


def _journals(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.glob(f"*{JOURNAL_SUFFIX}") if p.is_file())


def recover(folder: Path) -> list[Path]:
    """Turn journals left by crashed takes into ``.mid`` files; returns the files written.

    Journals of live takes (held by a running recorder, in this process or another) are
    left alone. Idempotent: a recovered journal is removed, so a second call finds nothing.
    Recovered takes end at their last event and carry ``divergent.recovered=1``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    written: list[Path] = []
    for journal in _journals(folder):
        try:
            f = open(journal, "rb")  # noqa: SIM115 - held open for its lock
        except FileNotFoundError:
            continue  # finished by its recorder meanwhile
        try:
            if not try_lock(f):
                continue
            if not journal.exists():
                continue  # its recorder finished it while we waited for the lock
            path = folder / f"{journal.name[: -len(JOURNAL_SUFFIX)]}.mid"
            write_mid(read_journal(journal, recovered=True), path)
            journal.unlink()
            written.append(path)
            log.info("recovered take %s", path)
        except OSError as exc:
            log.error("could not recover %s: %s", journal, exc)
        finally:
            f.close()
    return written


# ---------------------------------------------------------------------------- listing


@dataclass
class TakeInfo:
    """One take in a sessions folder, as ``list_takes`` reports it.

    ``error`` is set (and the counts are 0) when the file cannot be read as MIDI.
    """

    path: Path
    name: str
    started: str
    duration_s: float
    performer_notes: int
    machine_notes: int
    answers: int
    recovered: bool
    meta: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def _take_info(path: Path) -> TakeInfo:
    mtime = datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    info = TakeInfo(
        path=path,
        name=path.stem,
        started=mtime.isoformat(timespec="seconds"),
        duration_s=0.0,
        performer_notes=0,
        machine_notes=0,
        answers=0,
        recovered=False,
    )
    try:
        mid = mido.MidiFile(path, charset="utf-8")
        info.duration_s = float(mid.length)
    # mido raises whatever its parser trips over on a damaged file (EOFError, OSError,
    # ValueError, KeyError, IndexError…); any of them means "broken", reported, not raised.
    except Exception as exc:
        info.error = f"{type(exc).__name__}: {exc}"
        return info
    for track in mid.tracks:
        names = [m.name for m in track if m.type == "track_name"]
        notes = sum(1 for m in track if m.type == "note_on" and m.velocity > 0)
        if "performer" in names:
            info.performer_notes += notes
        elif "machine" in names:
            info.machine_notes += notes
        tick = 0
        for m in track:
            tick += m.time
            if m.type == "marker":
                info.answers += 1
            elif m.type == "text" and tick == 0 and "=" in m.text:
                key, value = m.text.split("=", 1)
                if key == "divergent.started":
                    info.started = value
                elif key == "divergent.recovered":
                    info.recovered = value == "1"
                elif key.startswith("meta."):
                    info.meta[key[5:]] = value
    return info


def _sort_key(info: TakeInfo) -> tuple[float, str]:
    try:
        started = datetime.fromisoformat(info.started)
    except ValueError:
        return (math.inf, info.name)  # unreadable start: after the others, by name
    if started.tzinfo is None:
        started = started.astimezone()  # naive means local time
    return (started.timestamp(), info.name)


def list_takes(folder: Path) -> list[TakeInfo]:
    """Every take in ``folder``, oldest first, after recovering crashed ones.

    Unreadable ``.mid`` files are listed with ``error`` set instead of raising.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    recover(folder)
    infos: list[TakeInfo] = []
    for path in sorted(folder.glob("*.mid")):
        if path.name.startswith(".") or not path.is_file():
            continue  # a half-written temporary file of a take being closed
        with contextlib.suppress(FileNotFoundError):  # deleted while we listed
            infos.append(_take_info(path))
    infos.sort(key=_sort_key)
    return infos


def try_lock(f: IO[Any]) -> bool:
    """Take the exclusive lock that marks a journal as live; False if someone holds it.

    A live recorder holds it for the whole take, so :func:`recover` (in this process or
    in ``divergent sessions`` beside a running server) leaves a live take alone. flock
    locks die with the process, SIGKILL included, so a crashed take is recoverable at
    once.
    """
    if sys.platform == "win32":
        # No flock on Windows; there an open journal cannot be deleted, which at least
        # keeps a live journal from vanishing under its recorder.
        return True
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
