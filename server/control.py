"""The control address space, declared by the handlers themselves.

A server method becomes an OSC (and MQTT) control by decorating it::

    @control("/divergent/divergence", Arg("value", "f", lo=0.0, hi=1.0, clamp=True),
             doc="The divergence knob d.")
    def _set_divergence(self, value: float) -> None: ...

The declaration is the single source of truth: :func:`validate` checks incoming values
against it, :func:`dispatch` routes a message to its method, and :func:`generate_osc_doc`
writes ``docs/osc.md`` from it, so the documentation cannot drift from the code.
Outgoing messages are declared as :class:`Reply` objects for the same documentation.

Type rules (what a peer may send for each declared type):

- ``"f"``: an int or a float (OSC ``i``, ``h``, ``f`` or ``d``); NaN and infinities are
  rejected.
- ``"i"``: an int, or a float with an integral value (Max and Pd send dial values as
  floats, so ``64.0`` is accepted as 64; ``64.5`` is rejected).
- ``"s"``: a string; when the argument has ``choices`` the match ignores case and the
  canonical spelling is passed on.
- OSC ``T``/``F`` (booleans), ``N`` (nil), blobs and arrays are rejected for every type.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

__all__ = [
    "PREFIX",
    "Arg",
    "Control",
    "ControlError",
    "Reply",
    "control",
    "controls_of",
    "dispatch",
    "generate_osc_doc",
    "validate",
]

PREFIX = "/divergent/"

ArgType = Literal["i", "f", "s"]
_TYPE_NAMES: Mapping[str, str] = MappingProxyType({"i": "integer", "f": "float", "s": "string"})
# The attribute a decorated function carries its declarations in (a tuple: one function
# may answer several addresses by stacking decorators).
_ATTR = "__divergent_controls__"

F = TypeVar("F", bound=Callable[..., Any])


class ControlError(ValueError):
    """A control message cannot be applied: unknown address, wrong arguments, out of range.

    ``str(e)`` is ``"<address>: <reason>"``, ready to send as ``/divergent/error``; the
    reasons :func:`validate` and :func:`dispatch` give end in ``(rejected)``.
    ``clamped`` is False for every error :func:`validate` raises (the message was refused);
    it lets the server report a clamp warning through the same path with ``clamped=True``.
    """

    def __init__(self, address: str, reason: str, clamped: bool = False) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason
        self.clamped = clamped


@dataclass(frozen=True)
class Arg:
    """One argument of a control or reply.

    ``lo``/``hi`` bound numbers (either may be None); out-of-range values are clamped
    when ``clamp`` is set, refused otherwise. ``choices`` lists the allowed values.
    ``optional`` arguments may be left off (the handler's default applies); ``repeat``
    makes the last argument take zero or more values.
    """

    name: str
    type: ArgType
    _: KW_ONLY
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str | int, ...] | None = None
    clamp: bool = False
    optional: bool = False
    repeat: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"Arg {self.name!r}: type must be 'i', 'f' or 's', not {self.type!r}")
        if self.type == "s" and (self.lo is not None or self.hi is not None):
            raise TypeError(f"Arg {self.name!r}: a string has no range")
        if self.clamp and self.lo is None and self.hi is None:
            raise TypeError(f"Arg {self.name!r}: clamp needs lo or hi")
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise TypeError(f"Arg {self.name!r}: lo > hi")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            want = str if self.type == "s" else int | float
            if not self.choices or not all(
                isinstance(c, want) and not isinstance(c, bool) for c in self.choices
            ):
                raise TypeError(f"Arg {self.name!r}: choices must be {_TYPE_NAMES[self.type]}s")

    @property
    def required(self) -> bool:
        """Whether a message must carry this argument."""
        return not (self.optional or self.repeat)

    def describe(self, incoming: bool = True) -> str:
        """``name`` type and constraint, as the docs and error messages show it.

        ``incoming`` adds what happens out of range (clamped or refused); replies leave it.
        """
        text = f"`{self.name}` {self.type}"
        if self.choices:
            text += ": " + ", ".join(str(c) for c in self.choices)
        elif self.lo is not None or self.hi is not None:
            text += " " + _bounds(self.lo, self.hi)
            if incoming:
                text += " (clamped)" if self.clamp else " (else refused)"
        if self.repeat:
            text += " …"
        return f"[{text}]" if self.optional or self.repeat else text


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{_num(lo)}..{_num(hi)}"
    return f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}" if hi is not None else ""


def _check_arg_order(where: str, args: Sequence[Arg]) -> None:
    seen_optional = False
    for i, a in enumerate(args):
        if a.repeat and i != len(args) - 1:
            raise TypeError(f"{where}: only the last argument may repeat ({a.name!r})")
        if a.required and seen_optional:
            raise TypeError(f"{where}: required {a.name!r} follows an optional argument")
        seen_optional |= not a.required
    names = [a.name for a in args]
    if len(set(names)) != len(names):
        raise TypeError(f"{where}: argument names repeat: {names}")


def _check_address(address: str) -> None:
    if not address.startswith(PREFIX) or len(address) == len(PREFIX) or " " in address:
        raise TypeError(f"control address must look like {PREFIX}name, not {address!r}")
    if any(c in address for c in "*?[]{},#"):
        raise TypeError(f"{address!r}: OSC pattern characters are not allowed in an address")


@dataclass(frozen=True)
class Control:
    """An incoming control: its address, arguments, documentation and handler method name."""

    address: str
    args: tuple[Arg, ...]
    doc: str
    handler: str

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_arg_order(self.address, self.args)

    @property
    def param(self) -> str:
        """The address without the ``/divergent/`` prefix: ``record/start``."""
        return self.address[len(PREFIX) :]

    def mqtt_topic(self, instance: str) -> str:
        """The MQTT topic for this control: ``divergent/<instance>/control/<param>``."""
        return f"divergent/{instance}/control/{self.param}"

    @property
    def min_args(self) -> int:
        """How many arguments a message must carry."""
        return sum(a.required for a in self.args)

    @property
    def max_args(self) -> int | None:
        """How many arguments a message may carry (None: no limit, the last one repeats)."""
        return None if self.args and self.args[-1].repeat else len(self.args)


@dataclass(frozen=True, init=False)
class Reply:
    """An outgoing message the server sends to the reply address (declared for the docs).

    ``args`` are :class:`Arg` objects or plain ``(name, type)`` pairs::

        Reply("/divergent/pong", (("version", "s"),), doc="Answer to /divergent/ping.")
    """

    address: str
    args: tuple[Arg, ...] = ()
    doc: str = ""

    def __init__(
        self, address: str, args: Sequence[Arg | tuple[str, str]] = (), *, doc: str = ""
    ) -> None:
        converted = tuple(a if isinstance(a, Arg) else Arg(a[0], _arg_type(a[1])) for a in args)
        _check_address(address)
        _check_arg_order(address, converted)
        # frozen: the fields are set once, here
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "args", converted)
        object.__setattr__(self, "doc", inspect.cleandoc(doc))


def _arg_type(tag: str) -> ArgType:
    if tag == "i":
        return "i"
    if tag == "f":
        return "f"
    if tag == "s":
        return "s"
    raise TypeError(f"type must be 'i', 'f' or 's', not {tag!r}")


def control(address: str, *args: Arg, doc: str) -> Callable[[F], F]:
    """Declare the decorated method as the handler of OSC ``address`` with ``args``.

    The method is called with the validated values positionally (optional arguments that
    were left off are not passed, so the method's defaults apply). Its parameters after
    ``self`` must carry the arguments' names, in order: a mismatch is a TypeError when the
    class is defined rather than a surprise on stage.
    """

    def decorate(fn: F) -> F:
        ctrl = Control(address, tuple(args), inspect.cleandoc(doc), fn.__name__)
        _check_signature(fn, ctrl)
        # decorators apply bottom-up: prepend, so stacked addresses keep their reading order
        setattr(fn, _ATTR, (ctrl, *getattr(fn, _ATTR, ())))
        return fn

    return decorate


def _check_signature(fn: Callable[..., Any], ctrl: Control) -> None:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return  # *values: the method takes whatever repeats; nothing to compare
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    want = [a.name for a in ctrl.args]
    if names[: len(want)] != want:
        raise TypeError(
            f"{fn.__qualname__}: parameters {names} do not match {ctrl.address} arguments {want}"
        )
    for p, a in zip(params, ctrl.args, strict=False):
        if not a.required and p.default is p.empty:
            raise TypeError(f"{fn.__qualname__}: optional argument {a.name!r} needs a default")
    extra = [
        p.name for p in params[len(want) :] if p.default is p.empty and p.kind != p.VAR_KEYWORD
    ]
    if extra:
        raise TypeError(f"{fn.__qualname__}: parameters {extra} have no control argument")


def controls_of(obj_or_cls: object) -> list[Control]:
    """Every control declared on a class (or an instance's class), in definition order.

    Base classes come first; a subclass method overriding a decorated one by name replaces
    it. Two handlers for one address are a TypeError.
    """
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    by_name: dict[str, tuple[Control, ...]] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            if name in by_name and not hasattr(fn, _ATTR):
                del by_name[name]  # overridden by an undecorated method: no longer a control
            if hasattr(fn, _ATTR):
                # an override keeps the base method's place (dicts keep insertion order)
                by_name[name] = getattr(fn, _ATTR)
    out: list[Control] = []
    seen: dict[str, str] = {}
    for ctrls in by_name.values():
        for c in ctrls:
            if c.address in seen:
                raise TypeError(f"{c.address} is handled by both {seen[c.address]} and {c.handler}")
            seen[c.address] = c.handler
            out.append(c)
    return out


# --- validation ----------------------------------------------------------------------------


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _convert(ctrl: Control, arg: Arg, value: object) -> tuple[object, str | None]:
    """One value, checked and converted; returns (value, clamp warning or None)."""

    def refuse(reason: str) -> ControlError:
        return ControlError(ctrl.address, f"{arg.name} {reason}, got {value!r} (rejected)")

    # bool is an int subclass: OSC T/F must not pass for 1/0.
    if value is None or isinstance(value, bool | bytes | bytearray | list | tuple | dict):
        raise refuse(f"must be a{'n' if arg.type == 'i' else ''} {_TYPE_NAMES[arg.type]}")
    converted: object
    if arg.type == "s":
        if not isinstance(value, str):
            raise refuse("must be a string")
        if arg.choices:
            for c in arg.choices:
                if isinstance(c, str) and c.casefold() == value.casefold():
                    return c, None
            raise refuse(f"must be one of {', '.join(str(c) for c in arg.choices)}")
        return value, None
    if not isinstance(value, int | float):
        raise refuse(f"must be a{'n' if arg.type == 'i' else ''} {_TYPE_NAMES[arg.type]}")
    if not math.isfinite(value):
        raise refuse("must be a finite number")
    if arg.type == "i":
        if isinstance(value, float) and not value.is_integer():
            raise refuse("must be a whole number")
        converted = int(value)
    else:
        converted = float(value)
    assert isinstance(converted, int | float)
    if arg.choices:
        if converted not in arg.choices:
            raise refuse(f"must be one of {', '.join(str(c) for c in arg.choices)}")
        return converted, None
    lo, hi = arg.lo, arg.hi
    if (lo is None or converted >= lo) and (hi is None or converted <= hi):
        return converted, None
    bounds = _bounds(lo, hi)
    if not arg.clamp:
        raise refuse(f"is out of range {bounds}")
    result: int | float
    if lo is not None and converted < lo:
        result = math.ceil(lo) if arg.type == "i" else float(lo)
    else:
        assert hi is not None  # out of range and not below lo: above hi
        result = math.floor(hi) if arg.type == "i" else float(hi)
    warning = (
        f"{ctrl.address}: {arg.name} {value!r} is out of range {bounds}: "
        f"clamped to {result!r} (applied)"
    )
    return result, warning


def validate(ctrl: Control, args: Sequence[object]) -> tuple[list[object], str | None]:
    """Check and convert a message's arguments against the declaration.

    Returns the converted values (optional arguments left off are not filled in) and a
    warning when a value was clamped (the value is still applied; the server reports the
    warning). Raises :class:`ControlError` for a wrong argument count, a wrong type, a
    value out of range that is not clamped, or a value not among the choices.
    """
    n = len(args)
    if n < ctrl.min_args or (ctrl.max_args is not None and n > ctrl.max_args):
        want = " ".join(a.describe() for a in ctrl.args) or "no arguments"
        raise ControlError(
            ctrl.address, f"takes {want}; got {n} argument{'s' * (n != 1)} (rejected)"
        )
    values: list[object] = []
    warnings: list[str] = []
    for i, value in enumerate(args):
        arg = ctrl.args[min(i, len(ctrl.args) - 1)]  # past the end only for a repeating last
        v, warning = _convert(ctrl, arg, value)
        values.append(v)
        if warning:
            warnings.append(warning)
    return values, "; ".join(warnings) or None


def dispatch(
    obj: object,
    controls: Mapping[str, Control] | Iterable[Control],
    address: str,
    args: Sequence[object],
) -> str | None:
    """Validate a message and call ``obj``'s handler with the values.

    ``controls`` is a mapping from address to :class:`Control` (fastest) or any iterable
    of them. Returns the clamp warning, if any. Raises :class:`ControlError` for an
    unknown address or bad arguments; exceptions from the handler itself propagate.
    """
    if isinstance(controls, Mapping):
        ctrl = controls.get(address)
        known: Iterable[str] = controls.keys()
    else:
        listed = list(controls)
        ctrl = next((c for c in listed if c.address == address), None)
        known = [c.address for c in listed]
    if ctrl is None:
        close = difflib.get_close_matches(address, list(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ControlError(address, f"unknown address{hint} (rejected)")
    values, warning = validate(ctrl, args)
    getattr(obj, ctrl.handler)(*values)
    return warning


# --- documentation -------------------------------------------------------------------------


def _cell(text: str) -> str:
    # A Markdown table cell is one line, and '|' would end it early.
    return " ".join(text.split()).replace("|", "\\|")


def _args_cell(args: Sequence[Arg], incoming: bool) -> str:
    if not args:
        return "—"
    parts = []
    for a in args:
        part = a.describe(incoming)
        if a.doc:
            part += f" — {a.doc}"
        parts.append(_cell(part))
    return "<br>".join(parts)


def generate_osc_doc(
    controls: Iterable[Control],
    replies: Iterable[Reply],
    *,
    osc_port: int = 9000,
    osc_reply: str = "127.0.0.1:9001",
) -> str:
    """Markdown for ``docs/osc.md``: controls in, replies out, and the MQTT mapping.

    The output depends only on the declarations (in the order given), so it can be
    regenerated and compared in a test.
    """
    ctrls = list(controls)
    reps = list(replies)
    lines = [
        "# OSC and MQTT reference",
        "",
        "<!-- Generated from the handlers' declarations by server.control.generate_osc_doc; "
        "do not edit by hand. -->",
        "",
        f"Send OSC over UDP to the server's port (`--osc-port`, default {osc_port}). Every "
        f"reply goes to one fixed address (`--osc-reply`, default {osc_reply}), never back to "
        "the sender's port, because Max's `udpsend` and Pd's `netsend` cannot listen there.",
        "",
        "Types: `i` 32-bit integer, `f` 32-bit float, `s` string. A float argument also "
        "takes an integer; an integer argument also takes a float with a whole value "
        "(Max and Pd send dial values as floats). Booleans, nil, blobs, arrays, NaN and "
        "infinities are refused. A string with choices matches them ignoring case. "
        "A value out of its range is clamped where the table says so (and the server "
        "reports the clamp on `/divergent/error`, but applies the value); otherwise the "
        "message is refused with a reason on `/divergent/error`. Arguments in [brackets] "
        "are optional; `…` repeats. Messages inside bundles are applied when they arrive "
        "(time tags are ignored).",
        "",
        "## Controls (in)",
        "",
        "| Address | Arguments | Description |",
        "|---|---|---|",
    ]
    for c in ctrls:
        lines.append(f"| `{c.address}` | {_args_cell(c.args, True)} | {_cell(c.doc)} |")
    lines += [
        "",
        "## Replies (out)",
        "",
        "| Address | Arguments | Description |",
        "|---|---|---|",
    ]
    for r in reps:
        lines.append(f"| `{r.address}` | {_args_cell(r.args, False)} | {_cell(r.doc)} |")
    example = ctrls[0] if ctrls else None
    lines += [
        "",
        "## MQTT",
        "",
        "With `--mqtt HOST[:PORT]`, every control above is also the topic "
        "`divergent/<instance>/control/<param>`, where `<param>` is the address without "
        "`/divergent/` and `<instance>` is `--instance` (default `default`). The payload "
        "carries the same values: a JSON value (a number, a string, or an array for a "
        "control with several arguments), or plain text, read as a number when it looks "
        "like one and as a string otherwise. The same checks, clamps and refusals apply.",
    ]
    if example is not None:
        lines += [
            "",
            f"For example `{example.address}` is `{example.mqtt_topic('default')}`.",
        ]
    return "\n".join(lines) + "\n"
