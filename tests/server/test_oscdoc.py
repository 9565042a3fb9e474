"""docs/osc.md is generated from the handlers' declarations and must not drift."""

from __future__ import annotations

from divergent.server.app import REPLIES, Server
from divergent.server.control import controls_of
from divergent.server.oscdoc import DOC_PATH, render


def test_docs_osc_md_matches_the_declarations() -> None:
    assert DOC_PATH.read_text() == render(), (
        "docs/osc.md is out of date: run `python -m divergent.server.oscdoc --write`"
    )


def test_every_control_and_reply_is_documented() -> None:
    text = DOC_PATH.read_text()
    for c in controls_of(Server):
        assert f"`{c.address}`" in text or c.address in text
    for r in REPLIES:
        assert r.address in text
