"""max_patches/divergent.pd: checked as a file, then run in a real headless Pd against a
real ``divergent serve`` over real UDP.

The live test drives the patch the way a script would (``-send`` at start and the patch's
FUDI control port afterwards), so every message really passes through the patch's GUIs,
its ``[oscformat]`` boxes and ``[netsend]``; the server's replies are read back from the
lines the patch prints on Pd's stderr.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mido
import pytest

from divergent.export.pdpatch import build_divergent_pd
from divergent.server.livepeer import OscClient, free_udp_port
from tests.conftest import require_tool
from tests.max_patches.pdread import (
    VANILLA_CLASSES,
    PdObject,
    osc_usage,
    parse_pd,
    parse_pd_text,
)
from tests.server.test_concepts_app import learn_tiny

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "max_patches" / "divergent.pd"
OSC_DOC = ROOT / "docs" / "osc.md"
README = ROOT / "max_patches" / "README.md"


# ----------------------------------------------------------------------------- the file


def test_committed_patch_is_what_the_writer_builds() -> None:
    assert PATCH.read_text(encoding="utf-8") == build_divergent_pd(), (
        "max_patches/divergent.pd differs from export/pdpatch.py:"
        " run python -m divergent.export.pdpatch"
    )


def test_patch_is_well_formed() -> None:
    text = PATCH.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("#N canvas ")
    # the writer puts one record per line: each must end its record
    assert all(line.endswith(";") for line in lines), [ln for ln in lines if not ln.endswith(";")]
    objects, wires = parse_pd(PATCH)  # raises on a wire to a missing box
    assert len(objects) > 100 and len(wires) > 100
    boxes = {(o.canvas, o.index): o for o in objects}
    for w in wires:
        for end, port, is_out in ((w.src, w.outlet, True), (w.dst, w.inlet, False)):
            o = boxes[(w.canvas, end)]
            io = _io(o)
            if io is not None:
                n, what = (io[1], "outlets") if is_out else (io[0], "inlets")
                assert port < n, f"[{o.cls} {' '.join(o.args)}] has {n} {what}: {w}"


def _io(o: PdObject) -> tuple[int, int] | None:
    """(inlets, outlets) of the classes the patch wires, from Pd's own objects."""
    n = len(o.args)
    fixed = {
        "loadbang": (1, 1), "oscparse": (1, 1), "oscformat": (1, 1), "print": (1, 0),
        "symbol": (2, 1), "change": (1, 1), "delay": (2, 1), "spigot": (2, 1),
        "notein": (1, 3), "noteout": (3, 0), "-": (2, 1), "+": (2, 1), "mod": (2, 1),
        "msg": (1, 1), "floatatom": (1, 1), "symbolatom": (1, 1), "netsend": (1, 2),
        "netreceive": (1, 1), "r": (0, 1), "s": (1 if n else 2, 0), "send": (2 - bool(n), 0),
        "pd": (0, 0), "hsl": (1, 1), "nbx": (1, 1), "hradio": (1, 1), "tgl": (1, 1),
        "bng": (1, 1),
    }  # fmt: skip
    if o.kind == "msg":
        return fixed["msg"]
    if o.kind in ("floatatom", "symbolatom"):
        return fixed[o.kind]
    if o.cls in ("t", "trigger", "unpack"):
        return 1, n
    if o.cls == "pack":
        return n, 1
    if o.cls in ("route", "sel", "select"):
        return (2 if n == 1 else 1), n + 1
    if o.cls == "list":
        sub = o.args[0] if o.args else "append"
        if sub == "split":
            return 2, 3
        if sub == "trim":
            return 1, 1
        return 2, 1
    return fixed.get(o.cls)


def test_patch_uses_vanilla_classes_only() -> None:
    objects, _ = parse_pd(PATCH)
    classes = {o.cls for o in objects if o.kind == "obj"}
    assert classes <= VANILLA_CLASSES, classes - VANILLA_CLASSES


