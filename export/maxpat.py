"""Read and check Max patcher JSON (``.maxpat``, and the patch inside an ``.amxd``).

Max does not run on Linux, so the patches in ``max_patches/`` are checked as data:
every wire must start at an outlet and end at an inlet that exist, and every box must
declare the inlet/outlet counts that Max itself gives that object with those arguments
(Max recomputes them on load, so a wrong count in the file means a wire drawn to
nowhere, which Max silently drops).

- :func:`load_patcher` reads a file and returns its ``"patcher"`` dict;
- :func:`boxes`, :func:`lines`, :func:`box_class`, :func:`box_args` walk it;
- :data:`MAX_OBJECTS` gives the inlet/outlet counts of every object class the patches
  use, each with the public source it was taken from;
- :func:`check_patch` lists every problem (an empty list means the patch is sound);
- :func:`osc_usage` lists the OSC messages a patch sends to ``[udpsend]`` and the
  addresses it routes from ``[udpreceive]``, for contract tests against ``docs/osc.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from divergent.export.atoms import MAX_ATOMS

__all__ = [
    "MAX_OBJECTS",
    "MaxpatError",
    "ObjectSpec",
    "box_args",
    "box_class",
    "boxes",
    "check_patch",
    "lines",
    "load_patcher",
    "osc_usage",
    "tokenize",
]

Patcher = dict[str, Any]
Box = dict[str, Any]


class MaxpatError(ValueError):
    """A file that is not a Max patcher (bad JSON, or no ``"patcher"`` object)."""


@dataclass(frozen=True)
class ObjectSpec:
    """How many inlets and outlets Max gives an object, as functions of its arguments.

    Counts depend on arguments for some classes (``[route a b]`` has 3 of each), so each
    is a function of the argument tokens; ``source`` names where the count was read.
    """

    inlets: Callable[[Sequence[str]], int]
    outlets: Callable[[Sequence[str]], int]
    source: str


def _n(count: int) -> Callable[[Sequence[str]], int]:
    """A count that does not depend on the arguments."""
    return lambda _args: count


def _args_plus_one(args: Sequence[str]) -> int:
    # route/select: one inlet and one outlet per argument, plus the left inlet and the
    # "no match" outlet; with no argument Max behaves as if given one
    return max(len(args), 1) + 1


def _args_or(default: int) -> Callable[[Sequence[str]], int]:
    """One per argument (pack inlets, unpack/trigger outlets), ``default`` without any."""
    return lambda args: len(args) if args else default


def _gate_outlets(args: Sequence[str]) -> int:
    # [gate N] has N outlets; the first argument is the outlet count (default 1)
    return int(args[0]) if args and args[0].isdigit() else 1


_SAVED = "counts as Max 8 saves them in public .maxpat files"

# Inlet/outlet counts of every class the divergent patches use (Max 8 / Live 11-12).
# Each entry is read from real patches saved by Max (searched in public repositories)
# and, where noted, Cycling '74's reference pages; ``source`` says which.
MAX_OBJECTS: MappingProxyType[str, ObjectSpec] = MappingProxyType(
    {
        # --- network: OSC over UDP (Max's udpsend/udpreceive encode/decode OSC)
        # udpsend host port: 1 inlet, 0 outlets ("udpsend 127.0.0.1 7000" in many patches)
        "udpsend": ObjectSpec(_n(1), _n(0), f"udpsend: {_SAVED}"),
        # udpreceive port: 1 inlet (port/maxpacketsize messages), 1 outlet
        "udpreceive": ObjectSpec(_n(1), _n(1), f"udpreceive: {_SAVED}"),
        # --- message routing
        # route a b: N+1 inlets (each right inlet resets one selector) and N+1 outlets;
        # seen as 2/2 for "route /synth", 3/3 for "route /ipinterfaces /ip", 5/5 for 4 args
        "route": ObjectSpec(_args_plus_one, _args_plus_one, f"route: {_SAVED}"),
        # sel 0 1 2: 4/4 and sel 1 0: 3/3 in Max 7+ files (Max 5 files saved 1 inlet)
        "sel": ObjectSpec(_args_plus_one, _args_plus_one, f"sel: {_SAVED}"),
        "select": ObjectSpec(_args_plus_one, _args_plus_one, f"select: {_SAVED}"),
        # prepend /addr: 1 inlet, 1 outlet ("prepend /load", "prepend set")
        "prepend": ObjectSpec(_n(1), _n(1), f"prepend: {_SAVED}"),
        # unpack 0 0: 1 inlet, one outlet per argument (2 without arguments)
        "unpack": ObjectSpec(_n(1), _args_or(2), f"unpack: {_SAVED}"),
        # pack 0 0 1: one inlet per argument (2 without), 1 outlet ("pak 0. 0. 0." is 3/1)
        "pack": ObjectSpec(_args_or(2), _n(1), f"pack: {_SAVED}"),
        # t b b: 1 inlet, one outlet per argument
        "t": ObjectSpec(_n(1), _args_or(2), f"trigger: {_SAVED}"),
        "trigger": ObjectSpec(_n(1), _args_or(2), f"trigger: {_SAVED}"),
        # gate N: 2 inlets (control, data), N outlets
        "gate": ObjectSpec(_n(2), _gate_outlets, f"gate: {_SAVED}; Max reference (gate)"),
        # change: 1 inlet, 3 outlets ("", int, int)
        "change": ObjectSpec(_n(1), _n(3), f"change: {_SAVED}"),
        # delay ms: 2 inlets (bang/stop, time), 1 outlet
        "delay": ObjectSpec(_n(2), _n(1), f"delay: {_SAVED}"),
        # loadbang: 1 inlet, 1 outlet
        "loadbang": ObjectSpec(_n(1), _n(1), f"loadbang: {_SAVED}"),
        # iter: 1 inlet, 1 outlet (a list out one element at a time; "iter" -> "prepend
        # append" -> umenu is the usual way to fill a menu)
        "iter": ObjectSpec(_n(1), _n(1), f"iter: {_SAVED}"),
        # print name: 1 inlet, 0 outlets
        "print": ObjectSpec(_n(1), _n(0), f"print: {_SAVED}"),
        # --- MIDI
        # midiin [port]: 1 inlet, 1 outlet (raw bytes, int)
        "midiin": ObjectSpec(_n(1), _n(1), f"midiin: {_SAVED}"),
        # midiout [port]: 1 inlet, 0 outlets
        "midiout": ObjectSpec(_n(1), _n(0), f"midiout: {_SAVED}"),
        # notein [port]: 1 inlet, 3 outlets (pitch, velocity, channel)
        "notein": ObjectSpec(_n(1), _n(3), f"notein: {_SAVED}"),
        # noteout [port]: 3 inlets (pitch, velocity, channel), 0 outlets
        "noteout": ObjectSpec(_n(3), _n(0), f"noteout: {_SAVED}"),
        # midiparse: 1 inlet, 8 outlets in Max 8 (7 in Max 5 files); the note list is
        # outlet 0 and the MIDI channel outlet 6 (Max and RNBO reference pages)
        "midiparse": ObjectSpec(_n(1), _n(8), f"midiparse: {_SAVED}; Max reference"),
        # midiformat: 7 inlets (note list, poly pressure, CC, program, aftertouch, bend,
        # channel), 2 outlets in Max 8 (raw bytes, "")
        "midiformat": ObjectSpec(_n(7), _n(2), f"midiformat: {_SAVED}; Max reference"),
        # midiflush: 1 inlet (raw bytes, or bang to send note-offs), 1 outlet
        "midiflush": ObjectSpec(_n(1), _n(1), f"midiflush: {_SAVED}"),
        # --- Max for Live
        # live.thisdevice: 1 inlet, 3 outlets (bang on load, int, int)
        "live.thisdevice": ObjectSpec(_n(1), _n(3), f"live.thisdevice: {_SAVED}"),
        # --- boxes with a maxclass of their own (UI objects, messages, comments)
        # message: 2 inlets (in, set-without-output), 1 outlet
        "message": ObjectSpec(_n(2), _n(1), f"message: {_SAVED}"),
        # comment: 1 inlet (set), 0 outlets
        "comment": ObjectSpec(_n(1), _n(0), f"comment: {_SAVED}"),
        # live.comment: 1/0 ("Fade", "Verbose logging" labels in M4L devices)
        "live.comment": ObjectSpec(_n(1), _n(0), f"live.comment: {_SAVED}"),
        # live.dial: 1 inlet, 2 outlets ("", float)
        "live.dial": ObjectSpec(_n(1), _n(2), f"live.dial: {_SAVED}; Max reference"),
        # live.menu: 1 inlet, 3 outlets (index, item symbol, raw float)
        "live.menu": ObjectSpec(_n(1), _n(3), f"live.menu: {_SAVED}; Max reference"),
        # live.text: 1 inlet, 2 outlets (value or bang, text)
        "live.text": ObjectSpec(_n(1), _n(2), f"live.text: {_SAVED}; Max reference"),
        # flonum / number: 1 inlet, 2 outlets (value, bang on shift-click)
        "flonum": ObjectSpec(_n(1), _n(2), f"flonum: {_SAVED}"),
        "number": ObjectSpec(_n(1), _n(2), f"number: {_SAVED}"),
        # toggle: 1/1 (int); button: 1/1 (bang); led: 1/1 (int)
        "toggle": ObjectSpec(_n(1), _n(1), f"toggle: {_SAVED}"),
        "button": ObjectSpec(_n(1), _n(1), f"button: {_SAVED}"),
        "led": ObjectSpec(_n(1), _n(1), f"led: {_SAVED}"),
        # umenu: 1 inlet, 3 outlets (index, item text, "")
        "umenu": ObjectSpec(_n(1), _n(3), f"umenu: {_SAVED}"),
    }
)

# Classes saved with a maxclass of their own (UI objects, messages, comments); every
# other class is saved as maxclass "newobj" with the class name first in its text.
_BOX_CLASSES = frozenset(
    {
        "message",
        "comment",
        "live.comment",
        "live.dial",
        "live.menu",
        "live.text",
        "flonum",
        "number",
        "toggle",
        "button",
        "led",
        "umenu",
    }
)

_TEXT_CLASSES = frozenset({"newobj", "message", "comment"})
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+\.?\d*[eE][+-]?\d+)$")
_INT_RE = re.compile(r"^[+-]?\d+$")


# ------------------------------------------------------------------------- reading


def load_patcher(path: str | Path) -> Patcher:
    """The ``"patcher"`` object of a ``.maxpat`` file.

    Raises :class:`MaxpatError` when the file is not JSON or has no patcher object.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MaxpatError(f"{p}: not valid JSON ({e})") from e
    return patcher_of(doc, str(p))


