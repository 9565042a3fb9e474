"""ServeConfig: defaults, validation, TOML round trip, flags over file."""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from divergent.server.config import (
    ConfigError,
    ServeConfig,
    add_serve_arguments,
    config_from_args,
    parse_host_port,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="divergent serve")
    add_serve_arguments(p)
    return p


def test_defaults_are_valid_and_as_documented() -> None:
    c = ServeConfig()
    assert (c.mode, c.quantize, c.clock, c.bpm, c.bars) == ("call", "off", "internal", 120.0, 4)
    assert (c.divergence, c.temperature, c.top_p, c.seed) == (0.0, 1.0, 0.95, None)
    assert (c.phrase_silence_s, c.bar_ends_phrase, c.max_note_s) == (0.6, False, 8.0)
    assert (c.midi_backend, c.midi_in, c.midi_out, c.midi_client) == (None, None, None, "divergent")
    assert (c.osc_host, c.osc_port, c.osc_reply) == ("127.0.0.1", 9000, "127.0.0.1:9001")
    assert c.reply_address == ("127.0.0.1", 9001)
    assert (c.heartbeat_s, c.sessions, c.record, c.model_dir, c.decoder) == (
        1.0,
        None,
        True,
        None,
        "auto",
    )
    assert (c.channel, c.velocity, c.device) == (1, 0, "cpu")
    assert (c.mqtt, c.mqtt_username, c.mqtt_password, c.mqtt_tls, c.mqtt_cafile) == (
        None,
        None,
        None,
        False,
        None,
    )
    assert c.mqtt_address is None
    assert (c.instance, c.trace, c.log_level) == ("default", None, "info")


# (field, bad value, fragment of the message)
INVALID: list[tuple[str, Any, str]] = [
    ("mode", "solo", "one of call, jam, off"),
    ("mode", None, "required"),
    ("quantize", "half", "one of off, beat, bar"),
    ("clock", "ptp", "one of internal, midi, link"),
    ("bpm", 19.9, "in 20..300"),
    ("bpm", 301, "in 20..300"),
    ("bpm", "120", "must be a number"),
    ("bpm", math.nan, "finite"),
    ("bpm", True, "must be a number"),
    ("bars", 0, "in 1..16"),
    ("bars", 17, "in 1..16"),
    ("bars", 4.0, "must be an integer"),
    ("divergence", -0.1, "in 0..1"),
    ("divergence", 1.01, "in 0..1"),
    ("temperature", 0.01, "in 0.05..2"),
    ("temperature", 2.5, "in 0.05..2"),
    ("top_p", 0.0, "in 0.01..1"),
    ("top_p", 1.5, "in 0.01..1"),
    ("seed", -1, "in 0..4294967295"),
    ("seed", 2**32, "in 0..4294967295"),
    ("seed", 1.5, "must be an integer"),
    ("phrase_silence_s", 0.01, "in 0.05..10"),
    ("phrase_silence_s", 11, "in 0.05..10"),
    ("bar_ends_phrase", 1, "true or false"),
    ("max_note_s", 0, "in 0.05..60"),
    ("channel", 0, "in 1..16"),
    ("channel", 17, "in 1..16"),
    ("warm_prefills", -1, "in 0..1000"),
    ("velocity", -1, "in 0..127"),
    ("velocity", 128, "in 0..127"),
    ("midi_backend", "oss", "one of jack, alsa, coremidi, winmm"),
    ("midi_in", 3, "must be a string"),
    ("midi_client", " ", "must not be empty"),
    ("osc_host", "", "must not be empty"),
    ("osc_port", -1, "in 0..65535"),
    ("osc_port", 65536, "in 0..65535"),
    ("osc_reply", "127.0.0.1", "HOST:PORT"),
    ("osc_reply", "127.0.0.1:0", "1..65535"),
    ("osc_reply", "host:port", "1..65535"),
    ("osc_allow", "example.org", "an IP address or a CIDR"),
    ("osc_allow", "10.0.0.0/33", "an IP address or a CIDR"),
    ("osc_reply", ":9001", "host is empty"),
    ("osc_reply", "::1:9001", "brackets"),
    ("heartbeat_s", 0.05, "0 (off) or in 0.1..60"),
    ("heartbeat_s", 61, "0 (off) or in 0.1..60"),
    ("sessions", 1, "must be a string"),
    ("record", "yes", "true or false"),
    ("decoder", "fp16", "one of auto, int8, fp32"),
    ("device", "gpu", "one of cpu, cuda"),
    ("device", "auto", "one of cpu, cuda"),
    ("mqtt", "broker:99999", "HOST[:PORT]"),
    ("mqtt", "", "HOST[:PORT]"),
    ("mqtt_tls", None, "required"),
    ("instance", "a/b", "MQTT topic level"),
    ("instance", "a+", "MQTT topic level"),
    ("instance", "", "MQTT topic level"),
    ("trace", 5, "must be a string"),
    ("log_level", "loud", "one of debug, info, warning, error"),
    ("yield", "maybe", "one of on, off"),
    ("drain_s", -1, "0..30"),
    ("concepts", 3, "must be a string"),
    ("concept", "../x", "NAME, NAME+NAME or none"),
    ("concept", "riff+riff", "names a concept twice"),
    ("concept_strength", 3.5, "in 0..3"),
    ("concept_strength", float("nan"), "finite"),
    ("concept_learn_s", 1, "in 5..600"),
    ("concept_learn_steps", 0, "in 1..1000"),
    ("web", "yes", "true or false"),
    ("web_host", " ", "must not be empty"),
    ("web_port", 70000, "in 0..65535"),
]


