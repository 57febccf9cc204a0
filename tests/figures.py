"""Figures in docs/, written by the test that measured them, after its assertions.

A figure sits in a document between two markers::

    <!-- figure: NAME -->
    ...replaced by the test's own text...
    <!-- /figure: NAME -->

``QBO_WRITE_FIGURES=1 pytest ...`` rewrites it there; any other run only
prints it, so running the tests leaves the documents alone, and the number a
reader sees is one a passing run asserted, never one typed by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
RELIABILITY = DOCS / "reliability.md"


def write_figure(name: str, text: str, doc: Path = RELIABILITY) -> None:
    """Print ``text``; with ``QBO_WRITE_FIGURES=1`` also put it in ``doc`` as figure ``name``."""
    print(f"\n[figure {name}]\n{text}")
    if os.environ.get("QBO_WRITE_FIGURES") != "1":
        return
    content = doc.read_text(encoding="utf-8")
    pattern = re.compile(
        rf"(<!-- figure: {re.escape(name)} -->\n).*?(<!-- /figure: {re.escape(name)} -->)",
        re.DOTALL,
    )
    updated, found = pattern.subn(
        lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content
    )
    assert found == 1, f"{doc.name} has no figure block {name!r}"
    if updated != content:
        doc.write_text(updated, encoding="utf-8")