def _doc_tables() -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    """docs/osc.md: each control's (type, required) arguments, and the reply addresses."""
    controls: dict[str, list[tuple[str, bool]]] = {}
    replies: set[str] = set()
    section = ""
    for line in OSC_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line
        m = re.match(r"\| `(/divergent/[^`]+)` \| (.*?) \|", line)
        if not m:
            continue
        if "Controls" in section:
            args = []
            for part in m.group(2).split("<br>"):
                t = re.search(r"`\w+` ([ifs])\b", part)
                if t:
                    args.append((t.group(1), not part.strip().startswith("[")))
            controls[m.group(1)] = args
        elif "Replies" in section:
            replies.add(m.group(1))
    assert controls and replies, "docs/osc.md tables not found"
    return controls, replies


def test_every_osc_address_is_documented_with_its_types() -> None:
    controls, replies = _doc_tables()
    sent, routed = osc_usage(PATCH)
    for address, kinds in sent:
        assert address in controls, f"the patch sends {address}, not in docs/osc.md"
        doc = controls[address]
        required = sum(1 for _, req in doc if req)
        assert required <= len(kinds) <= len(doc), (address, kinds, doc)
        assert kinds == "".join(t for t, _ in doc[: len(kinds)]), (address, kinds, doc)
    assert set(routed) <= replies, set(routed) - replies
    # what the surface is for: every control, and the replies it shows
    assert {a for a, _ in sent} >= {
        f"/divergent/{n}" for n in ("divergence", "temperature", "bars", "mode", "quantize",
                                    "tempo", "clock", "generate", "stop", "record/start",
                                    "record/stop", "note", "status")
    }  # fmt: skip
    assert set(routed) >= {"/divergent/status", "/divergent/answer", "/divergent/error",
                           "/divergent/out/note"}  # fmt: skip


def _names(objects: list[PdObject]) -> tuple[set[str], set[str]]:
    """Send and receive names: [s]/[r] boxes, and the names stored in GUIs and atoms."""
    # the index of (send, receive) among each GUI's stored arguments
    gui = {"hsl": (6, 7), "nbx": (6, 7), "hradio": (4, 5), "tgl": (2, 3), "bng": (4, 5)}
    sends: set[str] = set()
    recvs: set[str] = set()
    for o in objects:
        if o.cls in ("s", "send") and o.args:
            sends.add(o.args[0])
        elif o.cls in ("r", "receive") and o.args:
            recvs.add(o.args[0])
        elif o.cls in gui:
            snd, rcv = gui[o.cls]
            sends.add(o.args[snd])
            recvs.add(o.args[rcv])
        elif o.kind in ("floatatom", "symbolatom"):
            recvs.add(o.args[5])
            sends.add(o.args[6])
    return sends - {"empty", "-"}, recvs - {"empty", "-"}


def test_local_names_pair_up_and_public_receivers_are_documented() -> None:
    objects, _ = parse_pd(PATCH)
    sends, recvs = _names(objects)
    local_s = {n for n in sends if n.startswith("$0-")}
    local_r = {n for n in recvs if n.startswith("$0-")}
    assert local_s == local_r, local_s ^ local_r  # a typo'd name would be a dead end
    public = sorted(n for n in recvs if not n.startswith("$0-"))
    assert all(n.startswith("divergent-") for n in public), public
    assert "divergent-divergence" in public and "divergent-control" in public
    readme = README.read_text(encoding="utf-8")
    section = readme[readme.index("## divergent.pd (Pure Data)") :]
    missing = [n for n in public if n not in section]
    assert not missing, f"receivers not described in max_patches/README.md: {missing}"


def test_parser_handles_subpatches_escapes_and_bad_wires() -> None:
    text = (
        "#N canvas 0 0 400 300 12;\n"
        "#X msg 10 10 \\; foo 1 \\, bar \\$1;\n"
        "#N canvas 0 0 200 200 inner 0;\n"
        "#X obj 10 10 route a b, f 20;\n"
        "#X obj 10 40 print x;\n"
        "#X connect 0 1 1 0;\n"
        "#X restore 10 50 pd inner;\n"
        "#X obj 10 90 oscformat -f if x y;\n"
        "#X connect 0 0 2 0;\n"
    )
    objects, wires = parse_pd_text(text)
    assert [(o.canvas, o.index, o.cls) for o in objects] == [
        (0, 0, "msg"), (1, 0, "route"), (1, 1, "print"), (0, 1, "pd"), (0, 2, "oscformat"),
    ]  # fmt: skip
    assert objects[0].args == ("\\;", "foo", "1", "\\,", "bar", "$1")
    assert objects[1].args == ("a", "b")  # the ", f 20" width is not an argument
    assert [(w.canvas, w.src, w.dst) for w in wires] == [(1, 0, 1), (0, 0, 2)]
    with pytest.raises(ValueError, match="missing box"):
        parse_pd_text("#N canvas 0 0 1 1 12;\n#X obj 0 0 f;\n#X connect 0 0 1 0;\n")
    with pytest.raises(ValueError, match="after the last"):
        parse_pd_text("#N canvas 0 0 1 1 12;\n#X obj 0 0 f\n")
    with pytest.raises(ValueError, match="starts with"):
        parse_pd_text("#X obj 0 0 f;\n")


