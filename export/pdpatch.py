"""The writer of ``max_patches/divergent.pd``, the Pure Data control surface.

:func:`build_divergent_pd` produces the patch, so the committed file is reproducible and
reviewable as code: ``python -m divergent.export.pdpatch`` rewrites it, and with
``--check`` it fails when the file and the writer disagree. The tests read the patch back
as data with their own reader (``tests/max_patches/pdread.py``).

The surface is vanilla Pd (0.51+): GUIs on the main canvas talk to four subpatches through
``$0``-local send/receive names, so the window shows controls only. Every control is also
reachable by a global receiver ``divergent-<name>`` (scripts, ``-send``, the FUDI control
port), and every reply is printed (``divergent-status: ...``) so a headless Pd is testable.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from divergent.server.config import ServeConfig, arg_range

__all__ = ["PATCH_PATH", "build_divergent_pd", "main"]

PATCH_PATH = Path(__file__).resolve().parent.parent / "max_patches" / "divergent.pd"

_FG, _BG, _LBL = "#000000", "#fcfcfc", "#000000"


def _esc(atom: str | float) -> str:
    """One atom as Pd writes it: ``$`` ``,`` ``;`` and spaces escaped with a backslash."""
    if isinstance(atom, float) and atom.is_integer():
        atom = int(atom)
    s = str(atom)
    for ch in ("\\", "$", ",", ";", " "):
        s = s.replace(ch, "\\" + ch)
    return s


class _Patch:
    """One canvas being written: boxes get indices in creation order, as Pd counts them."""

    def __init__(self, name: str, rect: tuple[int, int, int, int], font: int = 10) -> None:
        self.name = name
        self.rect = rect
        self.font = font
        self.lines: list[str] = []
        self.count = 0
        self.wires: list[tuple[int, int, int, int]] = []

    def _box(self, line: str) -> int:
        self.lines.append(line)
        self.count += 1
        return self.count - 1

    def obj(self, x: int, y: int, *atoms: str | float) -> int:
        return self._box(f"#X obj {x} {y} " + " ".join(_esc(a) for a in atoms) + ";")

    def msg(self, x: int, y: int, *atoms: str | float) -> int:
        return self._box(f"#X msg {x} {y} " + " ".join(_esc(a) for a in atoms) + ";")

    def text(self, x: int, y: int, words: str, width: int | None = None) -> int:
        body = " ".join(_esc(w) for w in words.split())
        suffix = f", f {width}" if width else ""
        return self._box(f"#X text {x} {y} {body}{suffix};")

    def floatatom(
        self, x: int, y: int, width: int, label: str, rcv: str, pos: int = 1, snd: str = "-"
    ) -> int:
        # label position 0 left, 1 right, 2 top, 3 bottom; the last field is the font size
        return self._box(
            f"#X floatatom {x} {y} {width} 0 0 {pos} {_esc(label)} {_esc(rcv)} {_esc(snd)} 0;"
        )

    def symbolatom(
        self, x: int, y: int, width: int, label: str, rcv: str, pos: int = 1, snd: str = "-"
    ) -> int:
        return self._box(
            f"#X symbolatom {x} {y} {width} 0 0 {pos} {_esc(label)} {_esc(rcv)} {_esc(snd)} 0;"
        )

    def sub(self, x: int, y: int, child: _Patch) -> int:
        """Embed a subpatch: its records, then ``#X restore`` makes it a box here."""
        x0, y0, w, h = child.rect
        self.lines.append(f"#N canvas {x0} {y0} {w} {h} {child.name} 0;")
        self.lines.extend(child.body())
        return self._box(f"#X restore {x} {y} pd {child.name};")

    def wire(self, src: int, outlet: int, dst: int, inlet: int = 0) -> None:
        self.wires.append((src, outlet, dst, inlet))

    def chain(self, *boxes: int) -> None:
        """Wire outlet 0 of each box to inlet 0 of the next."""
        for a, b in itertools.pairwise(boxes):
            self.wire(a, 0, b, 0)

    def body(self) -> list[str]:
        return self.lines + [f"#X connect {a} {o} {b} {i};" for a, o, b, i in self.wires]

    def render(self) -> str:
        x, y, w, h = self.rect
        return "\n".join([f"#N canvas {x} {y} {w} {h} {self.font};", *self.body()]) + "\n"


def _iem_colors() -> str:
    return f"{_BG} {_FG} {_LBL}"


