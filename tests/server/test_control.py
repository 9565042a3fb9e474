"""The control declarations: validation rules, collection, dispatch and the generated docs."""

from __future__ import annotations

import math
from typing import Any

import pytest

from divergent.server.control import (
    Arg,
    Control,
    ControlError,
    Reply,
    control,
    controls_of,
    dispatch,
    generate_osc_doc,
    validate,
)


class Sample:
    """A small stand-in for the server: one control of each kind."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    @control(
        "/divergent/divergence",
        Arg("value", "f", lo=0.0, hi=1.0, clamp=True),
        doc="The divergence knob d: 0 plays like the training data, 1 strays furthest.",
    )
    def _set_divergence(self, value: float) -> None:
        self.calls.append(("divergence", (value,)))

    @control("/divergent/bars", Arg("bars", "i", lo=1, hi=16, clamp=True), doc="Bars per answer.")
    def _set_bars(self, bars: int) -> None:
        self.calls.append(("bars", (bars,)))

    @control(
        "/divergent/mode", Arg("mode", "s", choices=("call", "jam", "off")), doc="call | jam | off"
    )
    def _set_mode(self, mode: str) -> None:
        self.calls.append(("mode", (mode,)))

    @control("/divergent/record/start", Arg("name", "s", optional=True), doc="Start a take.")
    def _record_start(self, name: str | None = None) -> None:
        self.calls.append(("record", (name,)))

    @control(
        "/divergent/note",
        Arg("pitch", "i", lo=0, hi=127),
        Arg("velocity", "i", lo=0, hi=127),
        Arg("channel", "i", lo=1, hi=16, optional=True),
        doc="Play a note\n(velocity 0 is note off).",
    )
    def _note(self, pitch: int, velocity: int, channel: int = 1) -> None:
        self.calls.append(("note", (pitch, velocity, channel)))

    @control("/divergent/ping", doc="Replies /divergent/pong.")
    @control("/divergent/hello", doc="Same as ping.")
    def _ping(self) -> None:
        self.calls.append(("ping", ()))

    @control(
        "/divergent/chord",
        Arg("pitches", "i", lo=0, hi=127, repeat=True),
        doc="Any number of pitches.",
    )
    def _chord(self, *pitches: int) -> None:
        self.calls.append(("chord", pitches))

    @control("/divergent/gain", Arg("db", "f", hi=0.0, clamp=True), doc="At most 0 dB.")
    def _gain(self, db: float) -> None:
        self.calls.append(("gain", (db,)))

    def not_a_control(self) -> None:
        """Undecorated methods are ignored."""


SAMPLE_REPLIES = (
    Reply("/divergent/pong", (("version", "s"),), doc="Answer to /divergent/ping."),
    Reply(
        "/divergent/out/note",
        (Arg("pitch", "i", lo=0, hi=127), ("velocity", "i")),
        doc="Every machine note | as it sounds.",
    ),
)


def ctrl(address: str) -> Control:
    return next(c for c in controls_of(Sample) if c.address == address)


# --- declarations and collection -----------------------------------------------------------


def test_controls_are_collected_in_definition_order() -> None:
    got = [(c.address, c.handler) for c in controls_of(Sample())]
    assert got == [
        ("/divergent/divergence", "_set_divergence"),
        ("/divergent/bars", "_set_bars"),
        ("/divergent/mode", "_set_mode"),
        ("/divergent/record/start", "_record_start"),
        ("/divergent/note", "_note"),
        # stacked decorators keep their reading order
        ("/divergent/ping", "_ping"),
        ("/divergent/hello", "_ping"),
        ("/divergent/chord", "_chord"),
        ("/divergent/gain", "_gain"),
    ]
    assert controls_of(Sample) == controls_of(Sample())


def test_param_topic_and_counts() -> None:
    c = ctrl("/divergent/record/start")
    assert c.param == "record/start"
    assert c.mqtt_topic("studio") == "divergent/studio/control/record/start"
    assert (c.min_args, c.max_args) == (0, 1)
    assert (ctrl("/divergent/note").min_args, ctrl("/divergent/note").max_args) == (2, 3)
    assert ctrl("/divergent/chord").max_args is None
    assert ctrl("/divergent/note").doc == "Play a note\n(velocity 0 is note off)."


def test_subclass_overrides() -> None:
    class Louder(Sample):
        @control("/divergent/bars", Arg("bars", "i", lo=1, hi=32), doc="Up to 32.")
        def _set_bars(self, bars: int) -> None:
            self.calls.append(("bars32", (bars,)))

        def _set_mode(self, mode: str) -> None:  # undecorated override: no longer a control
            pass

    addresses = [c.address for c in controls_of(Louder)]
    assert "/divergent/mode" not in addresses
    assert ctrl("/divergent/bars").args[0].hi == 16
    assert next(c for c in controls_of(Louder) if c.address == "/divergent/bars").args[0].hi == 32
    assert addresses.count("/divergent/bars") == 1
    assert addresses[:2] == ["/divergent/divergence", "/divergent/bars"]  # the base's place


def test_two_handlers_for_one_address_is_an_error() -> None:
    class Twice:
        @control("/divergent/x", doc="one")
        def a(self) -> None: ...

        @control("/divergent/x", doc="two")
        def b(self) -> None: ...

    with pytest.raises(TypeError, match="both a and b"):
        controls_of(Twice)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Arg("x", "d"), "type must be"),  # type: ignore[arg-type]
        (lambda: Arg("x", "s", lo=0), "no range"),
        (lambda: Arg("x", "f", clamp=True), "clamp needs"),
        (lambda: Arg("x", "f", lo=2, hi=1), "lo > hi"),
        (lambda: Arg("x", "i", choices=("a",)), "choices must be integers"),
        (lambda: Arg("x", "s", choices=()), "choices must be strings"),
        (lambda: Control("/other/x", (), "", "h"), "must look like /divergent/"),
        (lambda: Control("/divergent/", (), "", "h"), "must look like"),
        (lambda: Control("/divergent/a*", (), "", "h"), "pattern characters"),
        (
            lambda: Control("/divergent/x", (Arg("a", "i", optional=True), Arg("b", "i")), "", "h"),
            "follows an optional",
        ),
        (
            lambda: Control("/divergent/x", (Arg("a", "i", repeat=True), Arg("b", "i")), "", "h"),
            "only the last",
        ),
        (lambda: Control("/divergent/x", (Arg("a", "i"), Arg("a", "i")), "", "h"), "repeat"),
        (lambda: Reply("/divergent/x", (("a", "q"),)), "type must be"),
    ],
)
def test_bad_declarations_fail_at_definition(make: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make()


def test_handler_signature_must_match_the_declaration() -> None:
    with pytest.raises(TypeError, match="do not match"):

        class Swapped:
            @control("/divergent/n", Arg("pitch", "i"), Arg("velocity", "i"), doc="")
            def n(self, velocity: int, pitch: int) -> None: ...

    with pytest.raises(TypeError, match="needs a default"):

        class NoDefault:
            @control("/divergent/n", Arg("name", "s", optional=True), doc="")
            def n(self, name: str) -> None: ...

    with pytest.raises(TypeError, match="no control argument"):

        class Extra:
            @control("/divergent/n", doc="")
            def n(self, surprise: int) -> None: ...


# --- validate ------------------------------------------------------------------------------

NAN = float("nan")

# (address, args, expected values or None, expected warning/error fragment)
CASES: list[tuple[str, list[object], list[object] | None, str | None]] = [
    # floats: float and int accepted, converted to float
    ("/divergent/divergence", [0.5], [0.5], None),
    ("/divergent/divergence", [1], [1.0], None),
    ("/divergent/divergence", [0], [0.0], None),
    # clamped, with a warning naming the address, the value and the result
    (
        "/divergent/divergence",
        [1.5],
        [1.0],
        "/divergent/divergence: value 1.5 is out of range 0..1: clamped to 1.0 (applied)",
    ),
    ("/divergent/divergence", [-3], [0.0], "clamped to 0.0"),
    ("/divergent/gain", [6.0], [0.0], "out of range <= 0: clamped to 0.0"),
    ("/divergent/gain", [-60.0], [-60.0], None),
    # NaN, infinities, bool, None, bytes, lists and strings refused for numbers
    ("/divergent/divergence", [NAN], None, "finite"),
    ("/divergent/divergence", [math.inf], None, "finite"),
    ("/divergent/divergence", [-math.inf], None, "finite"),
    ("/divergent/divergence", [True], None, "must be a float"),
    ("/divergent/divergence", [None], None, "must be a float"),
    ("/divergent/divergence", [b"\x00"], None, "must be a float"),
    ("/divergent/divergence", [[0.5]], None, "must be a float"),
    ("/divergent/divergence", ["0.5"], None, "must be a float"),
    # ints: integral floats accepted (Max dials send floats), others refused
    ("/divergent/bars", [4], [4], None),
    ("/divergent/bars", [4.0], [4], None),
    ("/divergent/bars", [4.5], None, "whole number"),
    ("/divergent/bars", [False], None, "must be an integer"),
    ("/divergent/bars", [NAN], None, "finite"),
    ("/divergent/bars", [40], [16], "clamped to 16 (applied)"),
    ("/divergent/bars", [0.0], [1], "clamped to 1"),
    # refused out of range when not clamped
    ("/divergent/note", [128, 100], None, "pitch is out of range 0..127, got 128 (rejected)"),
    ("/divergent/note", [60, -1], None, "velocity is out of range"),
    ("/divergent/note", [60, 100, 17], None, "channel is out of range 1..16"),
    # counts: optional may be left off, missing and extra refused
    ("/divergent/note", [60, 100], [60, 100], None),
    ("/divergent/note", [60.0, 100, 2.0], [60, 100, 2], None),
    (
        "/divergent/note",
        [60],
        None,
        "takes `pitch` i 0..127 (else refused) `velocity` i 0..127 "
        "(else refused) [`channel` i 1..16 (else refused)]; "
        "got 1 argument (rejected)",
    ),
    ("/divergent/note", [60, 100, 1, 1], None, "got 4 arguments"),
    ("/divergent/ping", [], [], None),
    ("/divergent/ping", [1], None, "takes no arguments; got 1 argument"),
    ("/divergent/record/start", [], [], None),
    ("/divergent/record/start", ["take one"], ["take one"], None),
    ("/divergent/record/start", [1], None, "must be a string"),
    # choices: case-insensitive, canonical spelling returned
    ("/divergent/mode", ["jam"], ["jam"], None),
    ("/divergent/mode", ["JAM"], ["jam"], None),
    ("/divergent/mode", ["loud"], None, "mode must be one of call, jam, off, got 'loud'"),
    ("/divergent/mode", [1], None, "must be a string"),
    # repeat: zero or more, each checked
    ("/divergent/chord", [], [], None),
    ("/divergent/chord", [60, 64.0, 67], [60, 64, 67], None),
    ("/divergent/chord", [60, 200], None, "pitches is out of range"),
]


@pytest.mark.parametrize(
    ("address", "args", "values", "message"),
    CASES,
    ids=[f"{a.rsplit('/', 1)[1]}-{args!r}" for a, args, _, _ in CASES],
)
def test_validate(
    address: str, args: list[object], values: list[object] | None, message: str | None
) -> None:
    c = ctrl(address)
    if values is None:
        with pytest.raises(ControlError) as info:
            validate(c, args)
        assert message is not None and message in str(info.value)
        assert info.value.address == address and not info.value.clamped
        assert str(info.value).endswith("(rejected)")
        return
    got, warning = validate(c, args)
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]
    if message is None:
        assert warning is None
    else:
        assert warning is not None and message in warning


def test_two_clamps_give_one_warning() -> None:
    c = Control(
        "/divergent/xy",
        (Arg("x", "f", lo=0, hi=1, clamp=True), Arg("y", "f", lo=0, hi=1, clamp=True)),
        "",
        "h",
    )
    values, warning = validate(c, [2.0, -1.0])
    assert values == [1.0, 0.0]
    assert warning is not None and "x 2.0" in warning and "y -1.0" in warning


def test_control_error_fields() -> None:
    e = ControlError("/divergent/x", "too loud", clamped=True)
    assert (e.address, e.reason, e.clamped) == ("/divergent/x", "too loud", True)
    assert str(e) == "/divergent/x: too loud"
    assert isinstance(e, ValueError)


# --- dispatch ------------------------------------------------------------------------------


def test_dispatch_calls_the_bound_handler() -> None:
    s = Sample()
    by_address = {c.address: c for c in controls_of(s)}
    assert dispatch(s, by_address, "/divergent/divergence", [0.25]) is None
    assert dispatch(s, controls_of(s), "/divergent/note", [60.0, 90]) is None  # a list works too
    warning = dispatch(s, by_address, "/divergent/bars", [99])
    assert warning is not None and "clamped to 16" in warning
    dispatch(s, by_address, "/divergent/hello", [])
    dispatch(s, by_address, "/divergent/chord", [60, 64])
    assert s.calls == [
        ("divergence", (0.25,)),
        ("note", (60, 90, 1)),  # the handler's default channel
        ("bars", (16,)),  # clamped values are applied
        ("ping", ()),
        ("chord", (60, 64)),
    ]


def test_dispatch_refuses_before_calling() -> None:
    s = Sample()
    by_address = {c.address: c for c in controls_of(s)}
    with pytest.raises(ControlError, match=r"unknown address \(did you mean /divergent/divergence"):
        dispatch(s, by_address, "/divergent/divergance", [0.5])
    with pytest.raises(ControlError, match="unknown address"):
        dispatch(s, controls_of(s), "/elsewhere", [])
    with pytest.raises(ControlError):
        dispatch(s, by_address, "/divergent/mode", ["loud"])
    assert s.calls == []


def test_handler_exceptions_propagate() -> None:
    class Broken:
        @control("/divergent/x", doc="")
        def x(self) -> None:
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        dispatch(Broken(), controls_of(Broken), "/divergent/x", [])


# --- documentation -------------------------------------------------------------------------


def test_reply_declarations() -> None:
    r = SAMPLE_REPLIES[1]
    assert [(a.name, a.type) for a in r.args] == [("pitch", "i"), ("velocity", "i")]
    assert SAMPLE_REPLIES[0] == Reply(
        "/divergent/pong", [Arg("version", "s")], doc="Answer to /divergent/ping."
    )


def test_osc_doc_is_deterministic_and_complete() -> None:
    doc = generate_osc_doc(controls_of(Sample), SAMPLE_REPLIES)
    assert doc == generate_osc_doc(controls_of(Sample()), SAMPLE_REPLIES)
    lines = doc.splitlines()
    for c in controls_of(Sample):
        row = next(line for line in lines if line.startswith(f"| `{c.address}` |"))
        for a in c.args:
            assert f"`{a.name}`" in row
    for r in SAMPLE_REPLIES:
        assert any(line.startswith(f"| `{r.address}` |") for line in lines)
    # ranges, clamping and choices are spelled out; table cells stay on one line
    assert "`value` f 0..1 (clamped)" in doc
    assert "`pitch` i 0..127 (else refused)" in doc
    assert "[`channel` i 1..16 (else refused)]" in doc
    assert "`mode` s: call, jam, off" in doc
    assert "`pitches` i 0..127 (else refused) …" in doc
    assert "`db` f <= 0 (clamped)" in doc
    assert "| `pitch` i 0..127<br>`velocity` i |" in doc  # replies: no clamp/refuse note
    assert "| Play a note (velocity 0 is note off). |" in doc
    assert "call \\| jam \\| off" in doc and "Every machine note \\| as it sounds." in doc
    # the order is the declaration order: controls in, then replies out, then MQTT
    assert doc.index("## Controls (in)") < doc.index("## Replies (out)") < doc.index("## MQTT")
    assert doc.index("`/divergent/divergence`") < doc.index("`/divergent/gain`")
    assert "divergent/<instance>/control/<param>" in doc
    assert "`/divergent/divergence` is `divergent/default/control/divergence`" in doc
    # every table row has the same number of cells as its header
    for line in lines:
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 4, line
    assert doc.endswith("\n") and not doc.endswith("\n\n")


def test_osc_doc_without_controls() -> None:
    doc = generate_osc_doc([], [], osc_port=9100, osc_reply="10.0.0.2:9200")
    assert "default 9100" in doc and "default 10.0.0.2:9200" in doc
    assert "For example" not in doc
