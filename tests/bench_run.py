"""Running one of the bench's commands from the repository root, as the docs do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(
    module: str, *args: str, timeout: float = 120, returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the repository root; it must exit with
    ``returncode`` (its output is shown if not)."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == returncode, done.stdout + done.stderr
    return done