@pytest.mark.parametrize(
    ("name", "value", "fragment"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID]
)
def test_every_invalid_field_is_named(name: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict({name: value})  # by option name: `yield` is a Python keyword
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert fragment in message
    assert info.value.field == name


def test_every_field_has_an_invalid_case() -> None:
    # keeps INVALID honest when a field is added (model_dir, the MQTT strings are free text)
    free_text = {"model_dir", "midi_out", "mqtt_username", "mqtt_password", "mqtt_cafile"}
    covered = {n for n, _, _ in INVALID} | free_text
    assert covered == set(ServeConfig.field_names())


def test_concept_options_from_flags_and_toml(tmp_path: Path) -> None:
    from divergent.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--concepts", "/c", "--concept", "riff+waltz", "--concept-learn-steps", "3"]
    )
    cfg = config_from_args(args)
    assert (cfg.concepts, cfg.concept, cfg.concept_learn_steps) == ("/c", "riff+waltz", 3)
    assert cfg.concept_learn_s == 120.0
    path = tmp_path / "serve.toml"
    path.write_text(cfg.to_toml())
    assert ServeConfig.from_toml(path) == cfg
    assert ServeConfig(concept="None").concept == "None"  # none, any case: no concept


def test_conversions_and_parsed_addresses() -> None:
    c = ServeConfig(
        bpm=96, divergence=1, heartbeat_s=0, osc_reply="[::1]:9101", mqtt="broker.local", seed=0
    )
    assert isinstance(c.bpm, float) and c.bpm == 96.0
    assert isinstance(c.divergence, float)
    assert c.reply_address == ("::1", 9101)
    assert c.mqtt_address == ("broker.local", 1883)
    tls = ServeConfig(mqtt="broker.local", mqtt_tls=True, mqtt_cafile="ca.pem")
    assert tls.mqtt_address == ("broker.local", 8883)
    assert ServeConfig(mqtt="b:1884", mqtt_tls=True).mqtt_address == ("b", 1884)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:9001", None, ("127.0.0.1", 9001)),
        (" localhost:1 ", None, ("localhost", 1)),
        ("[::1]:9001", None, ("::1", 9001)),
        ("[fe80::1]", 1883, ("fe80::1", 1883)),
        ("broker", 1883, ("broker", 1883)),
    ],
)
def test_parse_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default) == expected


@pytest.mark.parametrize("text", ["broker", "[::1", "[::1]x", "a:65536", "a:-1", "a:", ""])
def test_parse_host_port_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# --- dict and TOML -------------------------------------------------------------------------


def custom() -> ServeConfig:
    return ServeConfig(
        mode="jam",
        quantize="bar",
        clock="link",
        bpm=97.5,
        bars=8,
        divergence=0.3,
        temperature=0.9,
        top_p=0.9,
        seed=7,
        phrase_silence_s=0.4,
        bar_ends_phrase=True,
        max_note_s=4.0,
        midi_backend="jack",
        midi_in="keys",
        midi_out="synth",
        midi_client="dv",
        osc_host="0.0.0.0",
        osc_port=9100,
        osc_reply="10.0.0.2:9201",
        heartbeat_s=0.5,
        sessions="/tmp/takes",
        record=False,
        model_dir="m",
        decoder="fp32",
        device="cuda",
        channel=10,
        velocity=100,
        mqtt="broker:1884",
        mqtt_username="u",
        mqtt_password="p w",
        mqtt_tls=True,
        mqtt_cafile="ca.pem",
        instance="stage-left",
        trace="t.jsonl",
        log_level="debug",
    )


