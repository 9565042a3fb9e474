"""Build the Max for Live device ``max_patches/divergent.amxd`` from its JSON source.

An unfrozen ``.amxd`` is the device's patcher JSON in a small binary container (see
``/work/shared/notes/patches.md``; Ableton's ``maxdevtools`` reads it the same way)::

    offset size field
    0      4    b"ampf"
    4      4    4                     (u32 little-endian: size of the next field)
    8      4    device type           b"mmmm" MIDI effect, b"aaaa" audio, b"iiii" instrument
    12     4    b"meta"
    16     4    4
    20     4    meta value            (0 or 1 seen in devices; readers ignore it)
    24     4    b"ptch"
    28     4    N                     byte length of what follows, final NUL included
    32     N    UTF-8 JSON {"patcher": {...}}, then b"\\n\\0"

The patcher must carry ``project.amxdtype``: the type tag read as a big-endian u32
(``mmmm`` = 1835887981); Max refuses a device without it.

The device is never edited here: its readable source is
``max_patches/src/divergent_device.maxpat`` (open it in Max, edit, save), and
``python -m divergent.export.amxd`` rebuilds the ``.amxd``; ``--check`` fails when the committed
file differs from a fresh build. The bytes depend only on the source's JSON content
(re-serialised in its own key order), so the build is reproducible.
"""

from __future__ import annotations

import argparse
import copy
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divergent.export.maxpat import MaxpatError, check_patch, patcher_of

__all__ = [
    "DEVICE_TYPES",
    "AmxdError",
    "AmxdHeader",
    "amxdtype",
    "build_amxd",
    "build_file",
    "main",
    "pack_amxd",
    "read_amxd",
    "unpack_amxd",
    "validate_amxd",
]

MAGIC = b"ampf"
DEVICE_TYPES = {b"mmmm": "MIDI effect", b"aaaa": "audio effect", b"iiii": "instrument"}
HEADER = struct.Struct("<4sI4s4sII4sI")  # ampf, 4, type, meta, 4, value, ptch, N
META_VALUE = 0
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = _REPO / "max_patches" / "src" / "divergent_device.maxpat"
DEFAULT_OUT = _REPO / "max_patches" / "divergent.amxd"


class AmxdError(ValueError):
    """A file that is not a readable unfrozen ``.amxd`` (magic, lengths or JSON wrong)."""


@dataclass(frozen=True)
class AmxdHeader:
    """The container fields of an ``.amxd``: device type tag, meta value, patch length."""

    device_type: bytes
    meta: int
    patch_length: int

    @property
    def kind(self) -> str:
        """The device kind in words ("MIDI effect", ...)."""
        return DEVICE_TYPES.get(self.device_type, f"unknown ({self.device_type!r})")


def amxdtype(device_type: bytes) -> int:
    """``project.amxdtype`` for a type tag: the 4 ASCII bytes as a big-endian u32."""
    if len(device_type) != 4:
        raise AmxdError(f"device type must be 4 bytes, got {device_type!r}")
    return int.from_bytes(device_type, "big")


def _serialise(doc: dict[str, Any]) -> bytes:
    # Key order as in the source (Max's own order), fixed indentation and no ASCII
    # escaping: the same JSON content always gives the same bytes.
    return json.dumps(doc, indent="\t", ensure_ascii=False).encode("utf-8")


def pack_amxd(json_bytes: bytes, device_type: bytes = b"mmmm", meta: int = META_VALUE) -> bytes:
    """Wrap patcher JSON bytes in the ``.amxd`` container (no checks on the JSON)."""
    if device_type not in DEVICE_TYPES:
        raise AmxdError(
            f"unknown device type {device_type!r}; expected one of {list(DEVICE_TYPES)}"
        )
    payload = json_bytes + b"\n\0"
    return HEADER.pack(MAGIC, 4, device_type, b"meta", 4, meta, b"ptch", len(payload)) + payload


def build_amxd(doc: dict[str, Any], device_type: bytes = b"mmmm") -> bytes:
    """The ``.amxd`` bytes for a patcher document ``{"patcher": {...}}``.

    Refuses a patch that :func:`~export.maxpat.check_patch` finds problems in, and one
    whose ``project.amxdtype`` names another device type. A missing ``project`` block or
    ``amxdtype`` is added (at the end of the patcher, so the source order is kept).
    """
    doc = copy.deepcopy(doc)  # the caller's document is left as it was
    try:
        patcher = patcher_of(doc)
    except MaxpatError as e:
        raise AmxdError(str(e)) from e
    problems = check_patch(patcher)
    if problems:
        raise AmxdError("the device patch has problems:\n  " + "\n  ".join(problems))
    want = amxdtype(device_type)
    project = patcher.setdefault("project", {})
    if not isinstance(project, dict):
        raise AmxdError("patcher.project is not an object")
    have = project.setdefault("amxdtype", want)
    if have != want:
        raise AmxdError(
            f"project.amxdtype is {have} but a {DEVICE_TYPES[device_type]} needs {want} "
            f"({device_type.decode()})"
        )
    return pack_amxd(_serialise(doc), device_type)


