"""The ``serve`` configuration: one validated object, from a TOML file and command-line flags.

:class:`ServeConfig` checks every field when it is built (directly, from a dict, from TOML
or from flags), so the rest of the server never re-checks a value. The file and the flags
use the same names (``phrase_silence_s`` in the file is ``--phrase-silence`` on the command
line); flags override the file, and a flag that was not given overrides nothing.

A TOML file looks like ``divergent serve --print-config`` prints it::

    mode = "call"
    bpm = 96.0
    divergence = 0.3
    osc_reply = "127.0.0.1:9001"
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from divergent.bridges.osc import parse_allow
from divergent.model.concept import LearnConfig
from divergent.model.files import DECODER_CHOICES, DEVICE_CHOICES
from divergent.model.generate import CONCEPT_STRENGTH, CONCEPT_STRENGTHS

__all__ = [
    "CLOCKS",
    "DECODERS",
    "DEVICES",
    "LOG_LEVELS",
    "MIDI_BACKENDS",
    "MODES",
    "QUANTIZE",
    "YIELD",
    "ConfigError",
    "ServeConfig",
    "add_serve_arguments",
    "arg_range",
    "config_from_args",
    "parse_host_port",
]

MODES = ("call", "jam", "off")
QUANTIZE = ("off", "beat", "bar")
CLOCKS = ("internal", "midi", "link")
MIDI_BACKENDS = ("jack", "alsa", "coremidi", "winmm")
DECODERS = DECODER_CHOICES
DEVICES = DEVICE_CHOICES
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Turn-taking in call mode: "on" = the machine yields at the performer's first note.
YIELD = ("on", "off")

MQTT_PORT = 1883
MQTT_TLS_PORT = 8883

# MQTT topic levels may not contain these: '+' and '#' are wildcards, '/' separates levels.
_TOPIC_UNSAFE = re.compile(r"[/+#\s\x00]")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what it accepts."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:9001`` for IPv6) into a host and a port in 1..65535.

    Without a port, ``default_port`` is used when given; otherwise it is an error.
    Raises :class:`ValueError` with a message saying what was expected.
    """
    s = text.strip()
    host: str
    port_text: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected HOST:PORT")
        port_text = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    elif ":" in s:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:9001")
    else:
        host, port_text = s, None
    if not host:
        raise ValueError(f"{text!r}: the host is empty")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number in 1..65535")
    return host, int(port_text)


# --- field declarations --------------------------------------------------------------------
# Each field carries its rule in dataclass metadata (read-only), so validation, the flag
# help and error messages come from one place.