def patcher_of(doc: Any, where: str = "document") -> Patcher:
    """The ``"patcher"`` object of a parsed patcher document, checked for shape."""
    if not isinstance(doc, dict) or not isinstance(doc.get("patcher"), dict):
        raise MaxpatError(f'{where}: no top-level "patcher" object')
    patcher: Patcher = doc["patcher"]
    if not isinstance(patcher.get("boxes"), list) or not isinstance(patcher.get("lines"), list):
        raise MaxpatError(f'{where}: the patcher has no "boxes"/"lines" lists')
    return patcher


def boxes(patcher: Patcher) -> list[Box]:
    """The box dicts (the ``"box"`` inside each entry of ``"boxes"``), in file order."""
    return [
        entry["box"] for entry in patcher["boxes"] if isinstance(entry, dict) and "box" in entry
    ]


def lines(patcher: Patcher) -> list[dict[str, Any]]:
    """The patchline dicts (``source``/``destination`` pairs), in file order."""
    return [
        entry["patchline"]
        for entry in patcher["lines"]
        if isinstance(entry, dict) and "patchline" in entry
    ]


def tokenize(text: str) -> list[str]:
    """Split a box's text into Max atoms; ``"double quoted"`` runs are one atom.

    Quotes are removed (``midiout "divergent in"`` gives ``["midiout", "divergent in"]``)
    and a backslash escapes the next character, as in Max's own text format.
    """
    return MAX_ATOMS.split(text)


