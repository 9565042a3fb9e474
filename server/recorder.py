"""Session recording: every live take becomes one multitrack Type-1 ``.mid`` file.

A take is written in two stages so that a crash loses at most the last fraction of a
second and a finished take is one ordinary MIDI file a DAW opens:

1. While the take runs, :class:`TakeRecorder` appends every event to a journal,
   ``<take>.journal.jsonl`` in the sessions folder: JSON lines, the first a header
   (format version, wall-clock start, tempo, time signature, meta), then one short list
   per event with its time in seconds since the start of the take::

       [0.512345,"p",144,60,100]        performer channel message (raw MIDI bytes)
       [0.600000,"m",144,67,90]         machine channel message
       [2.000000,"T",96.0]              tempo change (bpm)
       [2.100000,"M","answer 3"]        marker (one per machine answer)
       [2.200000,"C","divergence",0.4]  control change
       [9.000000,"E"]                   end of take (written by close())

   Writes are buffered and reach the operating system at least every 0.25 s (at append
   time, and whenever the server calls :meth:`TakeRecorder.flush`), never fsynced per
   event: the journal survives a killed process, not a power cut.

   **A full or vanished disk loses nothing played.** The journal's bytes are also held
   in memory (up to :data:`MEMORY_LIMIT_BYTES`, 64 MiB): the part not yet on disk as
   it is, the part on disk zlib-compressed (about a sixth of its size: 90,000 events,
   an hour of the soak bench's jam, are 2.6 MB of journal and 0.4 MB in memory). When
   a write fails the take keeps recording in memory, ``fault`` says why and
   ``on_fault`` is called at once; every later flush tries again, and once space
   returns the journal catches up (``on_fault("")``). Past the limit the part already on
   disk is let go from memory; events that can reach neither are counted in ``lost``
   (logged). A journal that cannot even be created (a sessions folder that cannot be
   written) is retried the same way.
2. :meth:`TakeRecorder.close` builds the ``.mid`` from the journal, writes it atomically
   (temporary file + :func:`os.replace`) and removes the journal. If the sessions folder
   still cannot take it, the ``.mid`` is written to the first writable rescue folder of
   :func:`rescue_dirs` (``$DIVERGENT_RESCUE``, else ``<temp>/divergent-rescued``, else
   ``~/divergent-rescued``) and ``rescued`` is set. A journal left behind by
   a crash is turned into a ``.mid`` by :func:`recover` (``list_takes`` and the server's
   start call it), which tolerates a truncated last line.

Building from the journal in both cases keeps one code path, so every finished take also
proves the journal it came from is complete.

The ``.mid`` (960 ticks per beat) has four tracks:

- ``conductor``: time signature, ``set_tempo`` at every tempo change, text events at time
  0 (``divergent.format=1``, ``divergent.started=<ISO time>``, ``divergent.recovered=1``
  for recovered takes, ``meta.<key>=<value>`` for the take's meta), a marker at every
  machine answer and a text event ``<name>=<value>`` at every control change;
- ``performer``: what the human played (channels as played);
- ``machine``: what the server played;
- ``controls``: divergence as CC 20 and temperature as CC 21 on MIDI channel 16 (see
  :data:`CC_AUTOMATION` for the scaling); other controls exist only as conductor text.

Seconds become ticks by integrating the tempo map piecewise with the tempos exactly as the
file stores them (whole microseconds per beat), so ``mido.MidiFile(path).length`` is the
take's wall duration to within half a tick. Note-ons still sounding at the end of a take
(and a held sustain pedal) get their note-offs at the end time: no hanging notes in a DAW.

Meta text is written as UTF-8; read it with ``mido.MidiFile(path, charset="utf-8")``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import mido

from divergent.server.takefile import (
    CC_AUTOMATION,
    CHANNEL_TYPES,
    FLUSH_INTERVAL_S,
    JOURNAL_FORMAT,
    JOURNAL_SUFFIX,
    JOURNAL_VERSION,
    TICKS_PER_BEAT,
    TRACK_CODES,
    TakeInfo,
    check_bpm,
    list_takes,
    parse_journal,
    read_head,
    recover,
    try_lock,
    valid_bpm,
    write_mid,
)

__all__ = [
    "CC_AUTOMATION",
    "FLUSH_INTERVAL_S",
    "JOURNAL_SUFFIX",
    "MEMORY_LIMIT_BYTES",
    "TICKS_PER_BEAT",
    "TakeInfo",
    "TakeRecorder",
    "default_sessions_dir",
    "list_takes",
    "recover",
    "rescue_dirs",
    "sanitize_name",
    "writable_problem",
]

log = logging.getLogger(__name__)

_MAX_NAME = 100
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


def sanitize_name(name: str) -> str:
    """Turn a user's take name into a safe file stem.

    Path separators and any character other than letters, digits, space, ``-``, ``_`` and
    ``.`` become ``_``; leading/trailing dots, spaces and underscores go (no hidden files,
    no ``..``), a trailing ``.mid``/``.midi`` is dropped, and the result is at most 100
    characters. Raises ``ValueError`` when nothing usable is left.
    """
    stem = re.sub(r"\.midi?$", "", name.strip(), flags=re.IGNORECASE)
    stem = re.sub(r"[^\w\-. ]+", "_", re.sub(r"\s+", " ", stem))[:_MAX_NAME].strip(" ._")
    if not stem:
        raise ValueError(f"take name {name!r} has no usable characters")
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        # "con.mid" cannot be created on Windows; the sessions folder may be shared.
        stem = f"_{stem}"
    return stem


def _xdg_music_dir() -> Path | None:
    """The desktop's music folder on Linux/BSD, or None when it is not configured."""
    home = Path.home()
    env = os.environ.get("XDG_MUSIC_DIR")
    if env:
        return Path(env).expanduser()
    # Desktops set the music folder in user-dirs.dirs, rarely in the environment; it may
    # be localised (~/Musik), which is why it is worth reading.
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "user-dirs.dirs"
    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r'^\s*XDG_MUSIC_DIR\s*=\s*"([^"]*)"', text, flags=re.MULTILINE)
    if not match:
        return None
    folder = Path(match.group(1).replace("$HOME", str(home))).expanduser()
    # A disabled entry points at $HOME itself; a sessions folder there would be clutter.
    return folder if folder.is_absolute() and folder != home else None


