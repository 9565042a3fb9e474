"""The Max patches in max_patches/: sound wiring, known objects, Live parameters, OSC contract."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from divergent.export.maxpat import (
    MAX_OBJECTS,
    MaxpatError,
    box_args,
    box_class,
    boxes,
    check_patch,
    lines,
    load_patcher,
    osc_usage,
    tokenize,
)
from divergent.model.generate import CONCEPT_STRENGTH, CONCEPT_STRENGTHS

REPO = Path(__file__).resolve().parents[2]
CONTROL_SURFACE = REPO / "max_patches" / "divergent.maxpat"
DEVICE_SOURCE = REPO / "max_patches" / "src" / "divergent_device.maxpat"
PATCHES = [CONTROL_SURFACE, DEVICE_SOURCE]
OSC_DOC = REPO / "docs" / "osc.md"

# the dial ranges the server declares (docs/osc.md), by Live parameter long name
DIAL_RANGES = {
    "Divergence": (0.0, 1.0, 0),
    "Temperature": (0.05, 2.0, 0),
    "Bars": (1.0, 16.0, 1),
    "Concept Strength": (*CONCEPT_STRENGTHS, 0),
}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(params=PATCHES, ids=_ids(PATCHES))
def patcher(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_patcher(request.param)


# ----------------------------------------------------------------- docs/osc.md, parsed here


def _osc_doc() -> dict[str, dict[str, list[tuple[str, str, bool, list[str]]]]]:
    """{"in"|"out": {address: [(name, type, optional, choices), ...]}} from the tables.

    Written independently of export.maxpat so the contract does not test itself.
    """
    out: dict[str, dict[str, list[tuple[str, str, bool, list[str]]]]] = {"in": {}, "out": {}}
    section = ""
    for line in OSC_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = "in" if "(in)" in line else "out" if "(out)" in line else ""
            continue
        m = re.match(r"^\| `(/[^`]+)` \| (.*?) \| .* \|$", line)
        if not m or not section:
            continue
        address, arg_cell = m.groups()
        args = []
        for item in arg_cell.split("<br>"):
            a = re.match(r"^(\[?)`(\w+)` ([ifs])(?::\s*([^|]+))?", item.strip())
            if a:
                choices = [c.strip() for c in a.group(4).split(",")] if a.group(4) else []
                args.append((a.group(2), a.group(3), a.group(1) == "[", choices))
        out[section][address] = args
    return out


def test_osc_doc_parses() -> None:
    doc = _osc_doc()
    assert "/divergent/divergence" in doc["in"] and "/divergent/status" in doc["out"]
    assert doc["in"]["/divergent/note"][2][2] is True  # [channel] is optional
    assert doc["in"]["/divergent/mode"][0][3] == ["call", "jam", "off"]


# ----------------------------------------------------------------- structure


def test_valid_max8_patcher_json(patcher: dict[str, Any]) -> None:
    assert patcher["appversion"]["major"] == 8
    assert patcher["boxes"] and patcher["lines"]
    for box in boxes(patcher):
        for key in ("maxclass", "numinlets", "numoutlets", "id", "patching_rect"):
            assert key in box, (box.get("id"), key)
        if box["maxclass"] in {"newobj", "message", "comment"}:
            assert isinstance(box["text"], str)


def test_check_patch_finds_no_problem(patcher: dict[str, Any]) -> None:
    assert check_patch(patcher) == []


def test_every_class_is_in_the_table(patcher: dict[str, Any]) -> None:
    used = {box_class(b) for b in boxes(patcher)}
    assert used <= set(MAX_OBJECTS), used - set(MAX_OBJECTS)


def test_every_table_entry_names_its_source() -> None:
    for name, spec in MAX_OBJECTS.items():
        assert spec.source, name
    with pytest.raises(TypeError):
        MAX_OBJECTS["x"] = MAX_OBJECTS["route"]  # type: ignore[index]


def test_argument_dependent_counts() -> None:
    route = MAX_OBJECTS["route"]
    assert (route.inlets(["/a"]), route.outlets(["/a"])) == (2, 2)
    assert route.outlets(["/a", "/b", "/c", "/d", "/e"]) == 6
    assert MAX_OBJECTS["sel"].inlets(["0", "1", "2"]) == 4
    assert MAX_OBJECTS["unpack"].outlets(["s", "0.", "s"]) == 3
    assert MAX_OBJECTS["pack"].inlets(["0", "0", "1"]) == 3
    assert MAX_OBJECTS["midiparse"].outlets([]) == 8


def test_tokenize_keeps_quoted_port_names() -> None:
    assert tokenize('midiout "divergent in"') == ["midiout", "divergent in"]
    assert tokenize("route /a  /b") == ["route", "/a", "/b"]
    assert tokenize(r"a\ b c") == ["a b", "c"]


def _broken(patcher: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(patcher)


def test_broken_copies_are_caught(patcher: dict[str, Any]) -> None:
    first, second = boxes(patcher)[0]["id"], boxes(patcher)[1]["id"]

    p = _broken(patcher)
    p["lines"].append({"patchline": {"source": [first, 0], "destination": ["obj-missing", 0]}})
    assert any("obj-missing does not exist" in s for s in check_patch(p))

    p = _broken(patcher)
    src = lines(p)[0]["source"]
    src[1] = 99
    assert any("no outlet 99" in s for s in check_patch(p))

    p = _broken(patcher)
    lines(p)[0]["destination"][1] = 42
    assert any("no inlet 42" in s for s in check_patch(p))

    p = _broken(patcher)
    udp = next(b for b in boxes(p) if box_class(b) == "udpreceive")
    udp["numoutlets"] = 3
    assert any("numoutlets 3 but Max gives 1" in s for s in check_patch(p))

    p = _broken(patcher)
    p["boxes"].append(
        {
            "box": {
                "id": "obj-x",
                "maxclass": "newobj",
                "text": "frobnicate 1",
                "numinlets": 1,
                "numoutlets": 1,
                "patching_rect": [0, 0, 50, 22],
            }
        }
    )
    assert any("'frobnicate' is not in MAX_OBJECTS" in s for s in check_patch(p))

    p = _broken(patcher)
    boxes(p)[1]["id"] = first
    assert any(f"duplicate box id {first}" in s for s in check_patch(p))
    assert second  # the second box existed before it was renamed

    p = _broken(patcher)
    p["lines"].append(copy.deepcopy(p["lines"][0]))
    assert any("duplicate wire" in s for s in check_patch(p))


def test_duplicate_parameter_long_names_are_caught(patcher: dict[str, Any]) -> None:
    p = _broken(patcher)
    dials = [b for b in boxes(p) if b["maxclass"] == "live.dial"]
    assert len(dials) >= 2
    name = dials[0]["saved_attribute_attributes"]["valueof"]["parameter_longname"]
    dials[1]["saved_attribute_attributes"]["valueof"]["parameter_longname"] = name
    assert any(f"long name {name!r} also used" in s for s in check_patch(p))


def test_load_patcher_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.maxpat"
    bad.write_text("{not json")
    with pytest.raises(MaxpatError, match="not valid JSON"):
        load_patcher(bad)
    bad.write_text(json.dumps({"boxes": []}))
    with pytest.raises(MaxpatError, match="patcher"):
        load_patcher(bad)


# ----------------------------------------------------------------- Live parameters


def _params(patcher: dict[str, Any], maxclass: str) -> dict[str, tuple[dict[str, Any], Any]]:
    out = {}
    for b in boxes(patcher):
        if b["maxclass"] == maxclass:
            assert b.get("parameter_enable") == 1, b["id"]
            valueof = b["saved_attribute_attributes"]["valueof"]
            out[valueof["parameter_longname"]] = (valueof, b)
    return out


def test_live_dials_have_parameters_and_ranges(patcher: dict[str, Any]) -> None:
    dials = _params(patcher, "live.dial")
    assert {"Divergence", "Temperature"} <= set(dials)
    for name, (valueof, _box) in dials.items():
        lo, hi, ptype = DIAL_RANGES[name]
        assert valueof["parameter_mmin"] == lo and valueof["parameter_mmax"] == hi, name
        assert valueof["parameter_type"] == ptype, name
        assert valueof["parameter_shortname"]
        assert lo <= valueof["parameter_initial"][0] <= hi


def test_device_parameters_match_the_server_defaults() -> None:
    device = load_patcher(DEVICE_SOURCE)
    dials = _params(device, "live.dial")
    assert set(dials) == {"Divergence", "Temperature", "Bars", "Concept Strength"}
    initial = {name: v["parameter_initial"][0] for name, (v, _b) in dials.items()}
    assert initial == {
        "Divergence": 0.0,
        "Temperature": 1.0,
        "Bars": 4.0,
        "Concept Strength": CONCEPT_STRENGTH,
    }
    assert all(v["parameter_initial_enable"] == 1 for v, _b in dials.values())
    menus = _params(device, "live.menu")
    mode = menus["Mode"][0]
    assert mode["parameter_enum"] == ["call", "jam", "off"] and mode["parameter_type"] == 2
    assert mode["parameter_mmax"] == 2
    buttons = _params(device, "live.text")
    assert set(buttons) == {"Generate", "Stop"}
    assert all(b.get("mode") == 0 for _v, b in buttons.values())  # button, not toggle
    # what Live shows in the device view
    for b in boxes(device):
        if b["maxclass"].startswith("live.") and b["maxclass"] != "live.comment":
            assert b.get("presentation") == 1, b["id"]
    assert device["openinpresentation"] == 1


# ----------------------------------------------------------------- OSC contract


def _compatible(sent: str, declared: str) -> bool:
    # docs/osc.md: a float argument also takes an integer
    return sent == declared or (declared == "f" and sent == "i")


def test_sent_addresses_and_types_are_in_the_doc(patcher: dict[str, Any]) -> None:
    doc = _osc_doc()
    sent, _routed = osc_usage(patcher)
    assert sent
    for address, kinds in sent:
        assert address in doc["in"], address
        declared = doc["in"][address]
        required = [a for a in declared if not a[2]]
        assert len(required) <= len(kinds) <= len(declared), (address, kinds)
        for kind, (name, typ, _opt, _choices) in zip(kinds, declared, strict=False):
            assert _compatible(kind, typ), (address, name, kind, typ)


def test_string_literals_are_declared_choices(patcher: dict[str, Any]) -> None:
    doc = _osc_doc()
    checked = 0
    for b in boxes(patcher):
        if b["maxclass"] != "message" or not b["text"].startswith("/divergent/"):
            continue
        atoms = tokenize(b["text"])
        for value, (_name, typ, _opt, choices) in zip(atoms[1:], doc["in"][atoms[0]], strict=False):
            if typ == "s" and choices:
                assert value in choices, (atoms[0], value)
                checked += 1
    assert checked >= 3


def test_routed_addresses_are_replies_in_the_doc(patcher: dict[str, Any]) -> None:
    doc = _osc_doc()
    _sent, routed = osc_usage(patcher)
    assert "/divergent/status" in routed
    assert set(routed) <= set(doc["out"]), set(routed) - set(doc["out"])


def test_control_surface_covers_the_brief() -> None:
    p = load_patcher(CONTROL_SURFACE)
    sent, routed = osc_usage(p)
    addresses = {a for a, _k in sent}
    assert {
        "/divergent/divergence",
        "/divergent/temperature",
        "/divergent/bars",
        "/divergent/mode",
        "/divergent/tempo",
        "/divergent/clock",
        "/divergent/quantize",
        "/divergent/generate",
        "/divergent/stop",
        "/divergent/record/start",
        "/divergent/record/stop",
        "/divergent/ping",
        "/divergent/status",
        "/divergent/concept",
        "/divergent/concepts",
        "/divergent/concept/strength",
        "/divergent/concept/learn",
    } <= addresses
    assert ("/divergent/divergence", ["f"]) in sent and ("/divergent/temperature", ["f"]) in sent
    assert ("/divergent/concept/strength", ["f"]) in sent
    assert ("/divergent/concept/learn", ["s", "f"]) in sent
    assert routed == [
        "/divergent/status",
        "/divergent/answer",
        "/divergent/error",
        "/divergent/pong",
        "/divergent/out/note",
        "/divergent/concept",
        "/divergent/concepts",
        "/divergent/concept/learned",
    ]
    texts = {b.get("text") for b in boxes(p)}
    assert {"udpsend 127.0.0.1 9000", "udpreceive 9001", "delay 2500"} <= texts
    assert 'midiout "divergent in"' in texts and 'midiin "divergent out"' in texts
    answer = next(b for b in boxes(p) if box_class(b) == "unpack" and len(box_args(b)) == 8)
    assert box_args(answer) == ["0", "0.", "0.", "0.", "0.", "0", "0.", "0."]  # i f f f f i f f


def _reaches(p: dict[str, Any], start: tuple[str, int], target_class: str) -> bool:
    """Whether messages leaving one outlet can reach a box of ``target_class``."""
    by_id = {b["id"]: b for b in boxes(p)}
    out: dict[tuple[str, int], list[str]] = {}
    for line in lines(p):
        sid, outlet = line["source"]
        out.setdefault((sid, outlet), []).append(line["destination"][0])
    todo, seen = list(out.get(start, [])), set()
    while todo:
        bid = todo.pop()
        if bid in seen:
            continue
        seen.add(bid)
        if box_class(by_id[bid]) == target_class:
            return True
        for o in range(by_id[bid]["numoutlets"]):
            todo.extend(out.get((bid, o), []))
    return False


def test_device_passes_midi_through_and_plays_answers() -> None:
    p = load_patcher(DEVICE_SOURCE)
    by_class = {box_class(b): b for b in boxes(p)}
    midiin, midiout = by_class["midiin"]["id"], by_class["midiout"]["id"]
    assert any(
        line["source"] == [midiin, 0] and line["destination"] == [midiout, 0] for line in lines(p)
    ), "the track's MIDI must pass straight through"
    assert _reaches(p, (midiin, 0), "udpsend")  # notes out over OSC
    (route,) = (b for b in boxes(p) if "/divergent/out/note" in box_args(b))
    out_note = box_args(route).index("/divergent/out/note")
    assert _reaches(p, (route["id"], out_note), "midiout")  # answers back into the track
    sent, routed = osc_usage(p)
    assert ("/divergent/note", ["i", "i", "i"]) in sent
    assert "/divergent/out/note" in routed


def test_osc_usage_infers_argument_kinds() -> None:
    def box(bid: str, maxclass: str, text: str = "", **kw: Any) -> dict[str, Any]:
        b = {
            "id": bid,
            "maxclass": maxclass,
            "numinlets": 1,
            "numoutlets": 1,
            "patching_rect": [0, 0, 10, 10],
            **kw,
        }
        if text:
            b["text"] = text
        return {"box": b}

    def wire(a: str, b: str) -> dict[str, Any]:
        return {"patchline": {"source": [a, 0], "destination": [b, 0]}}

    int_dial = {"valueof": {"parameter_type": 1}}
    p = {
        "boxes": [
            box("u", "newobj", "udpsend 127.0.0.1 9000"),
            box("d", "live.dial", saved_attribute_attributes=int_dial),
            box("p", "newobj", "prepend /x/int"),
            box("f", "flonum"),
            box("q", "newobj", "prepend /x/float 1"),
            box("m", "message", "/x/msg $f1 2 two 3.5, /x/bare"),
            box("n", "number"),
            box("r", "udpreceive", ""),
            box("rt", "newobj", "route /x/a /x/b"),
        ],
        "lines": [
            wire("d", "p"),
            wire("p", "u"),
            wire("f", "q"),
            wire("q", "u"),
            wire("m", "u"),
            wire("n", "u"),
        ],
    }
    p["boxes"][7]["box"].update(maxclass="newobj", text="udpreceive 9001")
    p["lines"].append(wire("r", "rt"))
    sent, routed = osc_usage(p)
    assert sent == [
        ("/x/int", ["i"]),
        ("/x/float", ["i", "f"]),
        ("/x/msg", ["f", "i", "s", "f"]),
        ("/x/bare", []),
        ("?", ["?"]),
    ]
    assert routed == ["/x/a", "/x/b"]
