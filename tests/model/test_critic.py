"""The domain critic: classes from the manifest, training beats chance, ONNX twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from divergent.model.critic import (
    CriticConfig,
    OnnxCritic,
    PhraseBank,
    class_of_works,
    mmd2,
)
from divergent.model.files import CRITIC_ONNX_FILE, CRITIC_PT_FILE, MANIFEST_FILE


def test_classes_follow_the_manifest_and_merge_small_collections(two_class_dataset: Path) -> None:
    classes, labels = class_of_works(two_class_dataset, min_works=10)
    assert classes == ["airdsAirs", "essenFolksong"]
    manifest = json.loads((two_class_dataset / MANIFEST_FILE).read_text())
    n_train = sum(1 for w in manifest["works"] if w.get("split") == "train")
    assert len(labels["train"]) == n_train
    merged, _ = class_of_works(two_class_dataset, min_works=10_000)
    assert merged == ["other"]


def test_phrases_start_at_bar_lines(two_class_dataset: Path) -> None:
    _, labels = class_of_works(two_class_dataset, min_works=10)
    bank = PhraseBank(two_class_dataset, "train", labels["train"], 64)
    x, y = bank.balanced(16, np.random.default_rng(0))
    assert x.shape == (16, 64)
    assert set(y.tolist()) <= {0, 1}
    assert (x[:, 0] == bank.vocab.bar).all()


def test_critic_trains_beats_chance_and_its_onnx_twin_agrees(
    two_class_critic: tuple[Path, dict],  # type: ignore[type-arg]
) -> None:
    import torch

    from divergent.model.critic import load_critic

    folder, card = two_class_critic
    assert card["classes"] == ["airdsAirs", "essenFolksong"]
    # held out by work; two classes: chance is 0.5
    assert card["val_balanced_accuracy"] > card["chance_balanced_accuracy"] + 0.15
    net, blob = load_critic(folder / CRITIC_PT_FILE)
    assert all(not p.requires_grad for p in net.parameters())  # frozen
    onnx = OnnxCritic(folder / CRITIC_ONNX_FILE)
    ids = np.random.default_rng(0).integers(4, blob["vocab_size"], size=(3, 50))
    with torch.no_grad():
        ref = net(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(onnx.features(list(ids)), ref, atol=1e-4)
    # soft input with one-hot rows is the same network
    soft = torch.nn.functional.one_hot(torch.from_numpy(ids), blob["vocab_size"]).float()
    with torch.no_grad():
        np.testing.assert_allclose(net.forward_soft(soft).numpy(), ref, atol=1e-5)


def test_mmd_is_zero_for_equal_sets_and_grows_with_distance() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    assert mmd2(x, x) == pytest.approx(0.0, abs=1e-12)
    near, far = mmd2(x, x + 0.5), mmd2(x, x + 2.0)
    assert 0 < near < far


def test_config_round_trip_and_validation() -> None:
    c = CriticConfig(steps=10)
    assert CriticConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        CriticConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        CriticConfig(lr=0.0)
