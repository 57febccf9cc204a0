"""Figures in docs/, written by the test that measured them, after its assertions.

A figure sits in a document between two markers, ``<!-- figure: NAME -->`` and
``<!-- /figure: NAME -->`` (the space after the colon is optional): around a
block (:func:`write_figure`) or inline in a sentence or a table cell
(:func:`write_figures`). ``QBO_WRITE_FIGURES=1 pytest ...`` rewrites them
there; any other run only prints them, so running the tests leaves the
documents alone, and the number a reader sees is one a passing run asserted,
never one typed by hand.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
RELIABILITY = DOCS / "reliability.md"


def write_figure(name: str, text: str, doc: Path = RELIABILITY) -> None:
    """Figure ``name`` as a block of lines: ``text`` between the markers, each on its own line."""
    write_figures({name: "\n" + text.rstrip("\n") + "\n"}, doc)


def write_figures(figures: Mapping[str, str], doc: Path = RELIABILITY) -> None:
    """Print each figure; with ``QBO_WRITE_FIGURES=1`` also put each in ``doc`` as is."""
    for name, value in figures.items():
        print(f"\n[figure {name}] {value.strip()}")
    if os.environ.get("QBO_WRITE_FIGURES") != "1":
        return
    text = doc.read_text(encoding="utf-8")
    for name, value in figures.items():
        pattern = re.compile(
            rf"(<!-- figure: ?{re.escape(name)} -->)(.*?)(<!-- /figure: ?{re.escape(name)} -->)",
            re.DOTALL,
        )
        # A function, not a template: the value may hold backslashes.
        text, found = pattern.subn(lambda m, v=value: m[1] + v + m[3], text)  # type: ignore[misc]
        assert found == 1, f"{doc.name} has no figure block {name!r}"
    scratch = doc.with_name(f".{doc.name}.{os.getpid()}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, doc)


def thousands(value: float) -> str:
    """``12,345``: how the documents write counts."""
    return f"{round(value):,}"
