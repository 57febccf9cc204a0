from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Report = Callable[[str, dict[str, Any]], None]


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    value = int(request.config.getoption("--rounds"))
    assert value >= 1, "--rounds must be at least 1"
    return value


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[Report]:
    """Record a test's figures: printed (``-s``) and, with QBO_FAULT_REPORT=path, appended
    as JSON lines (the numbers in docs/reliability.md come from there)."""
    figures: list[tuple[str, dict[str, Any]]] = []

    def add(name: str, data: dict[str, Any]) -> None:
        figures.append((name, data))
        print(f"\n[{request.node.name}] {name}: {json.dumps(data, sort_keys=True)}")

    yield add
    target = os.environ.get("QBO_FAULT_REPORT")
    if target and figures:
        with Path(target).open("a", encoding="utf-8") as out:
            for name, data in figures:
                out.write(json.dumps({"test": request.node.name, "name": name, **data}) + "\n")