def box_class(box: Box) -> str:
    """The object class: the first word of a ``newobj``'s text, else the ``maxclass``."""
    if box.get("maxclass") == "newobj":
        atoms = tokenize(str(box.get("text", "")))
        return atoms[0] if atoms else ""
    return str(box.get("maxclass", ""))


def box_args(box: Box) -> list[str]:
    """The arguments of a ``newobj`` (its text after the class name); ``[]`` for others.

    ``@attribute value`` pairs are not arguments and are left out.
    """
    if box.get("maxclass") != "newobj":
        return []
    atoms = tokenize(str(box.get("text", "")))[1:]
    for i, a in enumerate(atoms):
        if a.startswith("@"):
            return atoms[:i]
    return atoms


# ------------------------------------------------------------------------- checking


def _is_rect(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _check_box(box: Box, problems: list[str]) -> None:
    bid = box.get("id", "?")
    maxclass = box.get("maxclass")
    if not isinstance(maxclass, str) or not maxclass:
        problems.append(f"box {bid}: no maxclass")
        return
    for key in ("numinlets", "numoutlets"):
        if not isinstance(box.get(key), int) or isinstance(box.get(key), bool):
            problems.append(f"box {bid}: {key} missing or not an integer")
    if not _is_rect(box.get("patching_rect")):
        problems.append(f"box {bid}: patching_rect is not [x, y, w, h]")
    if maxclass in _TEXT_CLASSES and not isinstance(box.get("text"), str):
        problems.append(f"box {bid} ({maxclass}): no text")
    if maxclass != "newobj" and maxclass not in _BOX_CLASSES:
        problems.append(f"box {bid}: maxclass {maxclass!r} is not in MAX_OBJECTS")
        return
    cls = box_class(box)
    spec = MAX_OBJECTS.get(cls)
    if spec is None:
        problems.append(f"box {bid}: object class {cls!r} is not in MAX_OBJECTS")
        return
    args = box_args(box)
    want_in, want_out = spec.inlets(args), spec.outlets(args)
    if box.get("numinlets") != want_in:
        problems.append(
            f"box {bid} [{cls}]: numinlets {box.get('numinlets')} but Max gives {want_in}"
        )
    if box.get("numoutlets") != want_out:
        problems.append(
            f"box {bid} [{cls}]: numoutlets {box.get('numoutlets')} but Max gives {want_out}"
        )
    outlettype = box.get("outlettype")
    if outlettype is not None and (not isinstance(outlettype, list) or len(outlettype) != want_out):
        problems.append(f"box {bid} [{cls}]: outlettype does not list {want_out} outlets")


def _check_parameters(all_boxes: list[Box], problems: list[str]) -> None:
    """Live parameters: the attributes Live needs, and long names unique in the patch.

    Live finds a stored value by the parameter's long name, so two parameters with one
    long name make Live restore one value into both.
    """
    seen: dict[str, str] = {}
    for box in all_boxes:
        if not str(box.get("maxclass", "")).startswith("live.") or box_class(box) in {
            "live.comment",
            "live.thisdevice",
        }:
            continue
        bid = box.get("id", "?")
        if box.get("parameter_enable") != 1:
            continue
        valueof = box.get("saved_attribute_attributes", {}).get("valueof")
        if not isinstance(valueof, dict):
            problems.append(
                f"box {bid}: parameter_enable 1 but no saved_attribute_attributes.valueof"
            )
            continue
        for key in ("parameter_longname", "parameter_shortname", "parameter_type"):
            if key not in valueof:
                problems.append(f"box {bid}: parameter without {key}")
        name = valueof.get("parameter_longname")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    f"box {bid}: parameter long name {name!r} also used by {seen[name]}"
                )
            seen[name] = str(bid)


