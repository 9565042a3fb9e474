"""ModelConfig: read back from what a model folder and its checkpoints hold, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divergent.model.files import CONFIG_FILE, DIVERGED_WEIGHTS_FILE, WEIGHTS_FILE

BUNDLED = Path(__file__).resolve().parents[2] / "model" / "bundled"


def test_model_config_reads_the_bundled_config_and_checkpoints() -> None:
    import torch

    from divergent.model.transformer import ModelConfig

    d = json.loads((BUNDLED / CONFIG_FILE).read_text())["model"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.to_dict() == d
    for name in (WEIGHTS_FILE, DIVERGED_WEIGHTS_FILE):
        blob = torch.load(BUNDLED / name, map_location="cpu", weights_only=False)
        assert ModelConfig.from_dict(blob["model_config"]) == cfg


def test_model_config_refuses_unknown_keys() -> None:
    from divergent.model.transformer import ModelConfig

    d = ModelConfig().to_dict()
    # a typo must not train (or load) a default-sized model quietly
    with pytest.raises(ValueError, match=r"unknown model config.*'n_layers'"):
        ModelConfig.from_dict({**d, "n_layers": 8})
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({"vocab_size": 411, "rope": True})
