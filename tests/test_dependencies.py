"""Dependency floors and caps: past aiohttp's request-smuggling fixes; aiosqlite capped.

The token API and the callback are aiohttp servers, so every release that fixed
a request-smuggling flaw in aiohttp's parsers must be excluded by our floor.
``store/sqlite.py`` calls two private members of aiosqlite (``_execute`` and
``_conn``: no public call runs a function on its thread), so aiosqlite is capped
below its next minor release, and this test fails loudly if they disappear.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiosqlite
from packaging.requirements import Requirement
from packaging.version import Version

from tests.figures import write_figures

ROOT = Path(__file__).resolve().parents[1]
# aiohttp request-smuggling advisories and the release that fixed each.
SMUGGLING_FIXES = {
    "CVE-2023-47641 (GHSA-xx9p-xxvh-7g8j)": "3.8.0",
    "CVE-2023-37276 (GHSA-45c4-8wx5-qw6w)": "3.8.5",
    "CVE-2023-47627 (GHSA-gfw2-4jvh-wgfg)": "3.8.6",
    "CVE-2024-23829 (GHSA-8qpw-xqxj-h4r2)": "3.9.2",
    "GHSA-8495-4g3g-x7pr": "3.10.11",
    "CVE-2025-53643 (GHSA-9548-qrrj-x5pj)": "3.12.14",
    "CVE-2025-69224": "3.13.3",
    "PYSEC-2026-4371 (ambiguous request framing)": "3.14.4",
}
PRIVATE_AIOSQLITE = ("_execute", "_conn")


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found = (Requirement(text) for text in project["project"]["dependencies"])
    return {r.name: r for r in found}


def floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert floors, f"{requirement} has no floor"
    return max(floors)


def test_dependency_floors_and_caps() -> None:
    required = requirements()
    aiohttp, aiosqlite_req = required["aiohttp"], required["aiosqlite"]

    latest_fix = max(SMUGGLING_FIXES.items(), key=lambda item: Version(item[1]))
    for advisory, fixed in SMUGGLING_FIXES.items():
        assert floor(aiohttp) >= Version(fixed), f"aiohttp {aiohttp.specifier} admits {advisory}"

    uses = re.findall(r"\bconn\.(_\w+)", (ROOT / "qbo_daemon/store/sqlite.py").read_text())
    assert set(uses) == set(PRIVATE_AIOSQLITE), "the private aiosqlite members used changed"
    for member in PRIVATE_AIOSQLITE:
        assert hasattr(aiosqlite.Connection, member), f"aiosqlite has no {member} any more"
    caps = [Version(s.version) for s in aiosqlite_req.specifier if s.operator == "<"]
    installed = Version(version("aiosqlite"))
    assert caps, "aiosqlite's private API is used: cap its version"
    assert min(caps) <= Version(f"{installed.major}.{installed.minor + 1}"), caps

    for name, requirement in required.items():
        assert requirement.specifier.contains(version(name), prereleases=True), (
            f"installed {name} {version(name)} is outside {requirement.specifier}"
        )
    write_figures(
        {
            "deps-aiohttp": f"aiohttp {aiohttp.specifier} (installed {version('aiohttp')}): "
            f"past all {len(SMUGGLING_FIXES)} request-smuggling fixes listed in "
            f"`tests/test_dependencies.py`, the latest {latest_fix[0]} in {latest_fix[1]}",
            "deps-aiosqlite": f"aiosqlite {aiosqlite_req.specifier} (installed {installed}): "
            f"capped, as `store/sqlite.py` uses its private "
            f"{' and '.join(f'`{m}`' for m in PRIVATE_AIOSQLITE)}",
        }
    )