def _hsl(p: _Patch, x: int, y: int, lo: float, hi: float, name: str) -> int:
    # hsl W H min max log init snd rcv label ldx ldy font fontsize colors value steady
    return p._box(
        f"#X obj {x} {y} hsl 180 16 {_esc(lo)} {_esc(hi)} 0 0 \\$0-{name}-ui \\$0-{name}-set "
        f"{name} 0 -9 0 10 {_iem_colors()} 0 1;"
    )


def _nbx(p: _Patch, x: int, y: int, digits: int, lo: int, hi: int, name: str) -> int:
    # nbx digits H min max log init snd rcv label ldx ldy font fontsize colors value log_h
    return p._box(
        f"#X obj {x} {y} nbx {digits} 16 {lo} {hi} 0 0 \\$0-{name}-ui \\$0-{name}-set "
        f"{name} 0 -9 0 10 {_iem_colors()} {lo} 256;"
    )


def _hradio(p: _Patch, x: int, y: int, name: str) -> int:
    # hradio size new_old init number snd rcv label ldx ldy font fontsize colors value
    return p._box(
        f"#X obj {x} {y} hradio 18 1 0 3 \\$0-{name}-ui \\$0-{name}-set {name} 0 -9 0 10 "
        f"{_iem_colors()} 0;"
    )


def _tgl(
    p: _Patch, x: int, y: int, label: str, snd: str, rcv: str, init: int = 0, size: int = 18
) -> int:
    # tgl size init snd rcv label ldx ldy font fontsize colors init_value nonzero_value
    return p._box(
        f"#X obj {x} {y} tgl {size} {init} {_esc(snd)} {_esc(rcv)} {label} {size + 5} "
        f"{size // 2} 0 10 {_iem_colors()} {init} 1;"
    )


def _bng(p: _Patch, x: int, y: int, label: str, snd: str, rcv: str, size: int = 25) -> int:
    # bng size hold interrupt init snd rcv label ldx ldy font fontsize colors
    return p._box(
        f"#X obj {x} {y} bng {size} 250 50 0 {_esc(snd)} {_esc(rcv)} {label} {size + 5} "
        f"{size // 2} 0 10 {_iem_colors()};"
    )


# name, OSC type, the Pd GUI kind, (lo, hi)
_NUMERIC = (
    ("divergence", "f", "hsl", (0.0, 1.0)),
    ("temperature", "f", "hsl", (0.05, 2.0)),
    ("bars", "i", "nbx", (1, 16)),
    ("tempo", "f", "nbx", (20, 300)),
)
_CHOICES = (
    ("mode", ("call", "jam", "off")),
    ("clock", ("internal", "midi", "link")),
    ("quantize", ("off", "beat", "bar")),
)
# the heartbeat's fields in order: /divergent/status s f s f i f i s i s f
_STATUS = ("mode", "tempo", "clock", "divergence", "recording", "temperature", "bars",
           "quantize", "answers", "concept", "concept_strength")  # fmt: skip
_STATUS_TYPES = "s f s f f f f s f s f"  # oscparse gives every number as a float
#: the concept strength slider's range: what the server's live control accepts
_STRENGTHS = (arg_range("concept_strength")["lo"], arg_range("concept_strength")["hi"])
#: how far back a learn reaches when no seconds are given: the server's own default
_LEARN_SECONDS = int(ServeConfig.concept_learn_s)
_ANSWER = ("id", "surprisal", "copy_rate", "feature_distance", "in_scale", "notes",
           "compute_ms", "divergence")  # fmt: skip