def test_osc_usage_follows_route_chains(tmp_path: Path) -> None:
    p = tmp_path / "t.pd"
    p.write_text(
        "#N canvas 0 0 400 300 12;\n"
        "#X obj 0 0 netreceive -u -b 9001;\n#X obj 0 0 oscparse;\n#X obj 0 0 list trim;\n"
        "#X obj 0 0 route app;\n#X obj 0 0 route st out;\n#X obj 0 0 print st;\n"
        "#X obj 0 0 route note;\n#X obj 0 0 print n;\n#X obj 0 0 print other;\n"
        "#X obj 0 0 oscformat -f ii app note;\n#X obj 0 0 oscformat app go;\n"
        "#X connect 0 0 1 0;\n#X connect 1 0 2 0;\n#X connect 2 0 3 0;\n#X connect 3 0 4 0;\n"
        "#X connect 4 0 5 0;\n#X connect 4 1 6 0;\n#X connect 6 0 7 0;\n#X connect 4 2 8 0;\n"
    )
    sent, routed = osc_usage(p)
    assert sent == [("/app/note", "ii"), ("/app/go", "")]
    assert routed == ["/app/st", "/app/out/note"]  # the reject outlet is no address


# ----------------------------------------------------------------------- real Pd, real server


class PdProcess:
    """A headless Pd running the patch; collects its stderr lines with arrival times."""

    def __init__(self, patch: Path, sends: list[str]) -> None:
        args = ["pd", "-nrt", "-nogui", "-noaudio", "-nomidi", "-stderr", "-sleepgrain", "0.5",
                "-open", str(patch)]  # fmt: skip
        for s in sends:
            args += ["-send", s]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def printed(self, name: str, after: float = 0.0) -> list[str]:
        """The texts of ``[print name]`` lines that arrived after ``after``."""
        prefix = name + ": "
        with self._lock:
            lines = [ln for t, ln in self.lines if t >= after and ln.startswith(prefix)]
        return [ln[len(prefix) :] for ln in lines]

    def wait_printed(
        self, name: str, *, after: float = 0.0, timeout: float = 5.0, where: Any = None
    ) -> str | None:
        """The first ``name:`` line after ``after`` (for which ``where(text)`` holds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for text in self.printed(name, after):
                if where is None or where(text):
                    return text
            if self.proc.poll() is not None:
                return None
            time.sleep(0.01)
        return None

    def output(self) -> str:
        with self._lock:
            return "\n".join(ln for _, ln in self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=2)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _status(text: str) -> dict[str, Any]:
    """A printed heartbeat ``call 120 internal 0.8 1 1 4 off 0 none 1.5`` as a dict (the
    concept and its strength, appended last, are missing from an older server's)."""
    v = text.split()
    keys = ("mode", "tempo", "clock", "divergence", "recording", "temperature", "bars",
            "quantize", "answers", "concept", "concept_strength")  # fmt: skip
    assert len(keys) - 2 <= len(v) <= len(keys), text
    text_keys = ("mode", "clock", "quantize", "concept")
    return {k: (x if k in text_keys else float(x)) for k, x in zip(keys, v, strict=False)}


def _matches(**want: Any) -> Any:
    def ok(text: str) -> bool:
        st = _status(text)
        return all(
            st[k] == pytest.approx(v, abs=1e-4) if isinstance(v, float) else st[k] == v
            for k, v in want.items()
        )

    return ok


@dataclass
class Live:
    """What the live test gets: Pd, a sender to its control port, and the server."""

    pd: PdProcess
    send: Callable[[str], None]
    server: subprocess.Popen[bytes]
    tmp_path: Path
    serve_log: Callable[[], str]


@pytest.fixture
def live(tmp_path: Path, jack_server: Any) -> Iterator[Live]:
    """A real server replying to Pd's port, and a headless Pd running the patch."""
    with _live(tmp_path) as lv:
        yield lv


@contextlib.contextmanager
def _live(tmp_path: Path, *extra: str) -> Iterator[Live]:
    """:func:`live` with ``extra`` arguments for ``divergent serve``."""
    require_tool("pd")
    osc_port, pd_port, control_port = _free_ports(3)
    name = f"dvpd{os.getpid() % 10000}x{random.randrange(10**6)}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "divergent", "serve", "--mode", "off", "--midi-backend", "jack",
         "--midi-client", name, "--osc-port", str(osc_port),
         "--osc-reply", f"127.0.0.1:{pd_port}", "--sessions", str(tmp_path / "sessions"),
         "--bpm", "240", "--bars", "1", "--quantize", "off", "--seed", "7", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    pd: PdProcess | None = None
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def serve_log() -> str:
        return (tmp_path / "serve.log").read_text(errors="replace")

    try:
        # Readiness: hold Pd's port ourselves until the server answers a ping there, then
        # hand the port to Pd (the server has one fixed reply address).
        probe = OscClient(osc_port, reply_port=pd_port)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert server.poll() is None, serve_log()
                t = time.monotonic()
                probe.send("/divergent/ping")
                if probe.wait_for("/divergent/pong", after=t, timeout=0.05):
                    break
            else:
                pytest.fail(f"server not ready:\n{serve_log()}")
        finally:
            probe.close()
        pd = PdProcess(
            PATCH,
            [f"divergent-listen {pd_port}", f"divergent-connect 127.0.0.1 {osc_port}",
             f"divergent-control {control_port}", "divergent-divergence 0.8"],
        )  # fmt: skip

        def send(message: str) -> None:
            # FUDI over UDP: one message per packet, ending in a newline (Pd drops the rest)
            ctl.sendto(f"{message};\n".encode(), ("127.0.0.1", control_port))

        yield Live(pd, send, server, tmp_path, serve_log)
    finally:
        ctl.close()
        if pd is not None:
            pd.stop()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _pd_errors(output: str) -> list[str]:
    """Pd's own complaints (not the server's errors, which the patch prints as
    ``divergent-error: ...``): failed creations, missing methods, bad wires."""
    return [
        ln for ln in output.splitlines()
        if ln.lower().startswith(("error:", "warning:")) or "couldn't create" in ln
        or "connection failed" in ln or "no method" in ln or "can't" in ln
    ]  # fmt: skip


def _free_ports(n: int) -> list[int]:
    """n distinct free UDP ports (the OS could hand out one twice in a row)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_udp_port()
        if p not in ports:
            ports.append(p)
    return ports


def _play(send: Callable[[str], None], pitches: list[int], hold: float) -> None:
    """Notes through the patch's ``divergent-note`` receiver, as a script would play."""
    for p in pitches:
        send(f"divergent-note {p} 90 1")
        time.sleep(hold)
        send(f"divergent-note {p} 0 1")
        time.sleep(0.02)


def test_defaults_connect_listen_and_ask_for_status_at_load(tmp_path: Path) -> None:
    """Opened with no arguments the patch uses its defaults: a copy with 9000/9001 swapped
    for free ports, so the test never depends on (or disturbs) the real default ports."""
    require_tool("pd")
    from pythonosc.osc_message import OscMessage
    from pythonosc.osc_message_builder import OscMessageBuilder

    server_port, reply_port = _free_ports(2)
    text = PATCH.read_text(encoding="utf-8")
    text = re.sub(r"\b9001\b", str(reply_port), re.sub(r"\b9000\b", str(server_port), text))
    patch = tmp_path / "divergent.pd"
    patch.write_text(text, encoding="utf-8")
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", server_port))
    fake.settimeout(5)
    pd = PdProcess(patch, [])
    try:
        data, _ = fake.recvfrom(65536)  # the status request sent right after connecting
        assert OscMessage(data).address == "/divergent/status"
        b = OscMessageBuilder(address="/divergent/status")
        for v in ("call", 120.0, "internal", 0.25, 1, 1.0, 4, "off", 3):
            b.add_arg(v)
        deadline = time.monotonic() + 5
        status = None
        while status is None and time.monotonic() < deadline:
            # Pd may still be binding its port: repeat, as the heartbeat would
            fake.sendto(b.build().dgram, ("127.0.0.1", reply_port))
            status = pd.wait_printed("divergent-status", timeout=0.2)
        assert status == "call 120 internal 0.25 1 1 4 off 3", pd.output()
        assert pd.wait_printed("divergent-online", where=lambda s: s == "1", timeout=2)
        assert pd.printed("divergent-online")[0] == "0"  # offline until the first heartbeat
    finally:
        pd.stop()
        fake.close()
    assert not _pd_errors(pd.output()), pd.output()


def test_patch_drives_a_real_server_and_shows_its_replies(live: Live) -> None:
    pd, send, server, tmp_path, serve_log = (
        live.pd,
        live.send,
        live.server,
        live.tmp_path,
        live.serve_log,
    )
    t_start = time.monotonic()

    # (b) the heartbeat arrives and the light goes on
    first = pd.wait_printed("divergent-status", timeout=5)
    assert first is not None, pd.output() + serve_log()
    assert _status(first)["concept"] == "none", first  # appended last: the patch still reads it
    assert pd.wait_printed("divergent-online", where=lambda s: s == "1", timeout=3) is not None

    # (a) -send "divergent-divergence 0.8" at start went through the slider to the server
    assert pd.wait_printed("divergent-status", where=_matches(divergence=0.8), timeout=3), (
        pd.printed("divergent-status")
    )

    # every control through the FUDI control port: GUI -> [oscformat] -> [netsend] -> server
    t = time.monotonic()
    for m in (
        "divergent-temperature 1.5",
        "divergent-bars 2",
        "divergent-tempo 150",
        "divergent-quantize beat",
        "divergent-mode call",
        "divergent-divergence 0.35",
    ):
        send(m)  # fmt: skip
    want = _matches(temperature=1.5, bars=2.0, tempo=150.0, quantize="beat", mode="call",
                    divergence=0.35)  # fmt: skip
    assert pd.wait_printed("divergent-status", after=t, where=want, timeout=3), (
        pd.printed("divergent-status", t),
        serve_log(),
    )

    # a refused value comes back on /divergent/error and shows in the patch
    t = time.monotonic()
    send("divergent-clock midi")
    send("divergent-tempo 100")  # rejected while following MIDI clock
    err = pd.wait_printed("divergent-error", after=t, timeout=3)
    assert err is not None and "tempo" in err.lower(), pd.output()
    assert pd.wait_printed("divergent-status", after=t, timeout=3,
                           where=_matches(clock="midi", tempo=150.0))  # fmt: skip

    # radios by index as well as by name; the record toggle stops and starts a take
    t = time.monotonic()
    send("divergent-clock internal")
    send("divergent-mode 2")  # index 2 = off
    send("divergent-record 0")
    assert pd.wait_printed(
        "divergent-status",
        after=t,
        timeout=3,
        where=_matches(clock="internal", mode="off", recording=0.0),
    )
    t = time.monotonic()
    send("divergent-record 1")
    assert pd.wait_printed("divergent-status", after=t, timeout=3, where=_matches(recording=1.0))

    # (c) notes through the patch, then generate: the answer's readout and its notes
    _play(send, [60, 64, 67, 72, 71, 67], hold=0.08)
    t = time.monotonic()
    send("divergent-generate")
    ans = pd.wait_printed("divergent-answer", after=t, timeout=15)
    assert ans is not None, pd.output() + serve_log()
    a = [float(x) for x in ans.split()]
    assert len(a) == 8, ans
    ident, surprisal, copy_rate, feature_distance, in_scale, notes, compute_ms, div = a
    assert notes > 0 and surprisal > 0 and compute_ms > 0, ans
    assert div == pytest.approx(0.35, abs=1e-4)
    assert 0 <= copy_rate <= 1 and feature_distance > 0 and 0 <= in_scale <= 1, ans
    assert ident >= 0
    assert pd.wait_printed("divergent-out-note", after=t, timeout=5) is not None
    assert pd.wait_printed("divergent-status", after=t, timeout=3,
                           where=lambda s: _status(s)["answers"] >= 1)  # fmt: skip
    send("divergent-stop")

    # the take holds the six notes that went through the patch
    t = time.monotonic()
    send("divergent-record 0")
    assert pd.wait_printed("divergent-status", after=t, timeout=3, where=_matches(recording=0.0))
    deadline = time.monotonic() + 5
    takes: list[Path] = []
    while time.monotonic() < deadline:
        takes = sorted((tmp_path / "sessions").glob("*.mid"), key=lambda p: p.stat().st_mtime)
        if len(takes) >= 2:
            break
        time.sleep(0.05)
    assert len(takes) >= 2, takes  # the first take (stopped by the toggle) and this one
    mid = mido.MidiFile(takes[-1], charset="utf-8")
    perf = next(tr for tr in mid.tracks if tr.name == "performer")
    assert sorted(m.note for m in perf if m.type == "note_on" and m.velocity > 0) == sorted(
        [60, 64, 67, 72, 71, 67]
    )

    # the server goes away: offline within the 2.5 s timeout
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=10)
    t = time.monotonic()
    assert pd.wait_printed("divergent-online", after=t, where=lambda s: s == "0", timeout=4)

    assert not _pd_errors(pd.output()), pd.output()
    assert time.monotonic() - t_start < 60


