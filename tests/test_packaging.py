"""Packaging: the wheel builds without a deprecation warning and declares its licence."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    # -v shows the build backend's own output, where setuptools prints its warnings.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path), "-v"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "deprecat" not in output.lower(), [
        line for line in output.splitlines() if "deprecat" in line.lower()
    ]
    [wheel] = tmp_path.glob("qbo_daemon-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert not [line for line in headers if line.startswith("License:")]