def _controls_out() -> _Patch:
    """Controls -> OSC: each GUI's send name, and its public ``divergent-<name>`` receiver."""
    p = _Patch("controls-out", (60, 60, 1240, 660))
    p.text(
        10,
        6,
        "GUI values -> OSC. [r divergent-*] are the scripting entry points: they "
        "drive the GUI, so a scripted change shows and takes the same path.",
        100,
    )
    x = 10
    for name, kind, _gui, _rng in _NUMERIC:
        r_pub = p.obj(x, 50, "r", f"divergent-{name}")
        s_set = p.obj(x, 75, "s", f"$0-{name}-set")
        p.chain(r_pub, s_set)
        r_ui = p.obj(x, 110, "r", f"$0-{name}-ui")
        fmt = p.obj(x, 135, "oscformat", "-f", kind, "divergent", name)
        s_osc = p.obj(x, 160, "s", "$0-osc")
        p.chain(r_ui, fmt, s_osc)
        x += 230
    # three-way choices: a name (or an index) in, the radio's index -> a symbol out
    x = 10
    for name, choices in _CHOICES:
        y = 210
        r_pub = p.obj(x, y, "r", f"divergent-{name}")
        trim = p.obj(x, y + 25, "list", "trim")  # "jam" arrives as a selector: make it routable
        route = p.obj(x, y + 50, "route", *choices)
        p.chain(r_pub, trim, route)
        s_set = p.obj(x, y + 110, "s", f"$0-{name}-set")
        for k in range(3):
            m = p.msg(x + 45 * k, y + 80, k)
            p.wire(route, k, m)
            p.wire(m, 0, s_set)
        p.wire(route, 3, s_set)  # a number 0..2 goes straight to the radio
        r_ui = p.obj(x, y + 145, "r", f"$0-{name}-ui")
        sel = p.obj(x, y + 170, "sel", 0, 1, 2)
        p.chain(r_ui, sel)
        fmt = p.obj(x, y + 230, "oscformat", "-f", "s", "divergent", name)
        step = 6 * max(len(c) for c in choices) + 60  # "symbol " + the longest name
        for k, c in enumerate(choices):
            m = p.msg(x + step * k, y + 200, "symbol", c)
            p.wire(sel, k, m)
            p.wire(m, 0, fmt)
        p.chain(fmt, p.obj(x, y + 255, "s", "$0-osc"))
        x += 320
    # record toggle: on -> record/start, off -> record/stop
    x, y = 970, 210
    r_pub = p.obj(x, y, "r", "divergent-record")
    p.chain(r_pub, p.obj(x, y + 25, "s", "$0-record-set"))
    r_ui = p.obj(x, y + 60, "r", "$0-record-ui")
    sel = p.obj(x, y + 85, "sel", 0)
    p.chain(r_ui, sel)
    stop = p.obj(x, y + 140, "oscformat", "divergent", "record", "stop")
    p.wire(sel, 0, stop)
    bang = p.obj(x + 60, y + 110, "t", "b")  # a bang: a float would become an OSC argument
    p.wire(sel, 1, bang)
    start = p.obj(x + 60, y + 165, "oscformat", "divergent", "record", "start")
    p.wire(bang, 0, start)
    s_osc = p.obj(x, y + 200, "s", "$0-osc")
    p.wire(stop, 0, s_osc)
    p.wire(start, 0, s_osc)
    # bottom row: the performer's notes, the two bangs, a named take
    y = 500
    r_note = p.obj(10, y, "r", "divergent-note")  # pitch velocity [channel], from scripts
    r_midi = p.obj(130, y, "r", "$0-note")  # from [notein] (subpatch midi)
    fmt = p.obj(10, y + 55, "oscformat", "-f", "iii", "divergent", "note")
    p.wire(r_note, 0, fmt)
    p.wire(r_midi, 0, fmt)
    p.chain(fmt, p.obj(10, y + 80, "s", "$0-osc"))
    x = 260
    for name in ("generate", "stop"):
        r_pub = p.obj(x, y, "r", f"divergent-{name}")
        p.chain(r_pub, p.obj(x, y + 25, "s", f"$0-{name}-set"))
        r_ui = p.obj(x, y + 55, "r", f"$0-{name}-ui")
        fmt = p.obj(x, y + 80, "oscformat", "divergent", name)
        p.chain(r_ui, fmt, p.obj(x, y + 105, "s", "$0-osc"))
        x += 250
    r_take = p.obj(760, y, "r", "divergent-take")
    # "divergent-take name" arrives as the selector "name"; [symbol] turns it into a symbol
    sym = p.obj(760, y + 25, "symbol")
    named = p.obj(760, y + 55, "oscformat", "-f", "s", "divergent", "record", "start")
    p.chain(r_take, sym, named, p.obj(760, y + 80, "s", "$0-osc"))
    return p