def default_sessions_dir() -> Path:
    """Where takes are written when no folder is configured.

    ``$DIVERGENT_SESSIONS`` wins when set. Otherwise ``<music>/divergent/sessions``, where
    ``<music>`` is ``~/Music`` on macOS and Windows, and on Linux and other Unixes
    ``$XDG_MUSIC_DIR``, else ``XDG_MUSIC_DIR`` from ``~/.config/user-dirs.dirs``, else
    ``~/Music``. The folder is not created here (a recorder creates it).
    """
    env = os.environ.get("DIVERGENT_SESSIONS")
    if env:
        return Path(env).expanduser()
    music: Path | None = None
    if sys.platform != "darwin" and sys.platform != "win32":
        music = _xdg_music_dir()
    return (music or Path.home() / "Music") / "divergent" / "sessions"


#: A take's journal held in memory, at most (bytes): ~30 bytes an event.
MEMORY_LIMIT_BYTES = 64 << 20


def rescue_dirs() -> list[Path]:
    """Where a take goes when its sessions folder cannot take it, in order of preference:
    ``$DIVERGENT_RESCUE`` when set, ``<temp>/divergent-rescued`` (often another
    filesystem, RAM on many systems), ``~/divergent-rescued``."""
    dirs = []
    env = os.environ.get("DIVERGENT_RESCUE")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path(tempfile.gettempdir()) / "divergent-rescued")
    dirs.append(Path.home() / "divergent-rescued")
    return dirs


def writable_problem(folder: Path) -> str | None:
    """Why takes cannot be written to ``folder`` (created if missing), or None if they can:
    a small file is written, flushed and removed."""
    probe = Path(folder) / f".divergent-probe-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{e.strerror or e} ({folder})"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError as e:
            log.debug("probe file left behind: %s", e)
    return None


# ---------------------------------------------------------------------------- recorder


def _wall_start(start: float) -> datetime:
    """Local wall-clock time (with offset) at monotonic time ``start``."""
    return datetime.now().astimezone() - timedelta(seconds=time.monotonic() - start)


