"""Figures a test measured, written into the docs by that test after its assertions.

A document holds each figure between ``<!-- figure: NAME -->`` and
``<!-- /figure: NAME -->``; :func:`write_figure` replaces what is between them.
Only what the test has just asserted goes in, so the docs never carry a number
typed by hand; a test whose figures do not change leaves the file untouched.
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def write_figure(document: str, name: str, text: str) -> None:
    path = DOCS / document
    content = path.read_text(encoding="utf-8")
    start, end = f"<!-- figure: {name} -->\n", f"<!-- /figure: {name} -->"
    begin = content.index(start) + len(start)
    stop = content.index(end, begin)
    updated = content[:begin] + text.rstrip("\n") + "\n" + content[stop:]
    if updated != content:
        path.write_text(updated, encoding="utf-8")