@pytest.mark.parametrize("make", [ServeConfig, custom], ids=["defaults", "custom"])
def test_toml_round_trip(make: Any, tmp_path: Path) -> None:
    c = make()
    path = tmp_path / "serve.toml"
    path.write_text(c.to_toml(), encoding="utf-8")
    assert ServeConfig.from_toml(path) == c
    assert ServeConfig.from_dict(c.to_dict()) == c


def test_to_toml_leaves_out_none() -> None:
    data = tomllib.loads(ServeConfig().to_toml())
    assert "seed" not in data and "mqtt" not in data
    assert data["mode"] == "call" and data["record"] is True
    assert set(data) == {k for k, v in ServeConfig().to_dict().items() if v is not None}


def test_unknown_keys_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict({"divergance": 0.5, "mode": "jam"})
    assert "unknown option(s) divergance" in str(info.value)
    assert "valid options: mode, quantize" in str(info.value)
    assert info.value.field == "divergance"
    path = tmp_path / "c.toml"
    path.write_text('mode = "jam"\n[osc]\nport = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}: unknown option\(s\) osc; valid options"):
        ServeConfig.from_toml(path)


def test_toml_errors_are_friendly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.toml"):
        ServeConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("mode = call\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 1"):
        ServeConfig.from_toml(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("bpm = 1000\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"wrong.toml: bpm: must be in 20..300, got 1000"):
        ServeConfig.from_toml(wrong)
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot read config file"):
        ServeConfig.from_toml(folder)


def test_merged() -> None:
    base = custom()
    assert base.merged({}) == base
    assert base.merged({"bpm": None, "mode": None}) == base  # None = not given
    m = base.merged({"bpm": 100, "record": True})
    assert (m.bpm, m.record, m.mode) == (100.0, True, "jam")
    assert base.bpm == 97.5  # a new object; the original is unchanged
    with pytest.raises(ConfigError, match=r"bars: must be in 1\.\.16"):
        base.merged({"bars": 99})
    with pytest.raises(ConfigError, match="unknown option"):
        base.merged({"nope": 1})


# --- flags ---------------------------------------------------------------------------------


def test_flags_default_to_none() -> None:
    args = parser().parse_args([])
    for f in fields(ServeConfig):
        assert getattr(args, f.name, None) is None, f.name
    assert args.config is None and args.print_config is False
    assert config_from_args(args) == ServeConfig()


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(custom().to_toml(), encoding="utf-8")
    args = parser().parse_args(
        [
            "--config",
            str(path),
            "--mode",
            "call",
            "--bpm",
            "140",
            "--no-record",
            "--phrase-silence",
            "1.5",
            "--max-note-s",
            "2",
            "--channel",
            "3",
            "--osc-reply",
            "127.0.0.1:9301",
            "--midi-in",
            "Launchkey MK3",
            "--no-mqtt-tls",
            "--bar-ends-phrase",
        ]
    )
    c = config_from_args(args)
    assert (c.mode, c.bpm, c.record, c.phrase_silence_s, c.max_note_s, c.channel) == (
        "call",
        140.0,
        False,
        1.5,
        2.0,
        3,
    )
    assert c.reply_address == ("127.0.0.1", 9301)
    assert c.midi_in == "Launchkey MK3"
    # what the flags did not mention comes from the file
    assert (c.quantize, c.divergence, c.instance, c.seed) == ("bar", 0.3, "stage-left", 7)
    assert c.bar_ends_phrase is True
    assert c.mqtt_tls is False and c.mqtt_cafile == "ca.pem"  # the CA file just goes unused


def test_every_serve_flag_reaches_its_field(tmp_path: Path) -> None:
    args = parser().parse_args(
        [
            "--mode",
            "jam",
            "--quantize",
            "beat",
            "--clock",
            "midi",
            "--bpm",
            "90",
            "--bars",
            "2",
            "--divergence",
            "0.7",
            "--temperature",
            "1.2",
            "--top-p",
            "0.8",
            "--seed",
            "3",
            "--midi-backend",
            "jack",
            "--midi-in",
            "i",
            "--midi-out",
            "o",
            "--osc-host",
            "0.0.0.0",
            "--osc-port",
            "0",
            "--osc-reply",
            "h:1",
            "--sessions",
            "s",
            "--record",
            "--model-dir",
            "m",
            "--decoder",
            "int8",
            "--device",
            "cuda",
            "--mqtt",
            "b:2",
            "--mqtt-username",
            "u",
            "--mqtt-password",
            "p",
            "--mqtt-tls",
            "--mqtt-cafile",
            "ca",
            "--instance",
            "x",
            "--trace",
            "t.jsonl",
            "--phrase-silence",
            "0.3",
            "--channel",
            "16",
            "--max-note-s",
            "5",
            "--velocity",
            "64",
            "--log-level",
            "warning",
            "--no-bar-ends-phrase",
            "--print-config",
        ]
    )
    c = config_from_args(args)
    assert c == ServeConfig(
        mode="jam",
        quantize="beat",
        clock="midi",
        bpm=90,
        bars=2,
        divergence=0.7,
        temperature=1.2,
        top_p=0.8,
        seed=3,
        midi_backend="jack",
        midi_in="i",
        midi_out="o",
        osc_host="0.0.0.0",
        osc_port=0,
        osc_reply="h:1",
        sessions="s",
        record=True,
        model_dir="m",
        decoder="int8",
        device="cuda",
        mqtt="b:2",
        mqtt_username="u",
        mqtt_password="p",
        mqtt_tls=True,
        mqtt_cafile="ca",
        instance="x",
        trace="t.jsonl",
        phrase_silence_s=0.3,
        channel=16,
        max_note_s=5,
        velocity=64,
        log_level="warning",
        bar_ends_phrase=False,
    )
    assert args.print_config is True


def test_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--mode", "solo"])
    assert "invalid choice: 'solo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["--bpm", "fast"])
    with pytest.raises(ConfigError, match=r"bpm: must be in 20\.\.300"):
        config_from_args(parser().parse_args(["--bpm", "1000"]))
    with pytest.raises(ConfigError, match="config file not found"):
        config_from_args(parser().parse_args(["--config", "/nonexistent/serve.toml"]))


def test_help_renders() -> None:
    text = parser().format_help()
    assert "--phrase-silence S" in text and "--no-record" in text
    assert "--osc-reply HOST:PORT" in text
    assert "default: 0.6" in text


def test_each_range_and_choice_is_declared_once() -> None:
    """The live controls accept what the options accept, and the bridges agree."""
    from divergent.bridges.clock import BPM_MAX, BPM_MIN, CLOCK_SOURCES
    from divergent.bridges.midi import MIDI_BACKENDS as BRIDGE_BACKENDS
    from divergent.server.app import Server
    from divergent.server.config import CLOCKS, MIDI_BACKENDS, MODES, QUANTIZE, arg_range
    from divergent.server.control import controls_of

    by_address = {c.address: c.args[0] for c in controls_of(Server) if c.args}
    for address, option in (
        ("/divergent/tempo", "bpm"),
        ("/divergent/divergence", "divergence"),
        ("/divergent/temperature", "temperature"),
        ("/divergent/bars", "bars"),
        ("/divergent/mode", "mode"),
        ("/divergent/quantize", "quantize"),
        ("/divergent/clock", "clock"),
        ("/divergent/concept/strength", "concept_strength"),
    ):
        arg = by_address[address]
        want = arg_range(option)
        got = {"choices": arg.choices} if arg.choices else {"lo": arg.lo, "hi": arg.hi}
        assert got == want, address
    rules = [ServeConfig.rule(name)["choices"] for name in ("mode", "quantize", "clock")]
    assert rules == [MODES, QUANTIZE, CLOCKS]
    assert CLOCKS == CLOCK_SOURCES and MIDI_BACKENDS == BRIDGE_BACKENDS
    assert arg_range("bpm") == {"lo": BPM_MIN, "hi": BPM_MAX}
    # a concept's strength: the model's range and default, for serve and generate alike
    from divergent.model.generate import CONCEPT_STRENGTH, CONCEPT_STRENGTHS

    assert arg_range("concept_strength") == dict(zip(("lo", "hi"), CONCEPT_STRENGTHS, strict=True))
    assert ServeConfig().concept_strength == CONCEPT_STRENGTH
    # --device: declared in model.files, the one rule for serve, generate and bench model
    from divergent.cli import build_parser
    from divergent.model.files import DECODER_CHOICES, DEVICE_CHOICES

    assert ServeConfig.rule("device")["choices"] == DEVICE_CHOICES
    assert ServeConfig.rule("decoder")["choices"] == DECODER_CHOICES
    cli = build_parser()
    for command in (["generate", "p.mid", "-o", "out.mid"], ["bench", "model"]):
        assert cli.parse_args(command).device == ServeConfig().device == "cpu"
        assert cli.parse_args([*command, "--device", "cuda"]).device == "cuda"
        with pytest.raises(SystemExit):
            cli.parse_args([*command, "--device", "gpu"])