def _network() -> _Patch:
    """The OSC sender (connect/disconnect by receiver) and the FUDI control port."""
    p = _Patch("network", (80, 80, 760, 440))
    p.text(
        10,
        6,
        "[netsend -u -b] sends the OSC packets of every [s $0-osc]. "
        "divergent-connect HOST PORT reconnects (default 127.0.0.1 9000) and asks for "
        "the status at once.",
        90,
    )
    # The default waits one tick: Pd handles -send messages after loadbang but before the
    # first tick, so an address given at start closes the gate and the default never runs.
    lb = p.obj(10, 50, "loadbang")
    tick = p.obj(10, 75, "delay", 0)
    gate = p.obj(10, 100, "spigot", 1)
    default = p.msg(10, 125, "127.0.0.1", 9000)
    p.chain(lb, tick, gate, default)
    r_conn = p.obj(150, 50, "r", "divergent-connect")
    given = p.obj(150, 75, "t", "a", "b")
    close = p.msg(190, 100, 0)
    p.chain(r_conn, given)
    p.wire(given, 1, close)
    p.wire(close, 0, gate, 1)
    # "127.0.0.1 9000" arrives with the host as selector: [list] makes it a plain list
    lst = p.obj(10, 155, "list")
    p.wire(default, 0, lst)
    p.wire(given, 0, lst)
    trig = p.obj(10, 180, "t", "b", "l", "b")
    p.chain(lst, trig)
    # right to left: disconnect (netsend refuses a second connect), connect, ask for status
    disc = p.msg(200, 210, "disconnect")
    conn = p.msg(80, 210, "connect", "$1", "$2")
    ask = p.obj(10, 240, "oscformat", "divergent", "status")
    p.wire(trig, 2, disc)
    p.wire(trig, 1, conn)
    p.wire(trig, 0, ask)
    r_osc = p.obj(200, 240, "r", "$0-osc")
    send = p.obj(80, 275, "netsend", "-u", "-b")
    for b in (disc, conn, ask, r_osc):
        p.wire(b, 0, send)
    p.text(
        10,
        320,
        "FUDI control port, off until divergent-control PORT: one message "
        "'receiver args;' per UDP packet, ending in a newline, "
        "for example divergent-divergence 0.8; - listens on 127.0.0.1 only.",
        90,
    )
    r_ctl = p.obj(420, 50, "r", "divergent-control")
    listen = p.msg(420, 75, "listen", "$1", "127.0.0.1")
    fudi = p.obj(420, 100, "netreceive", "-u")
    as_list = p.obj(420, 125, "list")  # "name args" arrives with name as selector
    t2 = p.obj(420, 150, "t", "l", "l")
    p.chain(r_ctl, listen, fudi, as_list, t2)
    # right first: the receiver's name to [send]'s right inlet, then the rest to its left
    name_split = p.obj(520, 175, "list", "split", 1)
    sym = p.obj(520, 200, "symbol")
    rest_split = p.obj(420, 200, "list", "split", 1)
    rest = p.obj(420, 225, "list", "trim")  # "set 0.5" / "quit" must arrive as messages
    snd = p.obj(420, 250, "send")
    p.wire(t2, 1, name_split)
    p.chain(name_split, sym)
    p.wire(sym, 0, snd, 1)
    p.wire(t2, 0, rest_split)
    p.wire(rest_split, 1, rest)
    p.chain(rest, snd)
    return p


def _staircase(p: _Patch, src: int, x: int, y: int, names: Sequence[str], width: int) -> None:
    """One ``[s name]`` per outlet of ``src``, each on its own row under its outlet."""
    step = (width - 7) / max(1, len(names) - 1)  # Pd spreads outlets across the box
    for k, name in enumerate(names):
        p.wire(src, k, p.obj(x + round(step * k), y + 25 * k, "s", name))


