"""The bench's floor: the step's shapes, its multiply-add count, the MatMul chain."""

from __future__ import annotations

from pathlib import Path

from divergent.model.bench import _step_shapes, floor_chain, step_macs
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
