"""The per-host decoder choice: self-benchmark, decision rule, cache (no timing asserted)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from divergent.model import host
from divergent.model.files import PRECISIONS, PREFILL_PRECISIONS, decoder_file
from divergent.model.host import CHOICE_CACHE_FILE, Choice, HostBenchConfig, choose_decoder
from divergent.model.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    DeviceError,
    IncrementalDecoder,
    ModelError,
    ModelFiles,
    OnnxModel,
    check_device,
    device_precision,
    off_device,
    profile_placement,
    session_device,
    session_options,
)
from tests.conftest import cuda_provider_here, require, step_by_hand

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
    # the prefill raced too, every file that can write the cache against the others
    assert set(first.prefill_measured) == {"int8", "fp32", "int8dyn"}
    assert first.prefill_variant in (*PRECISIONS, *PREFILL_PRECISIONS)
    # a prefill-only file never steps
    assert all(not k.startswith("int8dyn/") for k in first.measured)
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
    assert again.prefill_variant == first.prefill_variant
    m = again.load(model_dir)
    assert (m.precision, m.prefill_precision) == (again.variant, again.prefill_variant)


def test_another_cpu_or_request_is_measured_anew(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choose_decoder(model_dir, "auto", cache_dir=tmp_path, config=QUICK)
    fixed = choose_decoder(model_dir, "fp32", cache_dir=tmp_path, config=QUICK)
    assert fixed.variant == "fp32" and not fixed.cached and set(fixed.measured) == {"fp32/1"}
    # a variant asked for runs prefills too: nothing raced for them
    assert fixed.prefill_variant == "fp32" and not fixed.prefill_measured
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
    assert json.loads((tmp_path / CHOICE_CACHE_FILE).read_text())["version"] == host._CACHE_VERSION


def test_a_cache_of_the_layout_before_prefills_is_measured_anew(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = choose_decoder(model_dir, "int8", cache_dir=tmp_path, config=QUICK)
    path = tmp_path / CHOICE_CACHE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "version": 1}))
    with caplog.at_level(logging.WARNING, logger="divergent.model.host"):
        again = choose_decoder(model_dir, "int8", cache_dir=tmp_path, config=QUICK)
    assert not again.cached and "another format" in caplog.text
    assert again.variant == first.variant


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


def test_the_prefill_keeps_the_steps_variant_unless_another_is_clearly_faster() -> None:
    cfg = HostBenchConfig(margin=0.85)
    assert host._decide_prefill("int8", {"int8": 10.0, "fp32": 9.0}, 128, cfg) == ("int8", "")
    (variant, why) = host._decide_prefill("int8", {"int8": 10.0, "fp32": 6.0}, 128, cfg)
    assert variant == "fp32" and "1.67× int8" in why and "128 tokens" in why
    # nothing raced (a variant asked for): the step's own
    assert host._decide_prefill("fp32", {}, 128, cfg) == ("fp32", "")
    three = {"int8": 10.0, "fp32": 8.0, "int8dyn": 5.0}
    assert host._decide_prefill("int8", three, 128, cfg)[0] == "int8dyn"
    c = Choice(variant="int8", threads=1, why="w", prefill="fp32")
    assert c.prefill_variant == "fp32" and "prefills fp32" in c.banner()
    assert Choice(variant="int8", threads=1, why="w").prefill_variant == "int8"


@pytest.mark.parametrize("prefill", ["fp32", "int8dyn"])
def test_a_prefill_in_another_precision_writes_the_cache_the_step_reads(
    model_dir: Path, prefill: str
) -> None:
    int8 = OnnxModel(model_dir, precision="int8")
    both = OnnxModel(model_dir, precision="int8", prefill=prefill)
    assert both.prefill_decoder is not both.decoder and both.prefill_precision == prefill
    assert int8.prefill_decoder is int8.decoder and int8.prefill_precision == "int8"
    # the prefill file alone, on a cache of its own
    alone = OnnxModel(model_dir, precision="int8", prefill=prefill)
    ids = np.random.default_rng(0).integers(5, 100, 40)
    mixed, ref = IncrementalDecoder(both), IncrementalDecoder(int8, session=alone.prefill_decoder)
    # the prefill is that file's, to the bit
    np.testing.assert_array_equal(mixed.feed(ids, all_logits=True), ref.feed(ids, all_logits=True))
    # a chunk on the history is a prefill too: that file's again
    np.testing.assert_array_equal(mixed.feed([8, 9, 10]), ref.feed([8, 9, 10]))
    # one step: the int8 file on the cache the prefill wrote (the same call made by
    # hand from the prefill file's cache gives the same logits, to the bit)
    by_hand = step_by_hand(int8.decoder, int8, ref, token=7)
    np.testing.assert_array_equal(mixed.feed([7]), by_hand)
    # a concept's copy carries its weights in its own int8 session: that runs its
    # prefills (the prefill file has the base weights)
    copy = both.with_decoder_initializers({})
    assert copy.prefill_decoder is copy.decoder and copy.prefill_precision == "int8"
    assert both.prefill_decoder is not both.decoder  # the original is untouched
    with pytest.raises(ModelError, match="precision must be one of"):
        OnnxModel(model_dir, precision="int8", prefill="fp16")


def test_the_prefill_only_file_never_steps(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="only prefills"):
        OnnxModel(model_dir, precision="int8dyn")
    # --decoder takes step precisions only
    with pytest.raises(ValueError, match="decoder must be one of"):
        choose_decoder(model_dir, "int8dyn", cache_dir=tmp_path, config=QUICK)


def test_a_cached_prefill_file_that_is_gone_is_measured_anew(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def measured(root, candidates, cfg, prefill, prefill_only=()):  # type: ignore[no-untyped-def]
        pre = {"int8": 10.0, "fp32": 8.0, **{v: 4.0 for v in prefill_only}}
        return {c: 1.0 for c in candidates}, pre if prefill else {}, 100

    monkeypatch.setattr(host, "_measure", measured)
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    first = choose_decoder(folder, "auto", cache_dir=tmp_path, config=QUICK)
    assert first.prefill_variant == "int8dyn" and "prefills int8dyn" in first.banner()
    assert choose_decoder(folder, "auto", cache_dir=tmp_path, config=QUICK).cached
    m = first.load(folder)
    assert (m.precision, m.prefill_precision) == ("int8", "int8dyn")
    (folder / decoder_file("int8dyn")).unlink()
    again = choose_decoder(folder, "auto", cache_dir=tmp_path, config=QUICK)
    assert not again.cached and again.prefill_variant == "fp32"


def test_choice_round_trips_through_a_dict() -> None:
    c = Choice(variant="int8", threads=1, why="w", measured={"int8/1": 0.5})
    assert Choice(**c.to_dict()) == c


# --- the device (--device cpu|cuda) -----------------------------------------------------


def test_the_banner_names_the_device(model_dir: Path, tmp_path: Path) -> None:
    choice = choose_decoder(model_dir, "int8", cache_dir=tmp_path, config=QUICK)
    assert choice.device == "cpu" and choice.banner().startswith("decoder int8 on cpu, 1 ")
    # an entry cached before the device was recorded reads back as cpu
    old = {k: v for k, v in choice.to_dict().items() if k not in ("device", "cached")}
    assert Choice(**old).device == "cpu"


def test_the_decoder_precision_per_device(model_dir: Path, tmp_path: Path) -> None:
    files = ModelFiles(model_dir)
    assert device_precision(files, "auto", "cpu") == "int8"
    assert device_precision(files, "fp32", "cpu") == "fp32"
    # cuda: fp32 (the int8 decoder's MatMulNBits is a CPU kernel); int8 asked is refused
    assert device_precision(files, "auto", "cuda") == "fp32"
    assert device_precision(files, "fp32", "cuda") == "fp32"
    with pytest.raises(DeviceError, match=r"MatMulNBits .* is a CPU kernel"):
        device_precision(files, "int8", "cuda")
    partial = tmp_path / "model"
    shutil.copytree(model_dir, partial)
    (partial / decoder_file("fp32")).unlink()
    with pytest.raises(DeviceError, match="needs the fp32 decoder"):
        device_precision(ModelFiles(partial), "auto", "cuda")


def test_cuda_without_the_gpu_build_is_refused_naming_what_to_install(model_dir: Path) -> None:
    check_device("cpu")
    with pytest.raises(DeviceError, match="one of cpu, cuda"):
        check_device("gpu")
    require(not cuda_provider_here(), "an ONNX Runtime without the CUDA provider, as CI's")
    for refused in (
        lambda: check_device("cuda"),
        lambda: OnnxModel(model_dir, device="cuda"),
        lambda: choose_decoder(model_dir, "auto", device="cuda"),
    ):
        with pytest.raises(DeviceError) as info:
            refused()
        message = str(info.value)
        assert "\n" not in message and "pip install onnxruntime-gpu" in message
        assert "CUDAExecutionProvider" in message


def test_the_profile_says_which_provider_ran_each_compute_node(
    model_dir: Path, tmp_path: Path
) -> None:
    """What refuses a GPU that would leave compute on the CPU, read from a real profile
    (here every node ran on the CPU, so all of them are "off" CUDA)."""
    import onnxruntime as ort

    m = OnnxModel(model_dir, precision="fp32", device="cpu")
    so = session_options(1)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    m.decoder = ort.InferenceSession(str(m.files.decoder("fp32")), so, providers=[CPU_PROVIDER])
    m.logits(np.array([[m.tokenizer.vocab.bos]]), np.zeros((1, m.z_dim)))
    placement = profile_placement(m.decoder.end_profiling())
    ops = {op for op, _ in placement.values()}
    assert "GroupQueryAttention" in ops and "MatMul" in ops
    assert {ran for _, ran in placement.values()} == {CPU_PROVIDER}
    off = off_device(placement, CUDA_PROVIDER)
    assert off["GroupQueryAttention"] == m.n_layer and off["MatMul"] > 0
    assert "Shape" not in off and "Gather" not in off  # bookkeeping may stay on the CPU
    assert not off_device(placement, CPU_PROVIDER)


def test_the_cpu_cache_outlives_garbage_collection(model_dir: Path) -> None:
    """The KV cache buffers the bindings point into are kept by the decoder (a CPU
    OrtValue holds its numpy array only through its Python object)."""
    import gc

    m = OnnxModel(model_dir, precision="fp32", device="cpu")
    dec = IncrementalDecoder(m)
    assert dec.device == "cpu" and session_device(m.decoder) == ("cpu", 0)
    gc.collect()
    ids = np.arange(4, 40) % m.vocab_size
    for t in ids:
        dec.feed([int(t)])
    whole = m.logits(ids[None, :], np.zeros((1, m.z_dim)))[0, -1]
    assert np.allclose(dec.last_logits, whole, atol=1e-4)


def test_cuda_runs_on_the_gpu_or_is_refused() -> None:
    """On a GPU machine with onnxruntime-gpu: the bundled model either runs on the GPU
    (every compute node there, the cache in GPU memory, the same logits as the CPU's
    fp32) or is refused with the reason; never quietly on the CPU. Without the GPU build
    (CI, this project's machines) the reason is the missing provider."""
    try:
        gpu = OnnxModel(None, device="cuda")
    except DeviceError as e:
        if not cuda_provider_here():
            assert "pip install onnxruntime-gpu" in str(e), e
            return
        # the shipped decoder is fp32, and ORT's CUDA GroupQueryAttention takes fp16/bf16
        assert "GroupQueryAttention" in str(e) or "could not start" in str(e), e
        return
    assert cuda_provider_here(), "cuda accepted by an ONNX Runtime without its provider"
    cpu = OnnxModel(None, precision="fp32", device="cpu")
    assert gpu.precision == "fp32" and gpu.device == "cuda"
    assert session_device(gpu.decoder)[0] == "cuda"
    on_gpu, on_cpu = IncrementalDecoder(gpu), IncrementalDecoder(cpu)
    assert on_gpu.device == "cuda"
    ids = np.arange(4, 60) % gpu.vocab_size
    on_gpu.feed(ids[:40])
    on_cpu.feed(ids[:40])
    for t in ids[40:]:
        on_gpu.feed([int(t)])
        on_cpu.feed([int(t)])
        assert np.allclose(on_gpu.last_logits, on_cpu.last_logits, atol=2e-3)
