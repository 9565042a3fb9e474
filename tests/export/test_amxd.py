"""The Max for Live device: container layout, reproducible build, clear errors."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from divergent.export.amxd import (
    AmxdError,
    amxdtype,
    build_amxd,
    build_file,
    main,
    pack_amxd,
    read_amxd,
    unpack_amxd,
    validate_amxd,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "max_patches" / "src" / "divergent_device.maxpat"
DEVICE = REPO / "max_patches" / "divergent.amxd"
MMMM = 1835887981  # b"mmmm" read as a big-endian u32 (patches.md)


@pytest.fixture(scope="module")
def source_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SOURCE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def built(source_doc: dict[str, Any]) -> bytes:
    return build_amxd(source_doc)


def _independent_read(data: bytes) -> dict[str, Any]:
    """A minimal .amxd reader with struct alone, sharing nothing with export.amxd."""
    assert data[0:4] == b"ampf"
    (size,) = struct.unpack("<I", data[4:8])
    assert size == 4
    kind = data[8:12]
    assert data[12:16] == b"meta"
    (meta_size,) = struct.unpack("<I", data[16:20])
    assert meta_size == 4
    (meta_value,) = struct.unpack("<I", data[20:24])
    assert data[24:28] == b"ptch"
    (n,) = struct.unpack("<I", data[28:32])
    body = data[32:]
    assert len(body) == n, "the ptch length must cover exactly the rest of the file"
    assert body.endswith(b"\n\x00")
    doc = json.loads(body[:-1].decode("utf-8"))
    return {"kind": kind, "meta": meta_value, "n": n, "doc": doc}


# ----------------------------------------------------------------- layout


def test_committed_device_header_read_independently() -> None:
    r = _independent_read(DEVICE.read_bytes())
    assert r["kind"] == b"mmmm"  # MIDI effect
    assert r["meta"] in (0, 1)
    assert r["doc"]["patcher"]["project"]["amxdtype"] == MMMM
    assert int.from_bytes(b"mmmm", "big") == MMMM
    assert r["n"] == DEVICE.stat().st_size - 32


def test_committed_device_read_with_the_module() -> None:
    header, doc = read_amxd(DEVICE)
    assert header.device_type == b"mmmm" and header.kind == "MIDI effect"
    assert header.patch_length == DEVICE.stat().st_size - 32
    assert doc["patcher"]["project"]["amxdtype"] == amxdtype(b"mmmm") == MMMM
    assert validate_amxd(DEVICE) == []


def test_committed_device_is_a_fresh_build() -> None:
    assert DEVICE.read_bytes() == build_file(SOURCE), "run: python -m divergent.export.amxd"


def test_round_trip(built: bytes, source_doc: dict[str, Any]) -> None:
    header, doc = unpack_amxd(built)
    assert doc == source_doc
    assert header.patch_length == len(built) - 32
    assert _independent_read(built)["doc"] == source_doc


def test_build_is_deterministic_and_leaves_its_input(source_doc: dict[str, Any]) -> None:
    before = json.dumps(source_doc)
    assert build_amxd(source_doc) == build_amxd(json.loads(before))
    assert json.dumps(source_doc) == before


def test_pack_layout_for_other_types() -> None:
    data = pack_amxd(b'{"patcher": {"boxes": [], "lines": []}}', b"aaaa")
    r = _independent_read(data)
    assert r["kind"] == b"aaaa"
    assert amxdtype(b"aaaa") == int.from_bytes(b"aaaa", "big")
    with pytest.raises(AmxdError, match="unknown device type"):
        pack_amxd(b"{}", b"zzzz")


# ----------------------------------------------------------------- building refuses


def test_build_adds_a_missing_amxdtype(source_doc: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(source_doc))
    del doc["patcher"]["project"]
    _, out = unpack_amxd(build_amxd(doc))
    assert out["patcher"]["project"]["amxdtype"] == MMMM


def test_build_refuses_another_device_type(source_doc: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(source_doc))
    doc["patcher"]["project"]["amxdtype"] = amxdtype(b"aaaa")
    with pytest.raises(AmxdError, match=r"amxdtype .* needs 1835887981"):
        build_amxd(doc)


def test_build_refuses_a_broken_patch(source_doc: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(source_doc))
    doc["patcher"]["lines"].append(
        {"patchline": {"source": ["obj-1", 0], "destination": ["obj-nowhere", 0]}}
    )
    with pytest.raises(AmxdError, match="obj-nowhere does not exist"):
        build_amxd(doc)
    with pytest.raises(AmxdError, match="patcher"):
        build_amxd({"boxes": []})


# ----------------------------------------------------------------- corrupted files


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:20], "truncated: 20 bytes"),
        (lambda d: d[:-7], "truncated"),
        (lambda d: d + b"junk", "trailing bytes"),
        (lambda d: b"AMPF" + d[4:], "bad magic"),
        (lambda d: d[:8] + b"xxxx" + d[12:], "unknown device type"),
        (lambda d: d[:12] + b"meta" + struct.pack("<I", 8) + d[20:], "4-byte b'meta'"),
        (lambda d: d[:24] + b"ciph" + d[28:], "encrypted"),
        (lambda d: d[:24] + b"PTCH" + d[28:], "expected b'ptch'"),
        (lambda d: d[:32] + b"mx@c" + d[36:], "frozen"),
        (lambda d: d[:-1] + b"x", "NUL"),
        (lambda d: d[:32] + b"{{" + d[34:], "not valid UTF-8 JSON"),
        (lambda d: d[:32] + b"\xff" + d[33:], "not valid UTF-8 JSON"),
    ],
    ids=[
        "short-header",
        "short-body",
        "trailing",
        "magic",
        "type",
        "meta",
        "ciph",
        "ptch",
        "frozen",
        "no-nul",
        "bad-json",
        "bad-utf8",
    ],
)
def test_corrupted_files_give_clear_errors(built: bytes, mangle: Any, message: str) -> None:
    with pytest.raises(AmxdError, match=message):
        unpack_amxd(mangle(built))


def test_json_without_a_patcher_is_refused() -> None:
    with pytest.raises(AmxdError, match="patcher"):
        unpack_amxd(pack_amxd(b'{"boxes": []}'))


def test_read_amxd_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.amxd"
    bad.write_bytes(b"nope")
    with pytest.raises(AmxdError, match=r"bad\.amxd: truncated"):
        read_amxd(bad)
    assert validate_amxd(bad) and "truncated" in validate_amxd(bad)[0]


def test_validate_reports_a_type_mismatch(tmp_path: Path, built: bytes) -> None:
    wrong = tmp_path / "wrong.amxd"
    wrong.write_bytes(built[:8] + b"aaaa" + built[12:])
    assert any("amxdtype" in p for p in validate_amxd(wrong))


# ----------------------------------------------------------------- the command


def test_cli_build_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "device.amxd"
    assert main(["--out", str(out)]) == 0
    assert out.read_bytes() == DEVICE.read_bytes()
    assert main(["--check", "--out", str(out)]) == 0
    out.write_bytes(out.read_bytes()[:-1] + b" ")
    assert main(["--check", "--out", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--check", "--out", str(tmp_path / "missing.amxd")]) == 1


def test_cli_reports_a_broken_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src.maxpat"
    shutil.copy(SOURCE, src)
    src.write_text(src.read_text().replace('"numoutlets": 8', '"numoutlets": 7', 1))
    assert main(["--source", str(src), "--out", str(tmp_path / "x.amxd")]) == 1
    assert "numoutlets 7 but Max gives 8" in capsys.readouterr().err
    src.write_text("{")
    assert main(["--source", str(src), "--out", str(tmp_path / "x.amxd")]) == 1


def test_module_entry_point_checks_the_committed_device() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "divergent.export.amxd", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
