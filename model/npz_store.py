"""The on-disk form of the readout's banks: one compressed ``.npz`` per bank, with a
format name and a version inside, written atomically and read back with every array
checked (numpy only)."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["load_npz", "save_npz", "scalar_int"]


def save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz at exactly ``path`` (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_npz(
    path: str | os.PathLike[str], fmt: str, version: int, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Read every array of an .npz written by :func:`save_npz`; ValueError when bad.

    A missing file raises ``FileNotFoundError``; anything unreadable, foreign or of
    another version raises ``ValueError``.
    """
    where = os.fspath(path)
    # Our own handle: np.load leaks the file it opened when the zip directory is bad.
    with open(path, "rb") as fh:
        try:
            with np.load(fh, allow_pickle=False) as z:
                files = getattr(z, "files", None)
                if files is None:
                    raise ValueError("not an .npz archive")
                out = {name: np.asarray(z[name]) for name in names if name in files}
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            AttributeError,
            TypeError,
            zipfile.BadZipFile,
            zlib.error,
        ) as e:
            raise ValueError(f"{where}: not a readable {fmt} file ({e})") from e
    f = out.get("format")
    got_fmt = str(f) if f is not None and f.shape == () else None
    if got_fmt != fmt:
        raise ValueError(f"{where}: format {got_fmt!r}, expected {fmt!r}")
    got_version = scalar_int(out.get("version", np.array("?")), "version", path)
    if got_version != version:
        raise ValueError(f"{where}: {fmt} version {got_version}, this code reads {version}")
    missing = sorted(set(names) - set(out))
    if missing:
        raise ValueError(f"{where}: missing arrays {missing}")
    return out


def scalar_int(a: np.ndarray, what: str, path: str | os.PathLike[str]) -> int:
    if a.shape != () or a.dtype.kind not in "iu":
        raise ValueError(f"{os.fspath(path)}: {what} is not an integer scalar")
    return int(a)
