"""A tiny model trained in seconds, exported, and checked against torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from divergent.model.data import load_split
from divergent.model.files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENCODER_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    decoder_file,
)
from divergent.model.train_config import TrainConfig
from tests.conftest import TINY


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path) -> Path:
    return tiny_dataset


@pytest.fixture(scope="module")
def trained(tiny_run: Path) -> Path:
    return tiny_run


def test_training_learns_and_logs(trained: Path) -> None:
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [10, 20]
    assert log[-1]["val_ce"] < np.log(411)  # better than uniform after 20 steps
    assert (trained / WEIGHTS_FILE).exists() and (trained / CHECKPOINT_FILE).exists()


def test_resume_continues_from_checkpoint(dataset: Path, trained: Path, tmp_path: Path) -> None:
    import shutil

    from divergent.model.train import train

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = TrainConfig(data=str(dataset), out=str(run), max_steps=30, resume=True, **TINY)  # type: ignore[arg-type]
    metrics = train(cfg)
    assert metrics["step"] == 30
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


def test_train_config_round_trip(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY)  # type: ignore[arg-type]
    p = tmp_path / "c.json"
    p.write_text(cfg.to_json())
    assert TrainConfig.from_json(p) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        TrainConfig(seq_len=700, block_size=640)


@pytest.fixture(scope="module")
def exported(tiny_model: tuple[Path, dict]) -> tuple[Path, dict]:  # type: ignore[type-arg]
    return tiny_model


def test_export_parity(exported) -> None:  # type: ignore[no-untyped-def]
    out, report = exported
    p = report["parity"]
    assert p["fp32_max_abs_logit_diff"] <= 1e-4
    assert p["fp32_incremental_max_abs_logit_diff"] <= 1e-4
    assert p["int8_top1_agreement"] >= 0.9
    assert abs(p["int8_nll_diff"]) < 0.05
    # int8 steps after a prefill on each file that can write their cache, as served
    pairs = p["prefill_top1_agreement"]
    assert set(pairs) == {"int8", "fp32", "int8dyn"} and p["prefill_tokens"] > 0
    assert all(a >= 0.9 for a in pairs.values()), pairs
    ops = {p: {n.op_type for n in onnx.load(str(out / decoder_file(p))).graph.node} for p in pairs}
    assert "MatMulNBits" in ops["int8"] and "MatMul" in ops["fp32"]
    assert "MatMulInteger" in ops["int8dyn"] and "MatMulNBits" not in ops["int8dyn"]
    for name in (
        decoder_file("fp32"),
        decoder_file("int8"),
        decoder_file("int8dyn"),
        ENCODER_FILE,
        TOKENIZER_FILE,
        CONFIG_FILE,
    ):
        assert (out / name).exists()


def test_runtime_matches_torch(exported, trained: Path, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from divergent.model.runtime import IncrementalDecoder, OnnxModel
    from divergent.model.train import load_model

    out, _ = exported
    model, _ = load_model(trained / WEIGHTS_FILE)
    ort_model = OnnxModel(out, precision="fp32")
    val, _ = load_split(dataset, "train")
    ids = val[:50].astype(np.int64)
    z = np.linspace(-1, 1, model.cfg.z_dim).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(ids[None]), torch.from_numpy(z[None]))[0].numpy()
        mu_t, _ = model.encode(torch.from_numpy(ids[None]), torch.ones(1, len(ids)))
    dec = IncrementalDecoder(ort_model, z=z)
    dec.feed(ids[:20])
    for t in range(20, 50):
        logits = dec.feed([int(ids[t])])
        assert np.abs(logits - ref[t]).max() < 1e-4
    mu, _ = ort_model.encode(ids)
    assert np.abs(mu - mu_t[0].numpy()).max() < 1e-4


def test_decoder_slides_past_block_size(exported) -> None:  # type: ignore[no-untyped-def]
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    out, _ = exported
    m = OnnxModel(out)
    dec = IncrementalDecoder(m)
    rng = np.random.default_rng(0)
    for _ in range(m.block_size + 40):
        logits = dec.feed([int(rng.integers(0, m.vocab_size))])
        assert np.all(np.isfinite(logits))
    assert len(dec.tokens) <= m.block_size


def test_step_graph_uses_a_shared_kv_buffer(exported) -> None:  # type: ignore[no-untyped-def]
    import onnx

    out, _ = exported
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["format"] == 2 and cfg["io"]["kv_cache"] == "shared_buffer"
    for kind in ("fp32", "int8"):
        g = onnx.load(str(out / decoder_file(kind))).graph
        ops = {n.op_type for n in g.node}
        assert "GroupQueryAttention" in ops and "Concat" not in ops
        assert [i.name for i in g.input][-2:] == ["seqlens_k", "total_sequence_length"]


def test_decoder_batch_rows_chunks_and_rewind(exported, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    """A steered/base pair (batch 2) equals two single decoders; chunks equal steps."""
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    out, _ = exported
    m = OnnxModel(out, precision="fp32")
    ids = load_split(dataset, "train")[0][:60].astype(np.int64)
    rng = np.random.default_rng(1)
    zs = rng.standard_normal((2, m.z_dim)).astype(np.float32)
    full = m.logits(np.stack([ids, ids]), zs)  # (2, T, V), stateless
    pair = IncrementalDecoder(m, batch=2)
    pair.set_z(zs)
    singles = [IncrementalDecoder(m, z=zs[r]) for r in range(2)]
    for dec in (pair, *singles):
        dec.feed(ids[:20])
    got = pair.feed(ids[20:25], all_logits=True)  # a chunk on top of a history
    assert np.abs(got - full[0, 20:25]).max() < 1e-4
    for r, dec in enumerate(singles):  # batch 1 runs the chunk in one call
        got = dec.feed(ids[20:25], all_logits=True)
        assert np.abs(got - full[r, 20:25]).max() < 1e-4
    for t in range(25, 60):
        pair.feed([int(ids[t])])
        for r, dec in enumerate(singles):
            lg = dec.feed([int(ids[t])])
            assert np.abs(pair.last_logits_all[r] - lg).max() < 1e-4
            assert np.abs(lg - full[r, t]).max() < 1e-4
    # logits handed out stay valid after later steps (the step buffer is reused)
    kept = pair.last_logits.copy()
    held = pair.last_logits
    pair.feed([int(ids[0])])
    assert np.array_equal(held, kept)
    # rewinding re-uses the cache prefix: the same token gives the same logits again
    pair.rewind(59)
    again = pair.feed([int(ids[59])])
    assert np.abs(again - full[0, 59]).max() < 1e-4
    with pytest.raises(ValueError):
        pair.rewind(1000)
    # reset + a fresh prefill ignores whatever the buffers held before
    pair.reset()
    assert np.abs(pair.feed(ids[:30]) - full[0, 29]).max() < 1e-4
