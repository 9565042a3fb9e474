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
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from divergent.bridges.exceptions import BridgeError

__all__ = ["JackServer", "jack_period_s", "jack_running"]

log = logging.getLogger(__name__)


def jack_running(timeout: float = 2.0) -> bool:
    """Whether a JACK server answers (``jack_lsp`` exits 0)."""
    if shutil.which("jack_lsp") is None:
        return False
    try:
        r = subprocess.run(
            ["jack_lsp"], capture_output=True, timeout=timeout, check=False, env=_env()
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


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    # never let a client auto-start a server with the wrong driver behind our back
    env["JACK_NO_START_SERVER"] = "1"
    return env


class JackServer:
    """``jackd -d dummy`` as a context manager; a no-op when a server already runs.

    ``period`` frames at ``rate`` Hz: 64 at 48 kHz is a 1.33 ms period (JACK delivers
    MIDI once per period, so this is the timing floor).
    """

    def __init__(
        self,
        *,
        rate: int = 48000,
        period: int = 64,
        port_max: int = 256,
        ready_timeout: float = 5.0,
    ) -> None:
        self.rate = rate
        self.port_max = port_max
        self.period = period
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.started = False

    def start(self) -> JackServer:
        if jack_running():
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
            "--port-max",
            str(self.port_max),
            "-d",
            "dummy",
            "-r",
            str(self.rate),
            "-p",
            str(self.period),
        ]
        # jackd logs every xrun: to a file, never a pipe nobody drains (a full pipe
        # would block jackd itself, and every JACK client with it)
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="jackd-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = Path(self.log.name).read_text(errors="replace")
                self.stop()
                raise BridgeError(f"jackd exited at start: {err.strip()[-300:]}")
            if jack_running():
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
