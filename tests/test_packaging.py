"""What ``pip install`` puts into site-packages: one import name, ``divergent``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from divergent.model.files import MODEL_FOLDER_FILES

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_one_import_name_with_the_bundled_model(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("divergent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"divergent"}, top
    for package in ("server", "model", "bridges", "export"):
        assert f"divergent/{package}/__init__.py" in names
    assert "divergent/__main__.py" in names and "divergent/cli.py" in names
    bundled = {n.rsplit("/", 1)[1] for n in names if n.startswith("divergent/model/bundled/")}
    assert set(MODEL_FOLDER_FILES) <= bundled, set(MODEL_FOLDER_FILES) - bundled