def _replies_in() -> _Patch:
    """OSC replies -> printed lines, readout atoms, the GUIs' state and the online light."""
    p = _Patch("replies-in", (100, 100, 1100, 620))
    p.text(
        10,
        6,
        "Replies from the server (its --osc-reply address). Every reply is "
        "printed (the Pd console, or stderr with -stderr) and shown. "
        "divergent-listen PORT changes the port (default 9001).",
        110,
    )
    # the default port waits one tick, so a port given by -send at start is the only one
    # ever bound (see the network subpatch)
    lb = p.obj(10, 45, "loadbang")
    tick = p.obj(10, 70, "delay", 0)
    gate = p.obj(10, 95, "spigot", 1)
    default = p.msg(10, 120, 9001)
    p.chain(lb, tick, gate, default)
    r_listen = p.obj(120, 45, "r", "divergent-listen")
    given = p.obj(120, 70, "t", "f", "b")
    close = p.msg(160, 95, 0)
    p.chain(r_listen, given)
    p.wire(given, 1, close)
    p.wire(close, 0, gate, 1)
    listen = p.msg(120, 120, "listen", "$1")
    p.wire(default, 0, listen)
    p.wire(given, 0, listen)
    net = p.obj(120, 145, "netreceive", "-u", "-b")
    parse = p.obj(120, 170, "oscparse")
    trim = p.obj(120, 195, "list", "trim")  # without it [route] never matches
    r_div = p.obj(120, 220, "route", "divergent")
    r_kind = p.obj(
        10, 245, "route", "status", "answer", "error", "out", "pong", "stats", "concept",
        "concepts",
    )  # fmt: skip
    p.chain(listen, net, parse, trim, r_div, r_kind)
    # status: print, fan out to the "-now" receivers, keep the light on
    t_st = p.obj(10, 290, "t", "a", "a", "a")
    p.wire(r_kind, 0, t_st)
    p.wire(t_st, 0, p.obj(10, 570, "print", "divergent-status"))
    unpack_args = _STATUS_TYPES.split()
    unpack = p.obj(40, 320, "unpack", *unpack_args)
    p.wire(t_st, 1, unpack)
    width = 6 * len(" ".join(["unpack", *unpack_args])) + 4  # font 10: 6 px a character
    _staircase(p, unpack, 40, 350, [f"$0-{n}-now" for n in _STATUS], width)
    # the light: right to left, blink, on, and (re)start the 2.5 s timeout that turns it off
    x = 330
    beat = p.obj(x, 290, "t", "b", "b", "b")
    p.wire(t_st, 2, beat)
    p.wire(beat, 2, p.obj(x + 120, 320, "s", "$0-beat"))
    on = p.msg(x + 70, 345, 1)
    p.wire(beat, 1, on)
    delay = p.obj(x, 320, "delay", 2500)
    p.wire(beat, 0, delay)
    off = p.msg(x, 345, 0)
    p.chain(delay, off)
    p.chain(p.obj(x + 120, 290, "loadbang"), off)  # offline at load: a log shows the start
    change = p.obj(x, 380, "change", -1)
    p.wire(on, 0, change)
    p.wire(off, 0, change)
    t_on = p.obj(x, 405, "t", "f", "f", "f")
    p.chain(change, t_on)
    p.wire(t_on, 0, p.obj(x, 570, "print", "divergent-online"))
    p.wire(t_on, 1, p.obj(x + 30, 440, "s", "$0-online"))
    sel = p.obj(x + 110, 440, "sel", 0, 1)
    p.wire(t_on, 2, sel)
    off_txt = p.msg(x + 110, 470, "symbol", "offline")
    on_txt = p.msg(x + 200, 470, "symbol", "online")
    p.wire(sel, 0, off_txt)
    p.wire(sel, 1, on_txt)
    s_txt = p.obj(x + 110, 505, "s", "$0-online-text")
    p.wire(off_txt, 0, s_txt)
    p.wire(on_txt, 0, s_txt)
    # the answer's readout
    x = 620
    t_ans = p.obj(x, 290, "t", "a", "a")
    p.wire(r_kind, 1, t_ans)
    p.wire(t_ans, 0, p.obj(x, 570, "print", "divergent-answer"))
    unpack_args = ["f"] * len(_ANSWER)
    un_ans = p.obj(x + 30, 320, "unpack", *unpack_args)
    p.wire(t_ans, 1, un_ans)
    width = 6 * len(" ".join(["unpack", *unpack_args])) + 4
    _staircase(p, un_ans, x + 30, 350, [f"$0-answer-{n}" for n in _ANSWER], width)
    # error text: the reply's string arrives as a selector; [symbol] makes it displayable
    x = 900
    t_err = p.obj(x, 290, "t", "a", "a")
    p.wire(r_kind, 2, t_err)
    p.wire(t_err, 0, p.obj(x, 380, "print", "divergent-error"))
    sym = p.obj(x + 30, 320, "symbol")
    p.wire(t_err, 1, sym)
    p.chain(sym, p.obj(x + 30, 345, "s", "$0-error"))
    # the machine's notes go to the midi subpatch; pong and stats are printed only
    r_note = p.obj(x, 420, "route", "note")
    p.wire(r_kind, 3, r_note)
    t_note = p.obj(x, 445, "t", "a", "a")
    p.chain(r_note, t_note)
    p.wire(t_note, 0, p.obj(x, 505, "print", "divergent-out-note"))
    p.wire(t_note, 1, p.obj(x + 30, 475, "s", "$0-out-note"))
    p.wire(r_kind, 4, p.obj(x, 545, "print", "divergent-pong"))
    p.wire(r_kind, 5, p.obj(x, 570, "print", "divergent-stats"))
    # concepts: a switch applied (name, load ms), one learned (its figures), the list
    x = 1000
    learned = p.obj(x, 290, "route", "learned")
    p.wire(r_kind, 6, learned)
    p.wire(learned, 0, p.obj(x, 380, "print", "divergent-concept-learned"))
    p.wire(learned, 1, p.obj(x + 30, 345, "print", "divergent-concept"))
    p.wire(r_kind, 7, p.obj(x, 420, "print", "divergent-concepts"))
    return p