def test_patch_switches_learns_and_turns_concepts(tmp_path: Path, jack_server: Any) -> None:
    """The CONCEPTS block against a real server with two learned concepts: the list, a
    switch shown by the heartbeat, an unknown name as the last error, the strength
    slider, and a learn from notes played through the patch."""
    folder = tmp_path / "concepts"
    learn_tiny(folder, "riff")
    with _live(tmp_path, "--concepts", str(folder), "--concept-learn-steps", "2") as lv:
        pd, send = lv.pd, lv.send
        first = pd.wait_printed("divergent-status", timeout=5)
        assert first is not None, pd.output() + lv.serve_log()
        assert _status(first)["concept"] == "none" and _status(first)["concept_strength"] == 1.5
        t = time.monotonic()
        send("divergent-concepts")
        assert pd.wait_printed("divergent-concepts", after=t, timeout=3) == "riff", pd.output()
        t = time.monotonic()
        send("divergent-concept riff")
        applied = pd.wait_printed("divergent-concept", after=t, timeout=5)
        assert applied is not None and applied.split()[0] == "riff", pd.output()
        send("divergent-concept-strength 0.75")
        assert pd.wait_printed(
            "divergent-status", after=t, timeout=3,
            where=_matches(concept="riff", concept_strength=0.75),
        ), (pd.printed("divergent-status", t), lv.serve_log())  # fmt: skip
        t = time.monotonic()
        send("divergent-concept nosuch")
        err = pd.wait_printed("divergent-error", after=t, timeout=3)
        assert err is not None and "nosuch" in err, pd.output()
        assert pd.wait_printed(
            "divergent-status", after=t, timeout=3, where=_matches(concept="riff")
        )
        # learn from what was played through the patch, the seconds given by the script
        _play(send, [60, 63, 65, 66, 67, 70, 72, 70, 67, 65, 63, 60] * 2, hold=0.06)
        t = time.monotonic()
        send("divergent-concept-learn mine 60")
        learned = pd.wait_printed("divergent-concept-learned", after=t, timeout=120)
        assert learned is not None, pd.output() + lv.serve_log()[-3000:]
        name, _secs, steps, _loss, notes, played_s, _size = learned.split()
        assert (name, float(steps), float(notes), float(played_s)) == ("mine", 2, 24, 60), learned
        assert pd.wait_printed("divergent-concepts", after=t, timeout=5) == "mine riff"
        send("divergent-concept none")
        assert pd.wait_printed(
            "divergent-status", after=t, timeout=3, where=_matches(concept="none")
        )
    assert (folder / "mine.concept.npz").exists()
    assert not _pd_errors(pd.output()), pd.output()
