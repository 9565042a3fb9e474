"""The bench's floors: the step's shapes, its multiply-adds and bytes, the MatMul chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divergent.model.bench import _step_shapes, chain_bytes, floor_chain, step_bytes, step_macs
from divergent.model.runtime import OnnxModel, default_model_dir


def test_bundled_step_macs() -> None:
    m = OnnxModel(default_model_dir(), precision="int8", device="cpu")
    d, V, Z, L = 256, 411, 16, 4
    weights = Z * d + L * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + d * V
    assert weights == 3_255_040  # the fp32 decoder's MatMul weights
    attention = L * 2 * d * 256  # q.K and p.V over a 256-token cache, every head
    assert step_macs(m, 256) == weights + attention


def test_floor_chain_runs_every_product(tiny_model: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    m = OnnxModel(tiny_model[0], precision="int8", device="cpu")
    names = [n for n, _, _ in _step_shapes(m, 32)]
    assert len(names) == 2 + 6 * m.n_layer and len(set(names)) == len(names)
    run = floor_chain(m, 32)
    run()
    run()  # outputs are bound once: running again reuses them


@pytest.mark.parametrize("ctx", [64, 256, 512])
def test_bundled_step_bytes(ctx: int) -> None:
    # the fp32 step reads what the chain reads (weights and cache in float32, one row of
    # each embedding table), to within the chain's inputs and the model's small tensors;
    # the int8 step reads its 8-bit weights and their block scales
    d, V, Z, L = 256, 411, 16, 4
    cache = L * 2 * d * ctx * 4
    fp32 = step_bytes(OnnxModel(default_model_dir(), precision="fp32", device="cpu"), ctx)
    chain = chain_bytes(OnnxModel(default_model_dir(), precision="int8", device="cpu"), ctx)
    matmul_weights = 4 * (Z * d + L * 12 * d * d + d * V)
    # one row of each embedding table, 9 LayerNorms' scales and shifts, the biases
    small = 4 * (2 * d + 9 * 2 * d + L * 9 * d)
    assert 0 <= fp32 - (matmul_weights + cache + small) < 64  # and a few scalars
    assert abs(chain - fp32) < 0.01 * fp32
    int8 = step_bytes(OnnxModel(default_model_dir(), precision="int8", device="cpu"), ctx)
    packed = (Z * d + L * 12 * d * d + d * V) * (1 + 4 / 16)  # a byte a weight, 4 per 16
    assert 0.9 * (packed + cache) < int8 < 1.1 * (packed + cache)
    assert int8 < fp32 - 2 * packed


def test_bench_reports_the_bytes_floor(tiny_model: tuple[Path, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    from divergent.model.bench import bench_model

    res = bench_model(tiny_model[0], repeats=3, bars=2, cache_dir=tmp_path)
    json.dumps(res, allow_nan=False)
    floor, served = res["floor"], res["bytes_floor"]
    m = OnnxModel(tiny_model[0], precision=res["decoder"]["variant"], device="cpu")
    assert served["context"] == floor["context"]
    assert served["bytes"] == step_bytes(m, served["context"])
    assert floor["bytes"] == chain_bytes(m, floor["context"])
    rate = floor["bytes"] / floor["ms"]["p50"]  # bytes per ms
    assert served["ms"] == pytest.approx(served["bytes"] / rate, abs=1e-4)  # rounded
    assert floor["gb_per_s"] == pytest.approx(rate / 1e6, abs=0.01)
    key = str(served["context"])
    assert res["bytes_floor_ratio"] == round(res["auto_token_ms"][key]["p50"] / served["ms"], 2)
