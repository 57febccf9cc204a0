"""Figures in docs/ written by the test that measured them, after its assertions.

A figure lives between two markers in a Markdown file::

    <!-- figure: NAME -->
    ...replaced on every passing run...
    <!-- /figure: NAME -->

so the number a reader sees is the one the last passing run asserted, never
one typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def write_figure(name: str, text: str, doc: Path = DOCS / "reliability.md") -> None:
    """Replace figure ``name`` in ``doc`` with ``text``; the markers must be there."""
    content = doc.read_text(encoding="utf-8")
    pattern = re.compile(
        rf"(<!-- figure: {re.escape(name)} -->\n).*?(<!-- /figure: {re.escape(name)} -->)",
        re.DOTALL,
    )
    if not pattern.search(content):
        raise AssertionError(f"{doc} has no markers for figure {name!r}")
    updated = pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content)
    if updated != content:
        doc.write_text(updated, encoding="utf-8")