def build_file(source: Path = DEFAULT_SOURCE, device_type: bytes = b"mmmm") -> bytes:
    """The ``.amxd`` bytes for a ``.maxpat`` source file."""
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AmxdError(f"{source}: not valid JSON ({e})") from e
    return build_amxd(doc, device_type)


def unpack_amxd(data: bytes) -> tuple[AmxdHeader, dict[str, Any]]:
    """Split ``.amxd`` bytes into the header fields and the parsed patcher document.

    Raises :class:`AmxdError` naming what is wrong: a short file, a bad magic or chunk
    tag, a length that disagrees with the file, a frozen or encrypted device, a missing
    final NUL, or JSON that does not parse or holds no patcher.
    """
    if len(data) < HEADER.size:
        raise AmxdError(f"truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, type_size, device_type, meta_tag, meta_size, meta, ptch_tag, n = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise AmxdError(f"bad magic {magic!r}: not an .amxd (expected {MAGIC!r})")
    if type_size != 4:
        raise AmxdError(f"device type field is {type_size} bytes (expected 4)")
    if device_type not in DEVICE_TYPES:
        raise AmxdError(f"unknown device type {device_type!r}")
    if meta_tag != b"meta" or meta_size != 4:
        raise AmxdError(f"expected a 4-byte b'meta' chunk at offset 12, found {meta_tag!r}")
    if ptch_tag == b"ciph":
        raise AmxdError("the device is encrypted (ciph chunk): its patch cannot be read")
    if ptch_tag != b"ptch":
        raise AmxdError(f"expected b'ptch' at offset 24, found {ptch_tag!r}")
    body = data[HEADER.size :]
    if len(body) != n:
        raise AmxdError(
            f"ptch length says {n} bytes but {len(body)} follow "
            f"({'truncated' if len(body) < n else 'trailing bytes'})"
        )
    if body[:4] == b"mx@c":
        raise AmxdError("the device is frozen (mx@c): only unfrozen devices are read")
    if not body.endswith(b"\0"):
        raise AmxdError("the patch does not end with a NUL byte")
    try:
        doc = json.loads(body[:-1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AmxdError(f"the patch is not valid UTF-8 JSON: {e}") from e
    try:
        patcher_of(doc, "the patch")
    except MaxpatError as e:
        raise AmxdError(str(e)) from e
    return AmxdHeader(device_type, meta, n), doc


def read_amxd(path: str | Path) -> tuple[AmxdHeader, dict[str, Any]]:
    """Read an ``.amxd`` file: (header fields, patcher document). See :func:`unpack_amxd`."""
    p = Path(path)
    try:
        return unpack_amxd(p.read_bytes())
    except AmxdError as e:
        raise AmxdError(f"{p}: {e}") from e


def validate_amxd(path: str | Path) -> list[str]:
    """Problems in a device file: unreadable, type tag vs ``amxdtype``, patch problems."""
    try:
        header, doc = read_amxd(path)
    except AmxdError as e:
        return [str(e)]
    problems = []
    project = doc["patcher"].get("project")
    have = project.get("amxdtype") if isinstance(project, dict) else None
    if have != amxdtype(header.device_type):
        problems.append(
            f"project.amxdtype is {have!r} but the header says {header.device_type!r} "
            f"({amxdtype(header.device_type)})"
        )
    problems.extend(check_patch(doc["patcher"]))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m divergent.export.amxd [--check] [--source S] [--out O]``."""
    ap = argparse.ArgumentParser(
        prog="python -m divergent.export.amxd",
        description="Build the Max for Live device from its patcher JSON source.",
    )
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="device .maxpat source")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .amxd to write")
    ap.add_argument(
        "--check",
        action="store_true",
        help="write nothing; fail when --out differs from a fresh build or has problems",
    )
    args = ap.parse_args(argv)
    try:
        data = build_file(args.source)
    except (AmxdError, OSError) as e:
        print(f"amxd: {e}", file=sys.stderr)
        return 1
    if args.check:
        if not args.out.exists():
            print(
                f"amxd: {args.out} does not exist; run python -m divergent.export.amxd",
                file=sys.stderr,
            )
            return 1
        if args.out.read_bytes() != data:
            print(
                f"amxd: {args.out} is out of date with {args.source};"
                " run python -m divergent.export.amxd",
                file=sys.stderr,
            )
            return 1
        problems = validate_amxd(args.out)
        if problems:
            print("amxd: " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(data)} bytes)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    header, _ = unpack_amxd(data)
    print(f"wrote {args.out} ({len(data)} bytes, {header.kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
