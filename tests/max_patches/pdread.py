"""A reader for Pure Data ``.pd`` files, so tests can check a patch as data.

Every record well formed, every wire between existing boxes, vanilla classes only, and
the OSC addresses a patch sends and routes. The patch itself is written by
``divergent.export.pdpatch``; atoms are split by the same tokenizer Max boxes use
(``divergent.export.atoms``, Pd's syntax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from divergent.export.atoms import PD_ATOMS

__all__ = [
    "VANILLA_CLASSES",
    "PdConnection",
    "PdObject",
    "osc_usage",
    "parse_pd",
    "parse_pd_text",
]

# Control-rate classes shipped with Pd vanilla 0.51 (no externals, no signal objects: a
# control surface needs none). Aliases are listed too, since a patch may use either.
_VANILLA_NAMES = """
    bang b float f symbol int i send s receive r select sel route spigot moses until print
    makefilename pack unpack trigger t value v list loadbang netsend netreceive oscformat
    oscparse fudiformat fudiparse delay del metro line timer realtime pipe change swap
    + - * / max min == != > < >= <= & && | || % << >> mod div abs sqrt pow exp log wrap
    clip random sin cos tan atan atan2 mtof ftom dbtorms rmstodb powtodb dbtopow expr
    notein noteout ctlin ctlout pgmin pgmout bendin bendout touchin touchout polytouchin
    polytouchout midiin midiout sysexin midirealtimein makenote stripnote poly bag text
    qlist textfile array table tabread tabwrite declare inlet outlet pd graph namecanvas
    pdcontrol savestate clone value key keyup keyname openpanel savepanel
    hsl vsl nbx tgl bng hradio vradio cnv vu hslider vslider toggle my_numbox my_canvas
"""
VANILLA_CLASSES = frozenset(_VANILLA_NAMES.split())

# Boxes that count as objects in a canvas (their order gives the indices wires use).
_BOX_KINDS = ("obj", "msg", "text", "floatatom", "symbolatom", "listbox", "array", "scalar")


@dataclass(frozen=True)
class PdObject:
    """One box of a canvas: ``cls`` is the class for ``obj`` boxes, else the box kind."""

    canvas: int  # 0 = the top-level canvas, then subpatches in file order
    index: int  # position in its canvas, as ``#X connect`` counts
    kind: str  # obj, msg, text, floatatom, symbolatom, listbox, array, scalar
    cls: str
    args: tuple[str, ...]  # unescaped atoms after the class (or after x y for others)
    x: int
    y: int


@dataclass(frozen=True)
class PdConnection:
    """A wire ``#X connect src outlet dst inlet`` inside one canvas."""

    canvas: int
    src: int
    outlet: int
    dst: int
    inlet: int


@dataclass
class _Canvas:
    ident: int
    objects: list[PdObject] = field(default_factory=list)


