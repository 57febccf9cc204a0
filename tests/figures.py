"""Figures in docs/, written by the test that measured them, after its assertions.

A figure sits in a document between ``<!-- figure:NAME -->`` and
``<!-- /figure:NAME -->``. ``QBO_WRITE_FIGURES=1 pytest ...`` rewrites it
there; any other run only prints it, so running the tests leaves the
documents alone and a figure is never typed by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RELIABILITY = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def record_figure(name: str, text: str, *, document: Path = RELIABILITY) -> None:
    """Print ``text``; with ``QBO_WRITE_FIGURES=1`` also put it in ``document`` as ``name``."""
    print(f"\n[figure {name}]\n{text}")
    if os.environ.get("QBO_WRITE_FIGURES") != "1":
        return
    content = document.read_text(encoding="utf-8")
    pattern = re.compile(
        rf"(<!-- figure:{re.escape(name)} -->\n).*?(<!-- /figure:{re.escape(name)} -->)", re.S
    )
    updated, found = pattern.subn(
        lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content
    )
    assert found == 1, f"{document.name} has no figure block {name!r}"
    document.write_text(updated, encoding="utf-8")
