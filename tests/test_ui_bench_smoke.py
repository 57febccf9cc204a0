"""The status page's benchmark (``python -m bench.ui_pages``) at a few hundred accounts.

The figures in docs/performance.md come from the full run at 100,000 accounts;
this keeps the script working and checks what holds at any size.
"""

from __future__ import annotations

from pathlib import Path

from bench.ui_pages import BEGIN, END, docs_section, write_docs
from tests.bench_run import run_bench


def test_ui_bench_smoke(tmp_path: Path) -> None:
    done = run_bench("bench.ui_pages", "--accounts=400", "--runs=1")
    assert "400 accounts" in done.stdout
    assert "accounts, first page, by next refresh" in done.stdout
    assert "accounts, next page, 7 pages in a row" in done.stdout  # 400 rows, 50 a page


def test_the_docs_section_is_replaced_not_appended(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nbefore\n", encoding="utf-8")
    results = {
        "accounts": 10,
        "runs": 1,
        "when": "2026-01-01 00:00 UTC",
        "machine": {"cores": 2, "cpu": "", "python": "3.11", "sqlite": "3.40"},
        "pages": [{"page": "overview", "ms": [1.0]}],
    }
    write_docs(results, doc)
    write_docs({**results, "accounts": 20}, doc)
    text = doc.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1
    assert text.count(END) == 1
    assert "20 accounts" in text
    assert text.startswith("# Performance\n\nbefore\n")
    assert docs_section(results).startswith(BEGIN)