class TakeRecorder:
    """Records one live take: a journal while it runs, a multitrack ``.mid`` on close.

    Not thread-safe: call it from the event loop only. Every recording method takes ``t``,
    a ``time.monotonic()`` timestamp; times before ``start`` count as 0, and events may
    arrive slightly out of order (they are sorted by time when the file is built). Calls
    after :meth:`close` are counted in :attr:`ignored` and otherwise dropped, so a late
    event can never raise on the event loop.

    Attributes:
        path: the final ``.mid`` path.
        journal_path: the journal being appended to.
        name: the take's file stem.
        started: wall-clock start time, ISO 8601 with UTC offset.
        events: events recorded so far.
        ignored: messages not recorded (non-channel messages, invalid tempos, calls
            after close).
        write_errors: failed journal flushes (logged once; the take goes on).
        fault: why the journal is not on disk right now ("" when it is).
        lost: events that fit neither on disk nor in memory (see the module docs).
        rescued: the rescue-folder ``.mid`` when the sessions folder could not take it.
    """

    def __init__(
        self,
        *,
        folder: Path,
        name: str | None = None,
        bpm: float,
        start: float | None = None,
        meta: dict[str, Any] | None = None,
        time_signature: tuple[int, int] = (4, 4),
        on_fault: Callable[[str], object] | None = None,
        memory_limit: int = MEMORY_LIMIT_BYTES,
    ) -> None:
        """Create the journal and write its header.

        Args:
            folder: sessions folder (created if missing).
            name: take name, sanitised with :func:`sanitize_name`; default the start time
                as ``2026-11-21_14-03-22``. ``_2``, ``_3``… is appended when a take of
                that name exists.
            bpm: tempo at the start of the take.
            start: monotonic time of the take's start (default: now).
            meta: written as ``meta.<key>=<value>`` text events at time 0 (model name,
                server version…).
            time_signature: (numerator, denominator) written at time 0.
            on_fault: called with a message when journal writing starts failing, and
                with "" when the journal has caught up (from the caller's thread, and
                from :meth:`close`'s).
            memory_limit: bytes of journal held in memory (see the module docs).
        """
        check_bpm(bpm)
        num, den = time_signature
        if not (1 <= num <= 255 and 1 <= den <= 128) or den & (den - 1):
            raise ValueError(f"bad time signature {num}/{den}")
        self._start = time.monotonic() if start is None else float(start)
        started = _wall_start(self._start)
        self.started = started.isoformat(timespec="seconds")
        base = sanitize_name(name) if name is not None else started.strftime("%Y-%m-%d_%H-%M-%S")
        self._folder = folder = Path(folder)
        self._base = base
        self.on_fault = on_fault
        self.memory_limit = memory_limit
        self.events = 0
        self.ignored = 0
        self.write_errors = 0
        self.lost = 0
        self.fault = ""
        self.rescued: Path | None = None
        # the journal's bytes from file offset _mem_start on; _written: bytes on disk
        self._mem = bytearray()
        self._mem_start = 0
        # the bytes before _mem_start (all on disk), compressed: what a vanished disk
        # would take with it (None once let go past memory_limit: then read from disk)
        self._packer: Any = zlib.compressobj()
        self._packed: list[bytes] = []
        self._packed_size = 0
        self._written = 0
        self._closed = False
        self._file: Any = None
        self.name = base
        self.journal_path = folder / f"{base}{JOURNAL_SUFFIX}"
        self.path = folder / f"{base}.mid"
        self._open_journal()
        header = {
            "format": JOURNAL_FORMAT,
            "version": JOURNAL_VERSION,
            "started": self.started,
            "bpm": float(bpm),
            "time_signature": [num, den],
            "meta": dict(meta or {}),
            "pid": os.getpid(),
        }
        self._add(json.dumps(header, default=str, ensure_ascii=False) + "\n")
        # The header goes out at once: a journal without one is the only kind recover()
        # has to guess about.
        self._flush(time.monotonic())

    def _open_journal(self) -> bool:
        """Create the journal file; False (and a fault) when the folder cannot take it."""
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            self._file = self._create_journal(self._folder, self._base)
        except OSError as exc:
            self._failed(exc)
            return False
        self.journal_path = Path(self._file.name)
        self.name = self.journal_path.name[: -len(JOURNAL_SUFFIX)]
        self.path = self._folder / f"{self.name}.mid"
        return True

    def _create_journal(self, folder: Path, base: str) -> IO[bytes]:
        for i in range(1, 1000):
            stem = base if i == 1 else f"{base}_{i}"
            if (folder / f"{stem}.mid").exists():
                continue
            try:
                # Exclusive create: two recorders started in the same second cannot share
                # a journal.
                # Unbuffered: the recorder buffers itself and must know exactly which
                # bytes reached the file when a disk fills (FileIO.write says how many).
                f = open(  # noqa: SIM115 - the file stays open for the whole take
                    folder / f"{stem}{JOURNAL_SUFFIX}", "xb", buffering=0
                )
            except FileExistsError:
                continue
            if not try_lock(f):  # cannot happen for a file we just created; be safe
                f.close()
                continue
            return f
        raise FileExistsError(f"no free take name for {base!r} in {folder}")

    # -- recording -----------------------------------------------------------------------

    def _append(self, line: str) -> None:
        if not self._add(line):
            return
        self.events += 1
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_INTERVAL_S:
            self._flush(now)

    @property
    def memory_bytes(self) -> int:
        """Bytes of journal held in memory: the part not on disk, and the compressed
        copy of the part on disk."""
        return len(self._mem) + self._packed_size

    def _add(self, line: str) -> bool:
        data = line.encode("utf-8")
        if self.memory_bytes + len(data) > self.memory_limit:
            # let go of what is safely on disk; keep what is not
            self._pack()
            self._packer, self._packed, self._packed_size = None, [], 0
            if len(self._mem) + len(data) > self.memory_limit:
                self.lost += 1
                if self.lost == 1 or self.lost % 1000 == 0:
                    log.error(
                        "take %s: %d event(s) lost: the disk takes nothing and %d bytes "
                        "wait in memory",
                        self.name,
                        self.lost,
                        len(self._mem),
                    )
                return False
        self._mem += data
        return True

    def _failed(self, exc: OSError) -> None:
        # A full or vanished disk must not stop the music from the event loop: count it,
        # say so once per fault, keep the take in memory, try again at the next flush.
        self.write_errors += 1
        if self.fault:
            return
        self.fault = f"journal write failed: {exc.strerror or exc}; the take is kept in memory"
        log.error("take %s: %s (%s)", self.name, self.fault, exc)
        self._tell(self.fault)

    def _tell(self, message: str) -> None:
        if self.on_fault is None:
            return
        try:
            self.on_fault(message)
        except Exception:
            log.exception("take fault callback failed")

    def _flush(self, now: float) -> None:
        self._last_flush = now
        if self._file is None and not self._open_journal():
            return
        start = self._written - self._mem_start
        view = memoryview(self._mem)[start:]
        done = 0
        in_write = True
        try:
            while done < len(view):
                n = self._file.write(view[done:])
                if not n:
                    raise OSError(28, "the journal write made no progress")
                done += n
            in_write = False
            self._file.flush()
        except OSError as exc:
            # bytes write() took are in the file; after a failed flush() nothing is
            if in_write:
                self._written += done
            self._failed(exc)
            return
        finally:
            view.release()
        self._written += done
        self._pack()
        if self.fault:
            self.fault = ""
            log.warning("take %s: the journal is written again (nothing lost)", self.name)
            self._tell("")

    def _pack(self) -> None:
        """Move the bytes now on disk out of ``_mem``, into the compressed copy (a few
        kilobytes a flush: tens of microseconds)."""
        cut = self._written - self._mem_start
        if cut <= 0:
            return
        if self._packer is not None:
            chunk = self._packer.compress(bytes(memoryview(self._mem)[:cut]))
            if chunk:
                self._packed.append(chunk)
                self._packed_size += len(chunk)
        del self._mem[:cut]
        self._mem_start = self._written

    def _rel(self, t: float) -> float:
        rel = t - self._start
        # "not >=" also catches NaN, which would otherwise poison the sort.
        return rel if rel >= 0.0 else 0.0

    def note(self, t: float, track: Literal["performer", "machine"], msg: mido.Message) -> None:
        """Record a channel message (note_on/off, CC, pitchwheel…) on a track.

        Non-channel messages (clock, sysex, meta…) are ignored and counted in
        :attr:`ignored`. Cheap enough for the event loop (about 2 µs).
        """
        if self._closed or msg.type not in CHANNEL_TYPES:
            self.ignored += 1
            return
        code = TRACK_CODES.get(track)
        if code is None:
            raise ValueError(f"track must be 'performer' or 'machine', not {track!r}")
        # Hand-formatted JSON: twice as fast as json.dumps on this hot path.
        data = ",".join(map(str, msg.bytes()))
        self._append(f'[{self._rel(t):.6f},"{code}",{data}]\n')

    def tempo(self, t: float, bpm: float) -> None:
        """Record a tempo change at ``t`` (a set_tempo event in the file).

        A bpm that is not a positive number (a clock source that lost its master, say) is
        ignored and counted in :attr:`ignored` rather than raised on the event loop.
        """
        if self._closed or not valid_bpm(bpm):
            self.ignored += 1
            return
        self._append(f'[{self._rel(t):.6f},"T",{float(bpm)!r}]\n')

    def marker(self, t: float, text: str) -> None:
        """Record a marker (one per machine answer, e.g. ``answer 3: d=0.40``)."""
        if self._closed:
            self.ignored += 1
            return
        self._append(
            json.dumps([round(self._rel(t), 6), "M", str(text)], ensure_ascii=False) + "\n"
        )

    def control(self, t: float, name: str, value: float | int | str) -> None:
        """Record a control change: conductor text, and CC automation for those in
        :data:`CC_AUTOMATION`. Record every control's value at the start of a take too,
        so the file starts from the right state."""
        if self._closed:
            self.ignored += 1
            return
        if not isinstance(value, int | float | str):
            value = str(value)
        line = json.dumps([round(self._rel(t), 6), "C", str(name), value], ensure_ascii=False)
        self._append(line + "\n")

    def flush(self) -> None:
        """Hand buffered journal lines to the operating system (no fsync).

        Call it periodically (every 0.25 s or more often) from the server: appends flush
        by themselves only when events keep coming.
        """
        if not self._closed:
            self._flush(time.monotonic())

    # -- finishing -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self, t: float | None = None) -> Path:
        """End the take at ``t`` (default now), write the ``.mid`` and remove the journal.

        The end is never before the latest event. Idempotent: later calls return the
        path. Cost grows with the take (about 10 µs per event), so a long take is best
        closed off the event loop (``await asyncio.to_thread(rec.close, t)``) once the
        recorder is detached from the event path. If writing the file fails, the error
        propagates and the journal stays for :func:`recover`.
        """
        if self._closed:
            return self.path
        end = self._rel(time.monotonic() if t is None else t)
        self._closed = True
        self._add(f'[{end:.6f},"E"]\n')
        self._flush(time.monotonic())
        try:
            take = parse_journal(
                self._journal_text().splitlines(),
                recovered=False,
                started=datetime.now().astimezone(),
                name=self.journal_path.name,
            )
            try:
                write_mid(take, self.path)
            except OSError as exc:
                self._rescue(take, exc)
            if self._file is not None and sys.platform != "win32":
                # Unlink while still holding the lock, so no recover() can slip in
                # between and convert this take a second time.
                self._unlink_journal()
        finally:
            if self._file is not None:
                self._file.close()
        if self._file is not None and sys.platform == "win32":
            self._unlink_journal()
        return self.path

    def _journal_text(self) -> str:
        """The whole journal: from memory, with the part let go read back from disk."""
        head = b""
        if self._mem_start > 0 and self._packer is not None:
            # a copy of the compressor: its stream ends here, the take's may go on
            head = zlib.decompress(b"".join(self._packed) + self._packer.copy().flush())
        elif self._mem_start > 0:
            try:
                head = read_head(self.journal_path, self._mem_start)
            except OSError as exc:
                # a vanished disk took the start of a very long take with it
                log.error(
                    "take %s: the journal's first %d bytes are unreadable: %s",
                    self.name,
                    self._mem_start,
                    exc,
                )
        return (head + bytes(self._mem)).decode("utf-8", errors="replace")

    def _rescue(self, take: Any, exc: OSError) -> None:
        """The sessions folder cannot take the ``.mid``: the first rescue folder that can."""
        errors = [f"{self.path.parent}: {exc.strerror or exc}"]
        for folder in rescue_dirs():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / self.path.name
                for i in range(2, 1000):
                    if not path.exists():
                        break
                    path = folder / f"{self.name}_{i}.mid"
                write_mid(take, path)
            except OSError as e:
                errors.append(f"{folder}: {e.strerror or e}")
                continue
            log.error("take %s: written to the rescue folder %s (%s)", self.name, path, errors[0])
            self.rescued = self.path = path
            self._tell(f"take written to the rescue folder: {path}")
            return
        raise OSError(exc.errno, f"take {self.name} could not be written: {'; '.join(errors)}")

    def _unlink_journal(self) -> None:
        try:
            self.journal_path.unlink()
        except OSError as exc:
            # the take is written (in the sessions or the rescue folder): a journal left
            # here would be recovered as a duplicate, so say so loudly
            log.error(
                "take %s: could not remove its journal %s: %s", self.name, self.journal_path, exc
            )

    def __enter__(self) -> TakeRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        return f"<TakeRecorder {self.name!r} {state}, {self.events} events>"
