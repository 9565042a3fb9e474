"""``bench model --concept``: a learned concept's speed beside the base model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from divergent.cli import main
from divergent.model.bench import concept_figures
from divergent.model.concept import ConceptError
from divergent.model.generate import Generator, read_prompt
from divergent.model.runtime import OnnxModel
from tests.server.test_concepts_app import learn_tiny

EXAMPLE = Path(__file__).resolve().parents[2] / "model" / "examples" / "prompt.mid"


def test_a_concept_is_measured_beside_the_base_model(tmp_path: Path) -> None:
    learn_tiny(tmp_path, "riff")
    base = Generator(OnnxModel(None, threads=1))
    _, prompt_ids = read_prompt(EXAMPLE, base.model)
    res = concept_figures(
        base, "riff", tmp_path, prompt_ids, repeats=5, bars=2, rng=np.random.default_rng(0)
    )
    json.dumps(res, allow_nan=False)
    assert res["spec"] == "riff" and res["context"] == 256 and res["build_ms"] > 0
    for who in ("base", "concept"):
        fig = res[who]
        assert 0 < fig["token_ms"]["p50"] <= fig["token_ms"]["p99"], fig
        assert 0 < fig["bar_ms"]["p50"] <= fig["bar_ms"]["p99"], fig
        assert fig["note_events_per_s"] > 0 and fig["note_events_per_s_at_d1"] > 0, fig
    ratios = res["ratio_concept_vs_base"]
    assert set(ratios) == {
        "token_ms_p50",
        "bar_ms_p99",
        "note_events_per_s",
        "note_events_per_s_at_d1",
    }
    b, c = res["base"], res["concept"]
    assert ratios["token_ms_p50"] == round(c["token_ms"]["p50"] / b["token_ms"]["p50"], 2)
    with pytest.raises(ConceptError, match="no concept named 'nope'"):
        concept_figures(
            base, "nope", tmp_path, prompt_ids, repeats=5, bars=2, rng=np.random.default_rng(0)
        )


def test_a_missing_concept_is_refused_before_anything_is_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bench", "model", "--json", "--concept", "nope", "--concepts", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("divergent: error: no concept named 'nope'"), err
    assert err.count("\n") == 1
