"""``divergent bench soak`` (issue 12), short: a real JACK server of its own, a real
``divergent serve`` process recording, a scripted performer in another process (JACK
MIDI and OSC) switching modes and a concept and sweeping the knob. The hard invariants
are checked here (nothing stuck, no input event dropped, answers, every performer note
in the take); the timing tails are the bench's output, not a pass/fail matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divergent.cli import build_parser, main
from divergent.server.bench_soak import _Measured, run_bench_soak, summarize, window_lengths
from tests.conftest import JACK_PERIOD_FRAMES, require_tool
from tests.server.test_concepts_app import learn_tiny

ROW_KEYS = {
    "window",
    "t_s",
    "seconds",
    "rss_mb",
    "rss_anon_mb",
    "loop_lag_p99_ms",
    "onset_error_p99_ms",
    "answers",
    "stuck_notes",
    "dropped_events",
    "events_sent",
    "input_queue_dropped",
    "xruns",
    "concept_switches",
    "concepts_applied",
    "knob_moves",
}
SUMMARY_KEYS = {
    "rss_growth_mb",
    "rss_anon_growth_mb",
    "loop_lag_p99_ratio_last_vs_first",
    "onset_error_p99_ratio_last_vs_first",
    "stuck_notes",
    "dropped_events",
    "answers",
    "within_targets",
}


def test_short_soak_end_to_end(tmp_path: Path) -> None:
    require_tool("jackd", "jack_lsp")
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    learn_tiny(concepts, "riff")
    # three 12-s windows, each call then jam, at twice the period of the tests' JACK
    # server (1,024 frames; see tests/conftest.py). JACK drops the MIDI of a cycle it
    # misses, and under host steal a CI run at 512 frames logged 70 xruns and lost one
    # performer note in them: the machine's loss, not the server's. This test checks the
    # server's invariants; the bench's own runs report the timing at shorter periods.
    period = 2 * JACK_PERIOD_FRAMES
    res = run_bench_soak(
        minutes=0.6, window_s=12, jack_period=period, concepts=concepts, warm_prefills=4
    )
    json.dumps(res, allow_nan=False)  # valid JSON: what cannot be measured is null
    rows, summary = res["per_minute"], res["summary"]
    assert res["minutes"] == 0.6 and len(rows) == 3, res
    assert all(set(r) >= ROW_KEYS for r in rows), rows[0]
    assert set(summary) >= SUMMARY_KEYS, summary
    assert res["cpu"] and res["jack"]["period"] == period
    xruns = f"(jackd logged {res['jack']['xruns']} xruns)"
    assert summary["stuck_notes"] == 0 and all(r["stuck_notes"] == 0 for r in rows), xruns
    assert summary["dropped_events"] == 0, (rows, xruns)
    assert all(r["dropped_events"] == 0 and r["input_queue_dropped"] == 0 for r in rows)
    assert summary["answers"] > 0 and all(r["answers"] > 0 for r in rows), rows
    assert all(0 < r["rss_anon_mb"] < r["rss_mb"] and r["onsets"] > 0 for r in rows), rows
    assert all(r["events_sent"] > 0 and r["knob_moves"] > 0 for r in rows), rows
    # call then jam in every window, a concept switch at each: riff, none, riff, ...
    assert res["concepts"] == ["riff"]
    assert sum(r["modes"] for r in rows) == 6 and sum(r["concept_switches"] for r in rows) == 6
    assert sum(r["concepts_applied"] for r in rows) > 0, res["errors"]
    assert res["errors"] == [], res["errors"]
    # recording was on: every performer note is in the take
    assert res["take"]["takes"] >= 1
    assert res["take"]["performer_notes"] == res["heard"]["performer_note_ons_sent"], res
    # ... and every machine note the performer heard, up to the end (none heard unrecorded)
    assert 0 < res["heard"]["machine_note_ons"] <= res["take"]["machine_notes"], res
    assert res["exit_code"] == 0
    # the server ran with the option given (serve refuses an option it does not know)
    assert res["serve_args"][-2:] == ["--warm-prefills", "4"]


def test_windows_and_summary() -> None:
    assert window_lengths(45, 15) == [15, 15, 15]
    assert window_lengths(50, 15) == [15, 15, 15, 5]
    assert window_lengths(30, 60) == [30]
    with pytest.raises(ValueError):
        window_lengths(0, 60)

    def window(rss: float, lag: float, onset: float, **extra: int) -> _Measured:
        row = {"rss_mb": rss, "rss_anon_mb": rss / 2, "answers": 5, "dropped_events": 0}
        row |= {"xruns": 0, **extra}
        return _Measured(row, [onset] * 50, [lag] * 6)

    # 60 one-minute windows: the first and last ten compared
    soak = [window(200 + i * 0.05, 1.0 + (i >= 50) * 0.1, 2.0) for i in range(60)]
    s = summarize(soak, minutes=60, window_s=60, stuck=0)
    assert s["windows_compared"] == 10 and s["answers"] == 300
    assert s["rss_growth_mb"] == pytest.approx(2.95)
    assert s["rss_anon_growth_mb"] == pytest.approx(1.475, abs=0.01)  # rounded to 0.01
    assert s["loop_lag_p99_ratio_last_vs_first"] == pytest.approx(1.1)
    assert s["onset_error_p99_ratio_last_vs_first"] == pytest.approx(1.0)
    assert all(s["within_targets"].values())
    # a short soak: a third of it at each end; a leak and a stuck note miss the targets
    short = [window(200 + i * 10, 1.0, 2.0 + i) for i in range(3)]
    s = summarize(short, minutes=3, window_s=60, stuck=1)
    assert s["windows_compared"] == 1
    assert s["onset_error_p99_ratio_last_vs_first"] == pytest.approx(2.0)
    assert s["within_targets"] == {
        "rss_growth": False,
        "loop_lag": True,
        "onset_error": False,
        "stuck_notes": False,
        "dropped_events": True,
    }


def test_cli_soak_arguments() -> None:
    args = build_parser().parse_args(["bench", "soak", "--minutes", "0.5", "--json"])
    assert args.minutes == 0.5 and args.window_seconds == 60 and args.jack_period == 64
    assert args.func.__name__ == "_cmd_bench_soak"
    assert main(["bench", "soak", "--minutes", "0"]) == 2  # refused before anything starts
    args = build_parser().parse_args(["bench", "soak", "--minutes", "1", "--warm-prefills", "48"])
    assert args.warm_prefills == 48
    assert main(["bench", "soak", "--minutes", "1", "--warm-prefills", "-1"]) == 2
