"""The per-host decoder choice: self-benchmark, decision rule, cache (no timing asserted)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from divergent.model import host
from divergent.model.files import PRECISIONS, decoder_file
from divergent.model.host import CHOICE_CACHE_FILE, Choice, HostBenchConfig, choose_decoder
from divergent.model.runtime import ModelError, OnnxModel, session_options

# a self-benchmark of a few steps: what is tested is the plumbing, not the speed
QUICK = HostBenchConfig(steps=3, rounds=2, warmup=1)


@pytest.fixture(scope="module")
def model_dir(tiny_model: tuple[Path, dict]) -> Path:  # type: ignore[type-arg]
    return tiny_model[0]


def test_config_is_validated() -> None:
    for bad in ({"steps": 0}, {"rounds": 0}, {"warmup": -1}, {"margin": 0.0}, {"margin": 1.5}):
        with pytest.raises(ValueError):
            HostBenchConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        session_options(0)


def test_auto_measures_every_decoder_then_reads_the_cache(model_dir: Path, tmp_path: Path) -> None:
    first = choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK)
    assert first.variant in PRECISIONS and first.threads >= 1 and not first.cached
    assert {"int8/1", "fp32/1"} <= set(first.measured)
    assert first.context == 159  # the tiny model's block_size is 160
    assert first.why and first.variant in first.banner()
    data = json.loads((tmp_path / CHOICE_CACHE_FILE).read_text())
    assert len(data["entries"]) == 1
    (key,) = data["entries"]
    assert host.cpu_model() in key and "onnxruntime" in key
    again = choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK)
    assert again.cached and (again.variant, again.threads) == (first.variant, first.threads)
    assert again.measured == first.measured and "cached" in again.banner()
    fresh = choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK, refresh=True)
    assert not fresh.cached
    # the choice loads as the serving model
    m = OnnxModel(model_dir, precision=again.variant, threads=again.threads, device="cpu")
    assert m.precision == again.variant


def test_another_cpu_or_request_is_measured_anew(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK)
    fixed = choose_decoder(model_dir, "fp32", cache_dir=tmp_path, config=QUICK)
    assert fixed.variant == "fp32" and not fixed.cached and set(fixed.measured) == {"fp32/1"}
    monkeypatch.setattr(host, "cpu_model", lambda: "Another CPU")
    other = choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK)
    assert not other.cached
    entries = json.loads((tmp_path / CHOICE_CACHE_FILE).read_text())["entries"]
    assert len(entries) == 3


def test_a_broken_cache_is_logged_and_replaced(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / CHOICE_CACHE_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="divergent.model.host"):
        choice = choose_decoder(model_dir, "int8", cache_dir=tmp_path, config=QUICK)
    assert choice.variant == "int8" and "ignoring" in caplog.text
    assert json.loads((tmp_path / CHOICE_CACHE_FILE).read_text())["version"] == 1


def test_bad_requests(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decoder must be one of"):
        choose_decoder(model_dir, "fp16", cache_dir=tmp_path, config=QUICK)
    partial = tmp_path / "model"
    shutil.copytree(model_dir, partial)
    (partial / decoder_file("fp32")).unlink()
    with pytest.raises(ModelError, match="missing"):
        choose_decoder(partial, "fp32", cache_dir=tmp_path, config=QUICK)
    # auto considers only the decoders present
    only = choose_decoder(partial, "auto", cache_dir=tmp_path, config=QUICK)
    assert only.variant == "int8" and all(k.startswith("int8/") for k in only.measured)


def test_decision_keeps_int8_one_thread_unless_clearly_faster() -> None:
    cfg = HostBenchConfig(margin=0.85)
    near = {("int8", 1): 1.0, ("fp32", 1): 0.9, ("int8", 2): 0.95}
    (choice, why) = host._decide(near, "auto", 256, cfg)
    assert choice == ("int8", 1) and "nothing else" in why
    far = {("int8", 1): 1.0, ("fp32", 1): 0.5, ("int8", 2): 0.95}
    (choice, why) = host._decide(far, "auto", 256, cfg)
    assert choice == ("fp32", 1) and "2.00×" in why
    # a fixed variant: its one-thread run is the baseline
    (choice, _) = host._decide({("fp32", 1): 1.0, ("fp32", 2): 0.6}, "fp32", 256, cfg)
    assert choice == ("fp32", 2)


def test_choice_round_trips_through_a_dict() -> None:
    c = Choice(variant="int8", threads=1, why="w", measured={"int8/1": 0.5})
    assert Choice(**c.to_dict()) == c