def _sync() -> _Patch:
    """The heartbeat's values set the GUIs (without output), so they show the server."""
    p = _Patch("sync-gui", (120, 120, 1160, 300))
    p.text(
        10,
        6,
        "Each heartbeat sets the controls to the server's values without sending "
        "them back: another client (MQTT , a second patch) shows here too.",
        100,
    )
    x = 10
    for name, _kind, _gui, _rng in _NUMERIC:
        r = p.obj(x, 50, "r", f"$0-{name}-now")
        m = p.msg(x, 75, "set", "$1")
        p.chain(r, m, p.obj(x, 100, "s", f"$0-{name}-set"))
        x += 160
    for now, dst in (
        ("recording", "$0-record-set"),
        ("concept_strength", "$0-concept-strength-set"),
        ("concept", "$0-concept-show"),  # the concept box: shown, not sent
    ):
        r = p.obj(x, 50, "r", f"$0-{now}-now")
        m = p.msg(x, 75, "set", "$1")
        p.chain(r, m, p.obj(x, 100, "s", dst))
        x += 160
    x = 10
    for name, choices in _CHOICES:
        r = p.obj(x, 150, "r", f"$0-{name}-now")
        sel = p.obj(x, 175, "sel", *choices)
        p.chain(r, sel)
        s = p.obj(x, 235, "s", f"$0-{name}-set")
        for k in range(3):
            m = p.msg(x + 50 * k, 205, "set", k)
            p.wire(sel, k, m)
            p.wire(m, 0, s)
        x += 200
    return p


def _concepts_out() -> _Patch:
    """Concept controls -> OSC: switch (a name, A+B, none), strength, learn, list."""
    p = _Patch("concepts", (160, 160, 900, 420))
    p.text(
        10,
        6,
        "Concepts (docs/concepts.md): the name box and divergent-concept switch "
        "(a name , A+B or none) ; the strength slider ; learn NAME from the last "
        "SECONDS played ; the list is printed.",
        100,
    )
    # switch: the box's symbol, or a script's "divergent-concept riff" (a selector)
    r_pub = p.obj(10, 50, "r", "divergent-concept")
    r_ui = p.obj(160, 50, "r", "$0-concept-ui")
    sym = p.obj(10, 80, "symbol")
    p.wire(r_pub, 0, sym)
    p.wire(r_ui, 0, sym)
    p.chain(sym, p.obj(10, 105, "oscformat", "-f", "s", "divergent", "concept"),
            p.obj(10, 130, "s", "$0-osc"))  # fmt: skip
    # strength: as the numeric controls, a slider between the receiver and the OSC
    r_pub = p.obj(300, 50, "r", "divergent-concept-strength")
    p.chain(r_pub, p.obj(300, 75, "s", "$0-concept-strength-set"))
    r_ui = p.obj(300, 105, "r", "$0-concept-strength-ui")
    fmt = p.obj(300, 130, "oscformat", "-f", "f", "divergent", "concept", "strength")
    p.chain(r_ui, fmt, p.obj(300, 155, "s", "$0-osc"))
    # list: a bang asks, the reply is printed (replies-in)
    r_pub = p.obj(560, 50, "r", "divergent-concepts")
    r_ui = p.obj(700, 50, "r", "$0-concepts-ui")
    bang = p.obj(560, 80, "t", "b")  # anything -> a bang: no argument on the wire
    p.wire(r_pub, 0, bang)
    p.wire(r_ui, 0, bang)
    p.chain(bang, p.obj(560, 105, "oscformat", "divergent", "concepts"),
            p.obj(560, 130, "s", "$0-osc"))  # fmt: skip
    # learn from a script: "divergent-concept-learn riff [60]" -> [list] "riff 60"; the
    # default seconds appended, the first two kept: "riff 60" or "riff 120"
    r_pub = p.obj(10, 200, "r", "divergent-concept-learn")
    lst = p.obj(10, 225, "list")
    app = p.obj(10, 250, "list", "append", _LEARN_SECONDS)
    split = p.obj(10, 275, "list", "split", 2)
    p.chain(r_pub, lst, app, split)
    learn = p.obj(10, 340, "oscformat", "-f", "sf", "divergent", "concept", "learn")
    p.wire(split, 0, learn)
    p.chain(learn, p.obj(10, 365, "s", "$0-osc"))
    # learn from the GUI: the bang sends the name box's symbol and the seconds box's value
    r_name = p.obj(300, 200, "r", "$0-learn-name")
    r_secs = p.obj(450, 200, "r", "$0-learn-seconds")
    r_go = p.obj(170, 200, "r", "$0-learn-ui")
    held = p.obj(170, 250, "symbol")
    p.wire(r_go, 0, held)
    p.wire(r_name, 0, held, 1)
    pack = p.obj(170, 300, "pack", "s", _LEARN_SECONDS)
    p.wire(held, 0, pack)
    p.wire(r_secs, 0, pack, 1)
    p.wire(pack, 0, learn)
    # the seconds box shows the default at load
    lb = p.obj(600, 200, "loadbang")
    p.chain(
        lb, p.msg(600, 225, "set", _LEARN_SECONDS), p.obj(600, 250, "s", "$0-learn-seconds-set")
    )
    return p