def check_patch(patcher: Patcher) -> list[str]:
    """Every problem found in a patcher; an empty list means none.

    Checks each box (class known, inlet/outlet counts as Max gives them, a patching
    rectangle, text where Max needs it, unique ids), each patchline (both ends exist, the
    outlet and inlet indices are in range for those objects, no duplicate wires) and each
    Live parameter (long/short name and type present, long names unique).
    """
    problems: list[str] = []
    all_boxes = boxes(patcher)
    by_id: dict[str, Box] = {}
    for box in all_boxes:
        bid = box.get("id")
        if not isinstance(bid, str) or not bid:
            problems.append(f"box without an id: {box.get('maxclass')!r} {box.get('text', '')!r}")
            continue
        if bid in by_id:
            problems.append(f"duplicate box id {bid}")
        by_id[bid] = box
        _check_box(box, problems)
    _check_parameters(all_boxes, problems)

    seen_wires: set[tuple[str, int, str, int]] = set()
    for n, line in enumerate(lines(patcher)):
        src, dst = line.get("source"), line.get("destination")
        if not (
            isinstance(src, list) and len(src) == 2 and isinstance(dst, list) and len(dst) == 2
        ):
            problems.append(f"line {n}: source/destination is not [id, index]")
            continue
        (sid, outlet), (did, inlet) = src, dst
        where = f"line {n} ({sid}:{outlet} -> {did}:{inlet})"
        if not isinstance(outlet, int) or not isinstance(inlet, int) or outlet < 0 or inlet < 0:
            problems.append(f"{where}: outlet/inlet index is not a non-negative integer")
            continue
        if sid not in by_id:
            problems.append(f"{where}: source box {sid} does not exist")
        elif outlet >= _count(by_id[sid], "outlets"):
            problems.append(
                f"{where}: [{box_class(by_id[sid])}] has {_count(by_id[sid], 'outlets')} "
                f"outlets, no outlet {outlet}"
            )
        if did not in by_id:
            problems.append(f"{where}: destination box {did} does not exist")
        elif inlet >= _count(by_id[did], "inlets"):
            problems.append(
                f"{where}: [{box_class(by_id[did])}] has {_count(by_id[did], 'inlets')} "
                f"inlets, no inlet {inlet}"
            )
        key = (str(sid), outlet, str(did), inlet)
        if key in seen_wires:
            problems.append(f"{where}: duplicate wire")
        seen_wires.add(key)
    return problems


