"""The front ends and the server agree: every OSC message a patch can send is accepted by
the server's declared address space with the right types, and every reply a patch routes
is one the server sends. Checked against ``server.app``'s declarations themselves, not
against the docs generated from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from divergent.export.maxpat import box_class, boxes, load_patcher, osc_usage, tokenize
from divergent.server.app import REPLIES, Server
from divergent.server.control import Arg, Control, ControlError, controls_of, validate

ROOT = Path(__file__).resolve().parents[2]
MAX_PATCHES = [
    ROOT / "max_patches" / "divergent.maxpat",
    ROOT / "max_patches" / "src" / "divergent_device.maxpat",
]
CONTROLS: dict[str, Control] = {c.address: c for c in controls_of(Server)}
REPLY_ADDRESSES = {r.address for r in REPLIES}


def _example(arg: Arg, kind: str) -> Any:
    """A value of the patch's kind inside the declared range (or a declared choice)."""
    if kind == "s":
        return arg.choices[0] if arg.choices else "take"
    lo = arg.lo if arg.lo is not None else 0
    hi = arg.hi if arg.hi is not None else lo + 1
    value = (lo + hi) / 2
    return float(value) if kind == "f" else round(value)


def _check_sent(address: str, kinds: list[str]) -> None:
    assert address in CONTROLS, f"{address} is not in the server's address space"
    ctrl = CONTROLS[address]
    assert ctrl.min_args <= len(kinds) <= ctrl.max_args, (address, kinds)
    args = [_example(a, k) for a, k in zip(ctrl.args, kinds, strict=False)]
    validate(ctrl, args)  # raises ControlError on a wrong type


def _patch_usages() -> list[tuple[str, list[tuple[str, list[str]]], list[str]]]:
    out = []
    for path in MAX_PATCHES:
        sent, routed = osc_usage(load_patcher(path))
        out.append((path.name, sent, routed))
    from tests.max_patches.pdread import osc_usage as pd_usage

    sent, routed = pd_usage(ROOT / "max_patches" / "divergent.pd")
    out.append(("divergent.pd", sent, routed))
    return out


@pytest.mark.parametrize("name,sent,routed", _patch_usages(), ids=lambda v: str(v)[:30])
def test_every_message_a_patch_sends_is_accepted(
    name: str, sent: list[tuple[str, list[str]]], routed: list[str]
) -> None:
    assert sent, f"{name} sends nothing"
    for address, kinds in sent:
        _check_sent(address, kinds)


@pytest.mark.parametrize("name,sent,routed", _patch_usages(), ids=lambda v: str(v)[:30])
def test_every_reply_a_patch_routes_is_sent_by_the_server(
    name: str, sent: list[tuple[str, list[str]]], routed: list[str]
) -> None:
    assert "/divergent/status" in routed, f"{name} must follow the heartbeat"
    for address in routed:
        assert address in REPLY_ADDRESSES, f"{name} routes {address}, which the server never sends"


@pytest.mark.parametrize("path", MAX_PATCHES, ids=lambda p: p.name)
def test_literal_messages_in_max_patches_validate_exactly(path: Path) -> None:
    """Message boxes with fixed values (``/divergent/mode jam``) are valid as written."""
    checked = 0
    for box in boxes(load_patcher(path)):
        if box_class(box) != "message":
            continue
        for part in str(box.get("text", "")).split(","):
            words = tokenize(part.strip())
            if not words or not words[0].startswith("/divergent/"):
                continue
            if any("$" in w for w in words[1:]):
                continue  # filled in at run time: covered by the kinds test
            ctrl = CONTROLS.get(words[0])
            assert ctrl is not None, f"{path.name}: {words[0]} unknown to the server"
            args: list[Any] = []
            for w, a in zip(words[1:], ctrl.args, strict=False):
                args.append(float(w) if a.type == "f" else int(w) if a.type == "i" else w)
            try:
                validate(ctrl, args)
            except ControlError as e:
                pytest.fail(f"{path.name}: `{part.strip()}` is refused: {e}")
            checked += 1
    assert checked > 0
