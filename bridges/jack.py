"""A JACK server for machines without a sound card: the dummy driver, started and stopped.

``divergent bench live`` and the tests use it; so can a performer on a headless box.
Real-time MIDI between processes on Linux goes through JACK here, because ALSA needs a
sound card (``/dev/snd``) that these machines do not have.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from divergent.bridges.exceptions import BridgeError

__all__ = ["JackServer", "XrunWatch", "jack_period_s", "jack_running"]

log = logging.getLogger(__name__)


def jack_running(timeout: float = 2.0, *, server: str | None = None) -> bool:
    """Whether a JACK server answers (``jack_lsp`` exits 0); ``server`` names a server
    other than the default (``jackd -n NAME``; else ``$JACK_DEFAULT_SERVER``)."""
    if shutil.which("jack_lsp") is None:
        return False
    try:
        r = subprocess.run(
            ["jack_lsp"], capture_output=True, timeout=timeout, check=False, env=_env(server)
        )
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def jack_period_s(timeout: float = 2.0) -> float | None:
    """The running JACK server's period in seconds (frames / rate), or None if unknown.

    JACK delivers MIDI once per period, so output timing is quantised to it; the sender
    sends half a period early to centre that error on zero.
    """
    try:
        frames = subprocess.run(
            ["jack_bufsize"], capture_output=True, text=True, timeout=timeout, env=_env()
        )
        rate = subprocess.run(
            ["jack_samplerate"], capture_output=True, text=True, timeout=timeout, env=_env()
        )
        return int(frames.stdout.split()[0]) / int(rate.stdout.split()[0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, ZeroDivisionError):
        return None


def _env(server: str | None = None) -> dict[str, str]:
    import os

    env = dict(os.environ)
    # never let a client auto-start a server with the wrong driver behind our back
    env["JACK_NO_START_SERVER"] = "1"
    if server is not None:
        # libjack's clients (jack_lsp, rtmidi, JACK-Client) pick the server by this name
        env["JACK_DEFAULT_SERVER"] = server
    return env


class JackServer:
    """``jackd -d dummy`` as a context manager; a no-op when a server already runs.

    ``period`` frames at ``rate`` Hz: 64 at 48 kHz is a 1.33 ms period (JACK delivers
    MIDI once per period, so this is the timing floor). ``name`` runs a named server
    (``jackd -n NAME``) beside the default one; its clients need ``JACK_DEFAULT_SERVER``
    set to the name (:meth:`env` gives such an environment). A named server is always
    started by us, never borrowed, so a test may kill and restart it (:meth:`kill`).
    """

    def __init__(
        self,
        *,
        rate: int = 48000,
        period: int = 64,
        port_max: int = 256,
        ready_timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.name = name
        self.rate = rate
        self.port_max = port_max
        self.period = period
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.started = False

    def env(self) -> dict[str, str]:
        """An environment whose JACK clients talk to this server (and never start one)."""
        return _env(self.name)

    def start(self) -> JackServer:
        if self.name is None and jack_running():
            log.info("using the running JACK server")
            return self
        jackd = shutil.which("jackd")
        if jackd is None:
            raise BridgeError(
                "jackd not found: install JACK (Debian: apt-get install jackd2) "
                "or use the OSC note transport"
            )
        # --port-max: each client maps the engine's port table; JACK's default of 2048
        # ports costs every client ~100 MB of (shared) resident memory
        cmd = [
            jackd,
            *(["-n", self.name] if self.name is not None else []),
            "--port-max",
            str(self.port_max),
            "-d",
            "dummy",
            "-r",
            str(self.rate),
            "-p",
            str(self.period),
        ]
        self._close_log()  # a restart after kill(): a fresh log
        # jackd logs every xrun: to a file, never a pipe nobody drains (a full pipe
        # would block jackd itself, and every JACK client with it)
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="jackd-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env(self.name)
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = Path(self.log.name).read_text(errors="replace")
                self.stop()
                raise BridgeError(f"jackd exited at start: {err.strip()[-300:]}")
            if jack_running(server=self.name):
                self.started = True
                log.info("started jackd (dummy driver, %d frames at %d Hz)", self.period, self.rate)
                return self
            time.sleep(0.05)
        self.stop()
        raise BridgeError(f"jackd did not become ready in {self.ready_timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            self._close_log()
            return
        self.proc.terminate()
        try:
            # wait for the PID to exit, or the next server fails with "already active"
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None
        self._close_log()
        self.started = False

    def kill(self) -> None:
        """Kill jackd at once (SIGKILL, as a crash would) and wait for its PID to exit."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=5)
        self.proc = None
        self.started = False

    def _close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)
            self.log = None

    def xruns(self) -> int:
        """xruns jackd reported so far (0 for a server we did not start)."""
        if self.log is None:
            return 0
        return Path(self.log.name).read_text(errors="replace").count("XRun")

    def __enter__(self) -> JackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class XrunWatch:
    """Calls ``on_xrun`` whenever the JACK server reports an xrun (a cycle some client
    missed, whose MIDI events JACK dropped or delayed).

    A JACK client of its own with no ports, through JACK-Client (the maintained Python
    binding of libjack). JACK calls the xrun callback on its notification thread, not the
    real-time one; ``on_xrun`` is handed on to a small thread of ours, so a slow or failing
    handler never holds up JACK. ``open`` raises :class:`BridgeError` when libjack or the
    server is missing; the server then runs without the watch (and says so).
    """

    def __init__(self, *, client_name: str, on_xrun: Callable[[], object]) -> None:
        self.client_name = client_name
        self.on_xrun = on_xrun
        self.xruns = 0
        self.handler_errors = 0
        # set by JACK when the server goes away (stopped, crashed): the client is dead
        self.server_gone = threading.Event()
        self.gone_reason = ""
        self._client: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> XrunWatch:
        """Register the client and start listening (idempotent)."""
        if self._client is not None:
            return self
        try:
            import jack  # JACK-Client: cffi over libjack, loaded only here
        except (ImportError, OSError) as e:
            raise BridgeError(f"no JACK library for the xrun watch: {e}") from e
        try:
            client = jack.Client(self.client_name, no_start_server=True)
        except jack.JackError as e:
            raise BridgeError(f"JACK server not reachable for the xrun watch: {e}") from e
        client.set_xrun_callback(self._on_jack_xrun)
        client.set_shutdown_callback(self._on_jack_shutdown)
        # No callback JACK waits for (client or port registration): it would need the
        # GIL, which python-rtmidi holds through its own calls to the server (port
        # close, open) while that server waits for the callback: a deadlock (seen).
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="divergent-xruns", daemon=True)
        self._thread.start()
        client.activate()
        self._client = client
        return self

    def close(self) -> None:
        """Unregister the client and stop the handler thread (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.deactivate()
                client.close()
            except Exception as e:  # a JACK server already gone: nothing left to close
                log.debug("closing the xrun watch: %r", e)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def connect(self, source: str, destination: str, *, on: bool = True) -> None:
        """Connect (``on``) or disconnect two ports of any clients, by their full names."""
        client = self._client
        if client is None:
            raise BridgeError("the xrun watch is not open")
        try:
            if on:
                client.connect(source, destination)
            else:
                client.disconnect(source, destination)
        except Exception as e:  # JACK-Client raises JackError and JackErrorCode
            raise BridgeError(f"cannot (dis)connect {source!r} -> {destination!r}: {e}") from e

    def __enter__(self) -> XrunWatch:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _on_jack_xrun(self, delayed_usecs: float) -> None:
        # JACK's notification thread: count and wake ours, nothing else
        self.xruns += 1
        self._wake.set()

    def _on_jack_shutdown(self, status: Any, reason: str) -> None:
        # libjack's thread, after the server went away: no JACK calls here, only the flag
        # the MIDI watchdog polls
        self.gone_reason = str(reason)
        self.server_gone.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            # Several xruns close together make one call: the handler re-sends a window.
            try:
                self.on_xrun()
            except Exception:
                self.handler_errors += 1
                log.exception("xrun handler failed")