def _records(text: str) -> list[str]:
    """Split a .pd text into records at unescaped semicolons; refuse a trailing fragment."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])  # an escaped character never ends a record
            i += 2
            continue
        if c == ";":
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    rest = "".join(cur).strip()
    if rest:
        raise ValueError(f"text after the last ';': {rest[:60]!r}")
    return out


def _strip_width(atoms: list[str]) -> list[str]:
    """Drop the box width suffix ``, f N`` that Pd 0.47+ appends to obj/msg/text boxes."""
    if len(atoms) >= 3 and atoms[-3] == "," and atoms[-2] == "f":
        return atoms[:-3]
    return atoms


def _int(tok: str, what: str) -> int:
    try:
        return int(float(tok))
    except ValueError as e:
        raise ValueError(f"{what}: not a number: {tok!r}") from e


def parse_pd_text(text: str) -> tuple[list[PdObject], list[PdConnection]]:
    """Parse .pd text into its boxes and wires (subpatches included, each its own canvas).

    Raises ValueError for anything Pd would misread: no leading ``#N canvas``, text after
    the last ``;``, an unbalanced ``#X restore``, or a wire to a box or an outlet index
    that does not exist in its canvas (negative outlets/inlets included).
    """
    records = _records(text)
    if not records or not records[0].startswith("#N canvas"):
        raise ValueError("a .pd file starts with '#N canvas'")
    stack: list[_Canvas] = []
    canvases = 0
    objects: list[PdObject] = []
    wires: list[PdConnection] = []

    def add(c: _Canvas, kind: str, cls: str, args: list[str], x: str, y: str) -> None:
        o = PdObject(c.ident, len(c.objects), kind, cls, tuple(args), _int(x, kind), _int(y, kind))
        c.objects.append(o)
        objects.append(o)

    for rec in records:
        atoms = PD_ATOMS.split(rec)
        if len(atoms) < 2:
            raise ValueError(f"record too short: {rec[:60]!r}")
        head, kind = atoms[0], atoms[1]
        if head == "#N" and kind == "canvas":
            stack.append(_Canvas(canvases))
            canvases += 1
        elif head == "#X" and kind == "restore":
            if len(stack) < 2:
                raise ValueError("'#X restore' without an open subpatch")
            stack.pop()
            a = _strip_width(atoms[2:])
            if len(a) < 2:
                raise ValueError(f"bad restore record: {rec[:60]!r}")
            add(stack[-1], "obj", a[2] if len(a) > 2 else "", a[3:], a[0], a[1])
        elif head == "#X" and kind == "connect":
            if not stack:
                raise ValueError("'#X connect' outside a canvas")
            if len(atoms) != 6:
                raise ValueError(f"bad connect record: {rec!r}")
            src, outlet, dst, inlet = (_int(t, "connect") for t in atoms[2:])
            n = len(stack[-1].objects)
            if not (0 <= src < n and 0 <= dst < n) or outlet < 0 or inlet < 0:
                raise ValueError(f"wire to a missing box ({n} in canvas): {rec!r}")
            wires.append(PdConnection(stack[-1].ident, src, outlet, dst, inlet))
        elif head == "#X" and kind in _BOX_KINDS:
            if not stack:
                raise ValueError(f"'#X {kind}' outside a canvas")
            a = _strip_width(atoms[2:]) if kind in ("obj", "msg", "text") else atoms[2:]
            if kind == "array":  # '#X array name size float flags': no coordinates
                add(stack[-1], kind, kind, a, "0", "0")
                continue
            if len(a) < 2:
                raise ValueError(f"box without coordinates: {rec[:60]!r}")
            if kind == "obj":
                add(stack[-1], kind, a[2] if len(a) > 2 else "", a[3:], a[0], a[1])
            else:
                add(stack[-1], kind, kind, a[2:], a[0], a[1])
        elif head in ("#X", "#A", "#N"):
            continue  # coords, declare, array data, struct: not boxes
        else:
            raise ValueError(f"unknown record: {rec[:60]!r}")
    if len(stack) != 1:
        raise ValueError(f"{len(stack) - 1} subpatch(es) never restored")
    return objects, wires


def parse_pd(path: str | Path) -> tuple[list[PdObject], list[PdConnection]]:
    """Parse a .pd file: its boxes (every canvas) and its wires. See :func:`parse_pd_text`."""
    return parse_pd_text(Path(path).read_text(encoding="utf-8"))


def _oscformat_address(args: Sequence[str]) -> tuple[str, str]:
    """``[oscformat -f iii divergent note]`` -> ("/divergent/note", "iii")."""
    a = list(args)
    kinds = ""
    if len(a) >= 2 and a[0] == "-f":
        kinds, a = a[1], a[2:]
    return "/" + "/".join(a), kinds


def _passes(o: PdObject) -> bool:
    """Whether a box passes a parsed OSC message on unchanged (routing continues through)."""
    if o.cls == "list" and o.args[:1] == ("trim",):
        return True
    # a trigger of only anything/list outlets forwards the message on every outlet
    return o.cls in ("t", "trigger") and bool(o.args) and all(x in ("a", "l") for x in o.args)


def osc_usage(path: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The OSC a patch sends and the reply addresses it routes.

    ``sent``: one ``(address, kinds)`` per ``[oscformat]``, kinds being its ``-f`` type
    string (``""`` when it has none: Pd then sends floats and strings as it sees them).
    ``routed``: every address whose ``[route]`` chain after an ``[oscparse]`` reaches a
    consumer (``/divergent/status`` for ``[route divergent] -> [route status] -> [print]``);
    the reject outlets of routes are not addresses and are not followed.
    """
    objects, wires = parse_pd(path)
    by_key = {(o.canvas, o.index): o for o in objects}
    out_wires: dict[tuple[int, int, int], list[PdObject]] = {}
    for w in wires:
        out_wires.setdefault((w.canvas, w.src, w.outlet), []).append(by_key[(w.canvas, w.dst)])

    sent = [_oscformat_address(o.args) for o in objects if o.cls == "oscformat"]
    routed: list[str] = []

    def visit(o: PdObject, prefix: tuple[str, ...], seen: frozenset[tuple[int, int]]) -> None:
        key = (o.canvas, o.index)
        if key in seen:
            return
        seen = seen | {key}
        if o.cls == "route":
            for k, name in enumerate(o.args):
                for nxt in out_wires.get((o.canvas, o.index, k), []):
                    visit(nxt, (*prefix, name), seen)
        elif _passes(o):
            outlets = 1 if o.cls == "list" else len(o.args)
            for k in range(outlets):
                for nxt in out_wires.get((o.canvas, o.index, k), []):
                    visit(nxt, prefix, seen)
        elif prefix:
            address = "/" + "/".join(prefix)
            if address not in routed:
                routed.append(address)

    for o in objects:
        if o.cls == "oscparse":
            for nxt in out_wires.get((o.canvas, o.index, 0), []):
                visit(nxt, (), frozenset({(o.canvas, o.index)}))
    return sent, routed
