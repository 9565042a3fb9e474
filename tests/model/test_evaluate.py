"""`divergent evaluate nll` and `evaluate latent` on the tiny test model."""

from __future__ import annotations

import math

import pytest

from divergent.model.evaluate import evaluate_latent, evaluate_nll


def test_evaluate_nll_reports_bounds_and_baseline(tiny_model, tiny_dataset) -> None:  # type: ignore[no-untyped-def]
    res = evaluate_nll(data=tiny_dataset, model_dir=tiny_model[0], order=3, window=64)
    assert res["tokens"] > 100
    assert 0 < res["model_nll"] < math.log(411)
    assert 0 < res["baseline_nll"] < math.log(411)
    assert res["ratio"] == pytest.approx(res["model_nll"] / res["baseline_nll"])
    # the importance-weighted bound is at least as tight as the ELBO (up to sampling)
    assert res["model_nll"] <= res["model_nll_elbo"] + 0.05
    assert res["baseline_order"] == 3


def test_evaluate_nll_selects_the_best_order(tiny_model, tiny_dataset) -> None:  # type: ignore[no-untyped-def]
    res = evaluate_nll(data=tiny_dataset, model_dir=tiny_model[0], max_tokens=2000)
    per = {int(k): v for k, v in res["baseline_nll_by_order"].items()}
    assert set(per) == {3, 4, 5, 6}
    assert res["baseline_order"] == min(per, key=lambda k: per[k])


def test_evaluate_latent_reports_kl_and_variance_ratios(tiny_model, tiny_dataset) -> None:  # type: ignore[no-untyped-def]
    res = evaluate_latent(
        data=tiny_dataset,
        model_dir=tiny_model[0],
        prompts=2,
        latents=3,
        seeds=2,
        bars=2,
        prompt_tokens=64,
    )
    assert len(res["kl_per_dim"]) == 4
    assert res["kl_per_phrase_mean"] >= 0
    assert set(res["between_over_within"]) >= {"mean_pitch", "notes_per_bar"}
