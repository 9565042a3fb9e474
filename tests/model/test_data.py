from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from divergent.model.data import (
    _split_abc,
    build_dataset,
    is_validation,
    list_corpus_works,
    list_midi_works,
    load_split,
)
from divergent.model.files import MANIFEST_FILE, TOKENIZER_FILE
from divergent.model.tokenizer import load_tokenizer


def test_split_is_deterministic_and_by_work() -> None:
    ids = [f"essenFolksong/x.abc#{i}" for i in range(2000)]
    first = [is_validation(i) for i in ids]
    assert first == [is_validation(i) for i in ids]
    share = sum(first) / len(first)
    assert 0.03 < share < 0.07


def test_split_abc_opus() -> None:
    header, tunes = _split_abc("%header\nX:1\nT:a\nK:C\nCDE|\nX: 7\nT:b\nK:G\nGAB|\n")
    assert header == "%header\n"
    assert [x for x, _ in tunes] == ["1", "7"]


def test_list_corpus_works_is_stable_and_filterable() -> None:
    a = list_corpus_works(limit_per_source=3, sources=["airdsAirs", "bach"])
    b = list_corpus_works(limit_per_source=3, sources=["airdsAirs", "bach"])
    assert a == b
    assert {w.source for w in a} == {"airdsAirs", "bach"}
    assert {w.kind for w in a} == {"abc", "music21"}
    assert all(w.abc for w in a if w.kind == "abc")


def test_list_midi_works_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_midi_works(tmp_path / "nope")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    import symusic

    from tests.conftest import ABC_REEL, chord_score

    d = tmp_path_factory.mktemp("midi")
    symusic.Score.from_abc(ABC_REEL).dump_midi(str(d / "reel.mid"))
    chord_score().dump_midi(str(d / "chords.mid"))
    (d / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    out = tmp_path_factory.mktemp("ds")
    summary = build_dataset(
        out,
        sources=["airdsAirs", "bach"],
        limit_per_source=4,
        midi_dirs=[d],
        workers=1,
        progress=False,
    )
    return out, {**summary.__dict__, "midi_dir": d}


def test_build_counts_and_failures(built) -> None:  # type: ignore[no-untyped-def]
    out, summary = built
    assert summary["works"] == 4 + 4 + 3
    assert summary["failed"] == 1  # the broken MIDI file, counted, not fatal
    assert summary["converted"] == 10
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    failed = [w for w in manifest["works"] if "error" in w]
    assert [w["id"] for w in failed] == ["user/broken.mid"]
    assert manifest["tokenizer_hash"] == load_tokenizer(out / TOKENIZER_FILE).hash


def test_build_writes_framed_splits(built) -> None:  # type: ignore[no-untyped-def]
    out, _ = built
    tok = load_tokenizer(out / TOKENIZER_FILE)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for split in ("train", "val"):
        ids, offsets = load_split(out, split)
        works = [w for w in manifest["works"] if w.get("split") == split]
        assert len(offsets) == len(works) + 1
        assert offsets[-1] == len(ids)
        for a, b in itertools.pairwise(offsets):
            assert ids[a] == tok.vocab.bos and ids[b - 1] == tok.vocab.eos
        assert int(ids.max(initial=0)) < len(tok)
    # every work's split follows the rule
    for w in manifest["works"]:
        if "split" in w:
            assert (w["split"] == "val") == is_validation(w["id"])


def test_build_is_cached_and_reproducible(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = built
    before = np.fromfile(out / "train.bin", dtype=np.uint16)
    cached = list((out / "cache" / "midi").glob("*.mid"))
    assert cached, "music21 conversions are cached"
    again = tmp_path / "again"
    build_dataset(
        again,
        sources=["airdsAirs", "bach"],
        limit_per_source=4,
        midi_dirs=[built[1]["midi_dir"]],
        workers=2,
        progress=False,
    )
    after = np.fromfile(again / "train.bin", dtype=np.uint16)
    assert np.array_equal(before, after)  # deterministic, also across worker counts


def test_load_split_without_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data build"):
        load_split(tmp_path, "train")