def _count(box: Box, which: str) -> int:
    """Inlets or outlets of a box: Max's count for its class, else what the box says."""
    spec = MAX_OBJECTS.get(box_class(box))
    if spec is not None:
        fn = spec.inlets if which == "inlets" else spec.outlets
        return fn(box_args(box))
    value = box.get("numinlets" if which == "inlets" else "numoutlets")
    return value if isinstance(value, int) else 0


# ------------------------------------------------------------------------- OSC usage


def _atom_kind(atom: str) -> str:
    """OSC type tag Max's udpsend gives a literal atom: i, f or s."""
    if _INT_RE.match(atom):
        return "i"
    if _FLOAT_RE.match(atom):
        return "f"
    return "s"


def _dollar_kind(atom: str) -> str | None:
    """Kind of a ``$1``-style argument: ``$i1`` int, ``$f1`` float, ``$s1`` symbol."""
    m = re.fullmatch(r"\$([ifs]?)(\d)", atom)
    if m is None:
        return None
    return m.group(1) or "?"


class _Graph:
    """The wires of one patcher, indexed for walking upstream."""

    def __init__(self, patcher: Patcher) -> None:
        self.by_id = {str(b.get("id")): b for b in boxes(patcher)}
        self.into: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.wires: list[tuple[str, int, str, int]] = []
        for line in lines(patcher):
            (sid, outlet), (did, inlet) = line["source"], line["destination"]
            self.into.setdefault((str(did), int(inlet)), []).append((str(sid), int(outlet)))
            self.wires.append((str(sid), int(outlet), str(did), int(inlet)))

    def sources(self, box_id: str, inlet: int) -> list[tuple[str, int]]:
        """(box id, outlet) pairs wired into one inlet, in file order."""
        return self.into.get((box_id, inlet), [])

    def kinds(self, box_id: str, outlet: int, depth: int = 0) -> list[list[str]]:
        """Argument kinds that can leave one outlet: one list per possible message.

        Known for the objects the patches use; ``["?"]`` where it cannot be told.
        """
        box = self.by_id.get(box_id)
        if box is None or depth > 8:
            return [["?"]]
        cls = box_class(box)
        args = box_args(box)
        if cls == "live.dial" and outlet == 0:
            valueof = box.get("saved_attribute_attributes", {}).get("valueof", {})
            # parameter_type 1 is int; 0 (float) is the default
            return [["i"]] if valueof.get("parameter_type") == 1 else [["f"]]
        if cls in {"number", "toggle", "led"} and outlet == 0:
            return [["i"]]
        if cls == "flonum" and outlet == 0:
            return [["f"]]
        if cls in {"umenu", "live.menu"}:
            return [["i"]] if outlet == 0 else [["s"]]
        if cls == "pack" and outlet == 0:
            return [[_pack_kind(a) for a in args] if args else ["i", "i"]]
        if cls == "unpack":
            return [[_pack_kind(args[outlet])]] if outlet < len(args) else [["i"]]
        if cls == "notein" or (cls == "midiparse" and outlet == 6):
            return [["i"]]
        if cls == "midiparse" and outlet == 0:
            return [["i", "i"]]
        if cls == "gate":
            # a gate passes on what reaches its data inlet
            out: list[list[str]] = []
            for sid, souts in self.sources(box_id, 1):
                out.extend(self.kinds(sid, souts, depth + 1))
            return out or [["?"]]
        return [["?"]]