def _rule(
    kind: str,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    optional: bool = False,
    check: Callable[[Any], str | None] | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    return {
        "key": key,
        "kind": kind,
        "doc": doc,
        "lo": lo,
        "hi": hi,
        "choices": choices,
        "optional": optional,
        "check": check,
    }


def _check_reply(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as e:
        return f"must be HOST:PORT ({e})"
    return None


def _check_mqtt(value: str) -> str | None:
    try:
        parse_host_port(value, default_port=MQTT_PORT)
    except ValueError as e:
        return f"must be HOST[:PORT] ({e})"
    return None


def _check_topic_level(value: str) -> str | None:
    if not value or _TOPIC_UNSAFE.search(value):
        return "must be a non-empty name without '/', '+', '#' or spaces (an MQTT topic level)"
    return None


def _check_nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _check_allow(value: str) -> str | None:
    try:
        parse_allow(value.split(","))
    except ValueError as e:
        return str(e)
    return None


def allow_list(value: str) -> list[str]:
    """``osc_allow``'s entries (empty: no list)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _check_heartbeat(value: float) -> str | None:
    # 0 turns the heartbeat off; anything faster than 10 Hz only floods the peers.
    return None if value == 0 or 0.1 <= value <= 60 else "must be 0 (off) or in 0.1..60 seconds"


def _check_concept(value: str) -> str | None:
    from divergent.model.concept import ConceptError, parse_spec

    if value.strip().lower() == "none":
        return None
    try:
        parse_spec(value)
    except ConceptError as e:
        return f"must be NAME, NAME+NAME or none ({e})"
    return None


def _f(default: Any, kind: str, doc: str, **kw: Any) -> Any:
    return field(default=default, metadata=_rule(kind, doc, **kw))


@dataclass
class ServeConfig:
    """Everything ``divergent serve`` needs; validated when built (raises :class:`ConfigError`)."""

    # musical behaviour
    mode: str = _f(
        "call", "str", "call (answer each phrase), jam (play along) or off", choices=MODES
    )
    quantize: str = _f("off", "str", "start answers on the next beat or bar", choices=QUANTIZE)
    clock: str = _f(
        "internal", "str", "tempo source: internal, MIDI clock in, or Ableton Link", choices=CLOCKS
    )
    bpm: float = _f(120.0, "float", "tempo for the internal clock", lo=20, hi=300)
    bars: int = _f(4, "int", "bars per answer", lo=1, hi=16)
    divergence: float = _f(0.0, "float", "the divergence knob d", lo=0, hi=1)
    temperature: float = _f(1.0, "float", "sampling temperature", lo=0.05, hi=2.0)
    top_p: float = _f(0.95, "float", "nucleus sampling mass", lo=0.01, hi=1.0)
    seed: int | None = _f(
        None, "int", "random seed; none: a fresh one each start", lo=0, hi=2**32 - 1, optional=True
    )
    phrase_silence_s: float = _f(
        0.6, "float", "call mode: a phrase ends after this many seconds of silence", lo=0.05, hi=10
    )
    bar_ends_phrase: bool = _f(
        False,
        "bool",
        "call mode: also end a phrase at a bar line once at least one beat has been silent",
    )
    max_note_s: float = _f(
        8.0, "float", "longest note the machine holds, in seconds", lo=0.05, hi=60
    )
    channel: int = _f(1, "int", "MIDI channel the machine plays on", lo=1, hi=16)
    warm_prefills: int = _f(
        0,
        "int",
        "prompt lengths the model prefills once after start, between answers, paying in "
        "advance the little memory a new length costs (0: none; it slows a concept switch "
        "in those seconds)",
        lo=0,
        hi=1000,
    )
    yield_: str = _f(
        "on",
        "str",
        "call mode: when the performer starts a new phrase while the machine answers, the "
        "machine stops at their first note (on) or plays its answer out (off)",
        choices=YIELD,
        key="yield",
    )
    velocity: int = _f(
        0,
        "int",
        "velocity of the machine's notes; 0 follows the performer (the mean of their last 8 notes)",
        lo=0,
        hi=127,
    )
    # MIDI
    midi_backend: str | None = _f(
        None, "str", "MIDI API (none: the platform's default)", choices=MIDI_BACKENDS, optional=True
    )
    midi_in: str | None = _f(
        None, "str", "MIDI input port to open (none: a virtual port)", optional=True
    )
    midi_out: str | None = _f(
        None, "str", "MIDI output port to open (none: a virtual port)", optional=True
    )
    midi_client: str = _f("divergent", "str", "MIDI client name", check=_check_nonempty)
    # OSC
    osc_host: str = _f(
        "127.0.0.1", "str", "address the OSC server listens on", check=_check_nonempty
    )
    osc_port: int = _f(9000, "int", "OSC port (0: any free port)", lo=0, hi=65535)
    osc_allow: str = _f(
        "",
        "str",
        "comma-separated IP addresses or CIDRs allowed to send OSC and to open the browser "
        "view (others are counted and ignored); empty: anyone who reaches the port",
        check=_check_allow,
    )
    osc_reply: str = _f(
        "127.0.0.1:9001", "str", "fixed HOST:PORT every OSC reply goes to", check=_check_reply
    )
    drain_s: float = _f(
        1.0,
        "float",
        "at shutdown, seconds to wait for an answer still generating (a second signal "
        "stops waiting)",
        lo=0,
        hi=30,
    )
    heartbeat_s: float = _f(
        1.0, "float", "seconds between status heartbeats (0: off)", check=_check_heartbeat
    )
    # the browser view (server/web.py)
    web: bool = _f(True, "bool", "serve the live browser view (controls, piano roll, takes)")
    web_host: str = _f(
        "127.0.0.1",
        "str",
        "address the browser view listens on (another than loopback: reachable by anyone "
        "on the network, warned about)",
        check=_check_nonempty,
    )
    web_port: int = _f(8765, "int", "browser view port (0: any free port)", lo=0, hi=65535)
    # sessions and model
    sessions: str | None = _f(
        None, "str", "folder for recorded takes (none: the default)", optional=True
    )
    record: bool = _f(True, "bool", "record every take automatically")
    model_dir: str | None = _f(None, "str", "model folder (none: the bundled model)", optional=True)
    decoder: str = _f(
        "auto",
        "str",
        "decoder: auto (measured once per host, cached: the step's file and the "
        "prefill's, int8 or fp32 each), int8 or fp32 (steps and prefills alike)",
        choices=DECODERS,
    )
    device: str = _f(
        "cpu",
        "str",
        "where the model runs: cpu, or cuda (the fp32 decoder on an NVIDIA GPU; needs the "
        "onnxruntime-gpu build: refused at start where it cannot run, never a silent "
        "fall-back to the CPU)",
        choices=DEVICES,
    )
    # concepts
    concepts: str | None = _f(
        None,
        "str",
        "concepts folder (none: $DIVERGENT_CONCEPTS, else ~/.local/share/divergent/concepts)",
        optional=True,
    )
    concept: str | None = _f(
        None,
        "str",
        "the concept answers start in: NAME, NAME+NAME or none",
        optional=True,
        check=_check_concept,
    )
    concept_strength: float = _f(
        CONCEPT_STRENGTH,
        "float",
        "how far a concept's answers lean into its style: 1 = as learned, more = pushed "
        "further, 0 = its weights without its identifiers (live: /divergent/concept/strength)",
        lo=CONCEPT_STRENGTHS[0],
        hi=CONCEPT_STRENGTHS[1],
    )
    concept_learn_s: float = _f(
        120.0,
        "float",
        "seconds of the performer's playing /divergent/concept/learn learns from by default",
        lo=5,
        hi=600,
    )
    concept_learn_steps: int = _f(
        LearnConfig.steps,
        "int",
        "tuning steps of a concept learned live (fewer: sooner, weaker)",
        lo=1,
        hi=1000,
    )
    # MQTT
    mqtt: str | None = _f(
        None, "str", "MQTT broker HOST[:PORT] (none: no MQTT)", optional=True, check=_check_mqtt
    )
    mqtt_username: str | None = _f(None, "str", "MQTT user name", optional=True)
    mqtt_password: str | None = _f(
        None,
        "str",
        "MQTT password (prefer the config file: flags are visible in the process list)",
        optional=True,
    )
    mqtt_tls: bool = _f(False, "bool", "connect to the broker over TLS")
    mqtt_cafile: str | None = _f(
        None, "str", "CA certificate file (used when mqtt_tls is on)", optional=True
    )
    instance: str = _f(
        "default",
        "str",
        "instance name (MQTT topics divergent/<instance>/...)",
        check=_check_topic_level,
    )
    # diagnostics
    trace: str | None = _f(None, "str", "write timing events to this JSONL file", optional=True)
    log_level: str = _f("info", "str", "logging level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _validated(_option(f), getattr(self, f.name), f.metadata))

    # --- derived values ----------------------------------------------------------------

    @property
    def reply_address(self) -> tuple[str, int]:
        """``osc_reply`` parsed into ``(host, port)``."""
        return parse_host_port(self.osc_reply)

    @property
    def mqtt_address(self) -> tuple[str, int] | None:
        """``mqtt`` parsed into ``(host, port)``; the port defaults to 1883, or 8883 with TLS."""
        if self.mqtt is None:
            return None
        return parse_host_port(self.mqtt, MQTT_TLS_PORT if self.mqtt_tls else MQTT_PORT)

    # --- conversions -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All options by name (``yield``, not the attribute ``yield_``), None included."""
        return {_option(f): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeConfig:
        """Build from option names; an unknown name is a :class:`ConfigError` listing valid ones."""
        return cls(**cls._attributes(data))

    @classmethod
    def _attributes(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Option names to attribute names (an option may be a Python keyword: ``yield``)."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(cls.field_names())}",
                unknown[0],
            )
        attr = {_option(f): f.name for f in fields(cls)}
        return {attr[k]: v for k, v in data.items()}

    @classmethod
    def from_toml(cls, path: str | Path) -> ServeConfig:
        """Read a TOML file of fields; missing files and syntax errors give a one-line error."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}", e.field) from None

    def to_toml(self) -> str:
        """The fields as TOML, leaving out None values (TOML has no null)."""
        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    def merged(self, overrides: Mapping[str, Any]) -> ServeConfig:
        """A new config with ``overrides`` applied; a None value means "not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **self._attributes(given))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every option's name, in declaration order."""
        return tuple(_option(f) for f in fields(cls))

    @classmethod
    def rule(cls, name: str) -> Mapping[str, Any]:
        """Option ``name``'s declaration (kind, doc, lo, hi, choices, ...), read-only."""
        for f in fields(cls):
            if _option(f) == name:
                return f.metadata
        raise ConfigError(f"unknown option {name}", name)

    @classmethod
    def describe(cls, name: str) -> str:
        """One line saying what option ``name`` does and what it accepts (for help texts)."""
        rule = cls.rule(name)
        return f"{rule['doc']}{_accepts(rule)}"


def _option(f: Any) -> str:
    """A field's option name: its attribute name unless declared otherwise."""
    return str(f.metadata.get("key") or f.name)


def arg_range(name: str) -> dict[str, Any]:
    """Option ``name``'s range or choices as keyword arguments for a control ``Arg``
    (``lo``/``hi``, or ``choices``): the one declaration of what a live control accepts."""
    rule = ServeConfig.rule(name)
    if rule["choices"]:
        return {"choices": tuple(rule["choices"])}
    return {"lo": rule["lo"], "hi": rule["hi"]}


def _accepts(rule: Mapping[str, Any]) -> str:
    if rule["choices"]:
        return f" ({', '.join(rule['choices'])})"
    if rule["lo"] is not None and rule["hi"] is not None:
        return f" ({_num(rule['lo'])}..{_num(rule['hi'])})"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _validated(name: str, value: Any, rule: Mapping[str, Any]) -> Any:
    """Check one field against its rule; returns the value (ints become floats for floats)."""
    kind = rule["kind"]

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{name}: {what}, got {value!r}", name)

    if value is None:
        if rule["optional"]:
            return None
        raise fail("is required")
    # bool is an int in Python; a TOML `true` must not pass for a number (or the reverse).
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("must be true or false")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"must be a{'n integer' if kind == 'int' else ' number'}")
        if kind == "int" and not isinstance(value, int):
            raise fail("must be an integer")
        if not math.isfinite(value):
            raise fail("must be a finite number")
        lo, hi = rule["lo"], rule["hi"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise fail(f"must be in {_num(lo)}..{_num(hi)}")
        value = float(value) if kind == "float" else value
    elif kind == "str":
        if not isinstance(value, str):
            raise fail("must be a string")
        if rule["choices"] and value not in rule["choices"]:
            raise fail(f"must be one of {', '.join(rule['choices'])}")
    check = rule["check"]
    if check is not None:
        problem = check(value)
        if problem:
            raise fail(problem)
    return value


# --- command line --------------------------------------------------------------------------

# (flag, field, metavar or None for an on/off flag). The field's rule supplies type and help.
_FLAGS: tuple[tuple[str, str, str | None], ...] = (
    ("--mode", "mode", None),
    ("--quantize", "quantize", None),
    ("--clock", "clock", None),
    ("--bpm", "bpm", "BPM"),
    ("--bars", "bars", "N"),
    ("--divergence", "divergence", "D"),
    ("--temperature", "temperature", "T"),
    ("--top-p", "top_p", "P"),
    ("--seed", "seed", "N"),
    ("--phrase-silence", "phrase_silence_s", "S"),
    ("--bar-ends-phrase", "bar_ends_phrase", None),
    ("--max-note-s", "max_note_s", "S"),
    ("--channel", "channel", "N"),
    ("--warm-prefills", "warm_prefills", "N"),
    ("--velocity", "velocity", "V"),
    ("--yield", "yield", None),
    ("--midi-backend", "midi_backend", None),
    ("--midi-in", "midi_in", "NAME"),
    ("--midi-out", "midi_out", "NAME"),
    ("--midi-client", "midi_client", "NAME"),
    ("--osc-host", "osc_host", "HOST"),
    ("--osc-port", "osc_port", "PORT"),
    ("--osc-allow", "osc_allow", "ADDR[,CIDR...]"),
    ("--osc-reply", "osc_reply", "HOST:PORT"),
    ("--drain", "drain_s", "S"),
    ("--web", "web", None),
    ("--web-host", "web_host", "HOST"),
    ("--web-port", "web_port", "PORT"),
    ("--sessions", "sessions", "DIR"),
    ("--record", "record", None),
    ("--model-dir", "model_dir", "DIR"),
    ("--decoder", "decoder", None),
    ("--device", "device", None),
    ("--concepts", "concepts", "DIR"),
    ("--concept", "concept", "NAME[+NAME]"),
    ("--concept-strength", "concept_strength", "G"),
    ("--concept-learn-seconds", "concept_learn_s", "S"),
    ("--concept-learn-steps", "concept_learn_steps", "N"),
    ("--mqtt", "mqtt", "HOST[:PORT]"),
    ("--mqtt-username", "mqtt_username", "NAME"),
    ("--mqtt-password", "mqtt_password", "PASSWORD"),
    ("--mqtt-tls", "mqtt_tls", None),
    ("--mqtt-cafile", "mqtt_cafile", "FILE"),
    ("--instance", "instance", "NAME"),
    ("--trace", "trace", "PATH"),
    ("--log-level", "log_level", None),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags; each defaults to None so it only overrides what was given.

    ``--config PATH`` reads a TOML file first; ``--print-config`` asks the caller to print
    the resulting TOML and exit. On/off options come in pairs (``--record``/``--no-record``).
    """
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="a TOML file of serve options (flags override it)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )
    defaults = ServeConfig()
    for flag, name, metavar in _FLAGS:
        rule = ServeConfig.rule(name)
        default = defaults.to_dict()[name]
        # argparse lists the choices itself; only ranges are added to the description
        described = rule["doc"] if rule["choices"] else ServeConfig.describe(name)
        help_text = f"{described}; default: {_show_default(default)}"
        if rule["kind"] == "bool":
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        typ: Callable[[str], Any] = {"int": int, "float": float, "str": str}[rule["kind"]]
        parser.add_argument(
            flag,
            dest=name,
            type=typ,
            default=None,
            metavar=metavar,
            choices=rule["choices"],
            help=help_text.replace("%", "%%"),
        )


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The effective config: defaults, then the ``--config`` file, then the flags given."""
    path = getattr(args, "config", None)
    base = ServeConfig.from_toml(path) if path else ServeConfig()
    return base.merged({name: getattr(args, name, None) for _, name, _ in _FLAGS})
