"""Figures in docs/reliability.md, written by the tests that measured them.

A figure sits between two markers, ``<!-- figure:NAME -->`` and
``<!-- /figure:NAME -->`` (inline in a sentence or a table cell, or around a
block). A test calls :func:`write_figures` after its assertions, so a figure
in the document is always one that a passing run produced; rewriting the
same region keeps reruns idempotent. Under CI the tests run in a throw-away
clone, so the write is harmless there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

RELIABILITY = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def write_figures(figures: Mapping[str, str], doc: Path = RELIABILITY) -> None:
    """Replace the text of each named region of ``doc``; every name must be marked there."""
    text = doc.read_text(encoding="utf-8")
    for name, value in figures.items():
        pattern = re.compile(
            rf"(<!-- figure:{re.escape(name)} -->)(.*?)(<!-- /figure:{re.escape(name)} -->)",
            re.DOTALL,
        )
        # A function, not a template: the value may hold backslashes.
        text, found = pattern.subn(partial(_fill, value), text)
        assert found, f"{doc} has no region <!-- figure:{name} -->"
    scratch = doc.with_name(f".{doc.name}.{os.getpid()}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, doc)


def _fill(value: str, match: re.Match[str]) -> str:
    return match[1] + value + match[3]


def thousands(value: float) -> str:
    """``12,345``: how the document writes counts."""
    return f"{round(value):,}"