def _pack_kind(arg: str) -> str:
    """Kind of a pack/unpack slot from its argument (``0``/``i`` int, ``0.``/``f`` float)."""
    if arg in {"i", "int"}:
        return "i"
    if arg in {"f", "float"}:
        return "f"
    if arg in {"s", "sym", "symbol"}:
        return "s"
    return _atom_kind(arg)


def _message_parts(text: str) -> list[list[str]]:
    """The messages of a message box: comma-separated, each split into atoms."""
    return [tokenize(part) for part in text.split(",") if tokenize(part)]


def osc_usage(patcher: Patcher) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The OSC a patch speaks: (messages sent, addresses routed).

    Messages sent are those reaching a ``[udpsend]`` inlet: a message box gives its
    address and the kinds of its atoms (``i``/``f``/``s``; ``$f1`` as ``f``); a
    ``[prepend /address ...]`` gives its address, its own atoms, then the kinds of
    whatever is wired into it (``f`` from a float ``live.dial`` or ``flonum``, ``i`` from
    an int dial, a number box, a menu index, ``[pack 0 0 1]`` as ``i i i``...), one entry
    per wire; ``?`` where the kind cannot be told. Any other box wired into udpsend is
    reported with the address ``?``. Addresses routed are the selectors of every
    ``[route]`` wired from a ``[udpreceive]``. Both lists are in patch order, without
    duplicates.
    """
    g = _Graph(patcher)
    sent: list[tuple[str, list[str]]] = []
    routed: list[str] = []

    def add(address: str, kinds: list[str]) -> None:
        if (address, kinds) not in sent:
            sent.append((address, kinds))

    for box_id, box in g.by_id.items():
        cls = box_class(box)
        if cls == "udpsend":
            for sid, _souts in g.sources(box_id, 0):
                src = g.by_id.get(sid)
                if src is None:
                    continue
                scls = box_class(src)
                if scls == "message":
                    for atoms in _message_parts(str(src.get("text", ""))):
                        kinds = [(_dollar_kind(a) or _atom_kind(a)) for a in atoms[1:]]
                        add(atoms[0], kinds)
                elif scls == "prepend":
                    pargs = box_args(src)
                    if not pargs:
                        add("?", ["?"])
                        continue
                    own = [_atom_kind(a) for a in pargs[1:]]
                    feeds = g.sources(sid, 0)
                    if not feeds:
                        add(pargs[0], own)
                    for fid, fout in feeds:
                        for kinds in g.kinds(fid, fout):
                            add(pargs[0], own + kinds)
                else:
                    add("?", ["?"])
        elif cls == "udpreceive":
            for sid, _out, did, _in in g.wires:
                if sid == box_id and box_class(g.by_id.get(did, {})) == "route":
                    for sel in box_args(g.by_id[did]):
                        if sel not in routed:
                            routed.append(sel)
    return sent, routed