def _midi() -> _Patch:
    """[notein] -> /divergent/note (gated by the GUI toggle); /divergent/out/note -> [noteout]."""
    p = _Patch("midi", (140, 140, 620, 330))
    p.text(
        10,
        6,
        "Pd's MIDI input -> the server's OSC note transport (no JACK or virtual "
        "port needed); the machine's notes from OSC -> Pd's MIDI output.",
        80,
    )
    nin = p.obj(10, 50, "notein")
    ch = p.obj(110, 75, "-", 1)  # Pd numbers the channels of a 2nd port 17..32: fold to 1..16
    mod = p.obj(110, 100, "mod", 16)
    plus = p.obj(110, 125, "+", 1)
    pack = p.obj(10, 155, "pack", "f", "f", "f")
    p.wire(nin, 2, ch)
    p.chain(ch, mod, plus)
    p.wire(plus, 0, pack, 2)
    p.wire(nin, 1, pack, 1)
    p.wire(nin, 0, pack, 0)
    gate = p.obj(10, 185, "spigot", 1)
    p.chain(pack, gate, p.obj(10, 215, "s", "$0-note"))
    p.wire(p.obj(90, 155, "r", "$0-midi-thru"), 0, gate, 1)
    r_out = p.obj(330, 50, "r", "$0-out-note")
    un = p.obj(330, 75, "unpack", "f", "f", "f")
    nout = p.obj(330, 105, "noteout")
    p.chain(r_out, un)
    for k in range(3):
        p.wire(un, k, nout, k)
    return p


