"""File names have one owner, ``model/files.py``: the model, run and dataset folders'
names are spelled there and nowhere else in ``model/`` and ``export/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from divergent.model import files
from divergent.model.runtime import ModelError, ModelFiles

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model" / "bundled"
#: the rooms whose code must take file names from model/files.py
ROOMS = ("model", "export")


def _declared() -> set[str]:
    """Every name model/files.py declares (the decoder's per precision)."""
    names = {v for k, v in vars(files).items() if k.endswith("_FILE") and isinstance(v, str)}
    names |= {files.decoder_file(p) for p in (*files.PRECISIONS, *files.PREFILL_PRECISIONS)}
    return names | {files.diverged_file(p) for p in files.PREFILL_PRECISIONS}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string in code, docstrings left out (they may name files);
    an f-string's placeholders become ``{}``."""
    docs: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docs.add(id(body[0].value))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in docs:
            continue
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            out.append((node.lineno, "".join(str(p) for p in parts)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def test_file_names_are_spelled_only_in_model_files() -> None:
    names = _declared()
    # decoder.{precision}.onnx spelled as an f-string anywhere else counts too
    patterns = [re.compile(rf"(?<![\w.]){re.escape(n)}(?![\w])") for n in names]
    patterns.append(re.compile(r"(?<![\w.])decoder\.\{\}\.onnx"))
    owner = ROOT / "model" / "files.py"
    found = []
    for room in ROOMS:
        for path in sorted((ROOT / room).glob("*.py")):
            if path == owner:
                continue
            for line, text in _strings(ast.parse(path.read_text())):
                if any(p.search(text) for p in patterns):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert found == [], "file names spelled outside model/files.py:\n" + "\n".join(found)


def test_the_bundled_folder_holds_exactly_the_declared_model_files() -> None:
    present = {p.name for p in BUNDLED.iterdir() if p.is_file()}
    assert present == set(files.MODEL_FOLDER_FILES)
    assert set(files.MODEL_FOLDER_FILES) <= _declared()


def test_model_files_paths_and_precisions() -> None:
    f = ModelFiles(BUNDLED)
    assert f.decoder("int8") == BUNDLED / files.decoder_file("int8")
    assert f.config.name == files.CONFIG_FILE and f.diverged.name == files.DIVERGED_DECODER_FILE
    with pytest.raises(ModelError, match="precision"):
        f.decoder("int4")
    with pytest.raises(ValueError, match="precision"):
        files.decoder_file("fp16")
