"""``divergent bench live``: the live path measured with real peers in other processes.

- response: phrase end detected by the server → first machine note-on received by a
  separate peer process through JACK (``--quantize off``);
- onset error: when each machine note-on reached the peer vs when the server scheduled
  it, both on CLOCK_MONOTONIC (the clock JACK's own timestamps use on Linux);
- flood: 2,000 MIDI input events/s for 10 s from the peer; the server's count of events
  received and its event-loop lag p99 (asked over OSC);
- cold start: process spawn → first ``/divergent/pong``; RSS of the server process.

Starts its own JACK dummy server (64 frames at 48 kHz) when none runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridges.jack import JackServer
from server.livepeer import ServeProcess

__all__ = ["onset_errors", "response_times", "run_bench_live", "run_peer_process"]


def _pct(xs: list[float], q: int) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def run_peer_process(args: list[str], *, timeout: float) -> dict[str, Any]:
    """Run the MIDI peer (``python -m server.livepeer``) and parse its JSON result."""
    r = subprocess.run(
        [sys.executable, "-m", "server.livepeer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if r.returncode != 0:
        raise RuntimeError(f"peer failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def response_times(trace: list[dict[str, Any]], received: list[list[float]]) -> list[float]:
    """Per phrase end in the trace: ms until the next note-on the peer received."""
    ends = [e["t"] for e in trace if e["event"] == "phrase_end"]
    ons = sorted(r[0] for r in received if (int(r[1]) & 0xF0) == 0x90 and r[3] > 0)
    out = []
    for i, t in enumerate(ends):
        nxt = ends[i + 1] if i + 1 < len(ends) else float("inf")
        first = next((x for x in ons if t <= x < nxt), None)
        if first is not None:
            out.append((first - t) * 1000)
    return out


def onset_errors(trace: list[dict[str, Any]], received: list[list[float]]) -> list[float]:
    """|arrival at the peer − scheduled time| in ms, for every machine note-on."""
    sched = sorted(
        (e["scheduled"], e["note"])
        for e in trace
        if e["event"] == "sent" and e["type"] == "note_on"
    )
    arrivals = sorted(
        (r[0], int(r[2])) for r in received if (int(r[1]) & 0xF0) == 0x90 and r[3] > 0
    )
    errs = []
    j = 0
    for t_arr, note in arrivals:
        # the matching scheduled note-on: same pitch, nearest in time (within 50 ms)
        best = None
        for k in range(max(0, j - 8), len(sched)):
            ts, n = sched[k]
            if ts > t_arr + 0.05:
                break
            if n == note and abs(t_arr - ts) < 0.05 and (best is None or abs(t_arr - ts) < best):
                best = abs(t_arr - ts)
                j = k
        if best is not None:
            errs.append(best * 1000)
    return errs


def run_bench_live(
    *, answers: int = 30, flood_s: float = 10.0, rate: float = 2000.0
) -> dict[str, Any]:
    """Run every live measurement once; the JSON shape the issue asks for, plus detail."""
    with JackServer(rate=48000, period=64) as jack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = f"divbench{int(time.time()) % 100000}"
        serve = ServeProcess(
            [
                "--midi-backend", "jack",
                "--mode", "call",
                "--quantize", "off",
                "--bpm", "240",
                "--bars", "1",
                "--phrase-silence", "0.25",
            ],
            workdir=work,
            name=client,
        )
        serve.start()
        try:
            rss_start = serve.rss_mb()
            peer = run_peer_process(
                ["phrases", "--server", client, "--phrases", str(answers)],
                timeout=answers * 6 + 30,
            )
            time.sleep(0.3)  # let the trace's last lines reach the file
            trace = serve.trace_events()
            resp = response_times(trace, peer["received"])
            errs = onset_errors(trace, peer["received"])
            # flood: mode off so only the input path is measured
            serve.osc.send("/divergent/mode", "off")
            t = time.monotonic()
            serve.osc.send("/divergent/stats")
            before = serve.osc.wait_for("/divergent/stats", after=t)
            flood = run_peer_process(
                ["flood", "--server", client, "--rate", str(rate), "--seconds", str(flood_s)],
                timeout=flood_s + 30,
            )
            time.sleep(0.3)
            t = time.monotonic()
            serve.osc.send("/divergent/stats")
            after = serve.osc.wait_for("/divergent/stats", after=t)
            received = (after[2][0] - before[2][0]) if after and before else -1
            lag_p99 = float(after[2][2]) if after else float("nan")
            rss = max(rss_start, serve.rss_mb())
            rss_shm = serve.rss_mb("RssShmem")
        finally:
            rc = serve.stop()
        return {
            "response_ms": {"p50": _pct(resp, 50), "p99": _pct(resp, 99), "n": len(resp)},
            "onset_error_ms": {"p50": _pct(errs, 50), "p99": _pct(errs, 99), "n": len(errs)},
            "flood": {
                "sent": flood["sent"],
                "received": received,
                "loop_lag_ms_p99": lag_p99,
                "seconds": flood["seconds"],
                "peer_max_behind_ms": flood["max_behind_ms"],
            },
            "cold_start_s": serve.cold_start_s,
            "rss_mb": rss,
            "rss_jack_shared_mb": rss_shm,
            "stuck_notes": len(peer["stuck"]),
            "jack_xruns": jack.xruns(),
            "exit_code": rc,
        }