def build_divergent_pd() -> str:
    """The text of ``max_patches/divergent.pd``."""
    p = _Patch("divergent", (40, 40, 1000, 720))
    p.text(
        20,
        10,
        "divergent - live control surface (Pd vanilla 0.51+). OSC to the "
        "divergent server: see max_patches/README.md and docs/osc.md.",
        110,
    )
    # left column: the knobs
    p.text(20, 40, "CONTROLS", 20)
    y = 80
    for name, _kind, gui, (lo, hi) in _NUMERIC:
        if gui == "hsl":
            _hsl(p, 20, y, lo, hi, name)
            p.floatatom(215, y, 6, "-", f"$0-{name}-now", pos=1)
        else:
            _nbx(p, 20, y, 3 if hi < 100 else 5, int(lo), int(hi), name)
            p.floatatom(90, y, 6, "-", f"$0-{name}-now", pos=1)
        y += 40
    for name, choices in _CHOICES:
        _hradio(p, 20, y, name)
        p.text(80, y, " ".join(choices))
        y += 40
    _tgl(p, 20, y, "record", "$0-record-ui", "$0-record-set")
    _bng(p, 100, y - 4, "generate", "$0-generate-ui", "$0-generate-set")
    _bng(p, 200, y - 4, "stop", "$0-stop-ui", "$0-stop-set")
    p.text(
        20,
        y + 30,
        "server values are shown beside each control and the controls follow "
        "the server's heartbeat.",
        45,
    )
    # middle column: server state and the last answer
    x = 330
    p.text(x, 40, "SERVER", 20)
    _tgl(p, x, 70, "online", "empty", "$0-online", size=25)
    p.symbolatom(x + 80, 73, 8, "-", "$0-online-text", pos=1)
    _bng(p, x + 160, 73, "heartbeat", "empty", "$0-beat", size=15)
    p.floatatom(x, 110, 5, "answers", "$0-answers-now", pos=1)
    p.text(x, 150, "LAST ANSWER", 20)
    for k, name in enumerate(_ANSWER):
        p.floatatom(x, 175 + 22 * k, 8, name, f"$0-answer-{name}", pos=1)
    p.symbolatom(x, 375, 70, "last-error", "$0-error", pos=2)
    # right column: connection and MIDI
    x = 640
    p.text(x, 40, "CONNECTION (click to apply , edit to change)", 30)
    p.msg(x, 80, ";", "divergent-connect", "127.0.0.1", 9000)
    p.msg(x, 120, ";", "divergent-listen", 9001)
    p.text(
        x,
        155,
        "server address (its --osc-port) and this patch's port (the server's --osc-reply).",
        34,
    )
    p.text(x, 215, "MIDI", 20)
    _tgl(p, x, 240, "notein-to-server", "$0-midi-thru", "empty", init=1)
    p.text(
        x,
        265,
        "Pd's MIDI in -> /divergent/note; /divergent/out/note -> Pd's MIDI "
        "out (Pd's MIDI settings pick the devices).",
        34,
    )
    _concepts_gui(p, x, 320)
    # plumbing
    y = 520
    p.text(20, y, "PLUMBING", 20)
    p.sub(20, y + 30, _controls_out())
    p.sub(140, y + 30, _network())
    p.sub(230, y + 30, _replies_in())
    p.sub(340, y + 30, _sync())
    p.sub(430, y + 30, _midi())
    p.sub(500, y + 30, _concepts_out())
    p.text(
        20,
        y + 65,
        "Scripting: every control has a receiver divergent-NAME (divergence "
        "temperature bars tempo mode clock quantize record take generate stop note "
        "concept concept-strength concept-learn concepts connect listen control) , e.g. "
        "pd -send 'divergent-divergence 0.8'.",
        110,
    )
    return p.render()


def _concepts_gui(p: _Patch, x: int, y: int) -> None:
    """The CONCEPTS block of the main canvas (its plumbing: :func:`_concepts_out`)."""
    p.text(x, y, "CONCEPTS", 20)
    # the box shows the active concept (heartbeat); type a name (A+B, none) and Enter
    p.symbolatom(x, y + 30, 18, "concept", "$0-concept-show", pos=1, snd="$0-concept-ui")
    p.msg(x + 180, y + 30, ";", "divergent-concept", "none")
    _bng(p, x, y + 55, "list", "$0-concepts-ui", "empty", size=15)
    lo, hi = _STRENGTHS
    _hsl(p, x, y + 95, lo, hi, "concept-strength")
    p.floatatom(x + 195, y + 95, 5, "-", "$0-concept_strength-now", pos=1)
    # learn NAME from the last SECONDS played: type both, then the bang
    p.symbolatom(x, y + 130, 10, "-", "empty", pos=1, snd="$0-learn-name")
    p.floatatom(x + 80, y + 130, 4, "s", "$0-learn-seconds-set", pos=1, snd="$0-learn-seconds")
    _bng(p, x + 130, y + 128, "learn", "$0-learn-ui", "empty", size=18)
    p.text(x, y + 155, "learn: a name , the seconds to learn from , then the bang", 34)


def main(argv: Sequence[str] | None = None) -> int:
    """Write max_patches/divergent.pd, or with --check report whether it is up to date."""
    ap = argparse.ArgumentParser(
        prog="python -m divergent.export.pdpatch", description=main.__doc__
    )
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 if different")
    ap.add_argument("--out", type=Path, default=PATCH_PATH)
    a = ap.parse_args(argv)
    text = build_divergent_pd()
    if a.check:
        same = a.out.exists() and a.out.read_text(encoding="utf-8") == text
        print(f"{a.out}: {'up to date' if same else 'differs from export/pdpatch.py'}")
        return 0 if same else 1
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
