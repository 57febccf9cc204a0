"""docs/operations.md lists every event the code writes, at the level it writes it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from qbo_daemon.runtime.webhooks import _ERROR_EVENTS, _WARNING_EVENTS, EVENTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qbo_daemon"
DOC = ROOT / "docs" / "operations.md"
EVENT = re.compile(r"[a-z][a-z_]*\.[a-z][a-z_]*")
LEVELS = {"debug", "info", "warning", "error", "critical", "exception"}


def emitted() -> dict[str, set[str]]:
    """Every event name a log call or an account event in the package writes, with levels.

    A level is the method's name (``exception`` is ``error``); an account event's
    comes from the webhook notifier's tables; ``""`` where the call decides at run time.
    """
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in LEVELS | {"log", "emit", "log_method"}:
                continue
            for arg in node.args[:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if EVENT.fullmatch(arg.value):
                        level = {"exception": "error"}.get(name, name)
                        if name == "emit":
                            level = _account_event_level(arg.value)
                        elif name not in LEVELS:
                            level = ""
                        found.setdefault(arg.value, set()).add(level)
                    break
    return found


def _account_event_level(event: str) -> str:
    if event in _ERROR_EVENTS:
        return "error"
    return "warning" if event in _WARNING_EVENTS else "info"


def documented() -> dict[str, str]:
    """The Events table: event name -> its level cell."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Events", 1)[1]
    rows = re.findall(r"^\| `([a-z_.]+)` \| ([^|]*) \|", section, re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "an event is listed twice"
    return dict(rows)


def test_every_event_is_documented_and_no_other() -> None:
    code, doc = emitted(), documented()
    assert set(code) >= EVENTS
    assert sorted(set(code) - set(doc)) == [], "events missing from docs/operations.md"
    assert sorted(set(doc) - set(code)) == [], "docs/operations.md lists events nobody writes"


def test_each_event_is_documented_at_its_level() -> None:
    doc = documented()
    for event, levels in emitted().items():
        for level in levels - {""}:
            assert level in doc[event], (event, level, doc[event])


# Past participles that do not end in -ed.
_IRREGULAR = frozenset({"lost"})


def test_event_names_are_singular_nouns_and_past_verbs() -> None:
    """``noun.verb_past``: ``refresh.succeeded``, ``connect.state_forged``."""
    for event in emitted():
        noun, _, what = event.partition(".")
        last = what.rsplit("_", 1)[-1]
        assert not noun.endswith("s"), f"{event}: the noun is plural"
        assert last.endswith("ed") or last in _IRREGULAR, f"{event}: not a past participle"
