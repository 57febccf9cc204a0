"""Large JSON bodies in and out, in small steps, so the event loop keeps its turns.

``json.loads`` of a 30 MB import body, or ``json.dumps`` of its 10 MB answer, is
one C call that holds the GIL from start to end: even on a worker thread it
stops the event loop (which needs the GIL to run at all) for most of a second,
and with it every refresh's commit, the callback and the watchdog. Here the
top-level object is read key by key and a top-level array element by element
(``JSONDecoder.raw_decode``), and an answer is written entry by entry, letting
go of the GIL every few entries (:mod:`qbo_daemon.core.threads`) so the event
loop takes its turns between the many short calls.

:func:`loads_object` accepts what ``json.loads`` accepts for an object (the
last of repeated keys wins) and raises ``ValueError`` where it would.

The other long hold is the cyclic garbage collector: the hundreds of thousands
of objects a 100,000-row import makes trigger full collections that each walk
the whole heap with the GIL held (0.1-0.6 s apiece, measured). :class:`CollectorPause`
switches it off while such work runs; reference counting still frees nearly
everything, and the collector resumes when the last bulk request ends.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from qbo_daemon.core.threads import let_go, yielding

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def loads_object(raw: bytes) -> Any:
    """``json.loads(raw)``, read in short steps when ``raw`` holds an object."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    start = _skip(text, 0)
    if not text.startswith("{", start):
        return json.loads(text)  # not an object: the caller refuses it whatever it is
    result: dict[str, Any] = {}
    at = _skip(text, start + 1)
    if text.startswith("}", at):
        return _end(text, at + 1, result)
    while True:
        if not text.startswith('"', at):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, at
            )
        key, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        at = _skip(text, at + 1)
        if text.startswith("[", at):
            result[key], at = _array(text, at)
        else:
            result[key], at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if text.startswith(",", at):
            at = _skip(text, at + 1)
        elif text.startswith("}", at):
            return _end(text, at + 1, result)
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)


def dumps_object(fields: Mapping[str, Any]) -> str:
    """``json.dumps(fields)``, with each list value written one element at a time."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, list):
            parts.append(f"{json.dumps(key)}: [{_elements(value)}]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{" + ", ".join(parts) + "}"


def _elements(values: Iterable[Any]) -> str:
    return ", ".join(json.dumps(value) for value in yielding(values))


def _array(text: str, at: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    at = _skip(text, at + 1)
    if text.startswith("]", at):
        return items, at + 1
    step = 0
    while True:
        step += 1
        let_go(step)
        item, at = _DECODER.raw_decode(text, at)
        items.append(item)
        at = _skip(text, at)
        if text.startswith(",", at):
            at = _skip(text, at + 1)
        elif text.startswith("]", at):
            return items, at + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _end(text: str, at: int, result: dict[str, Any]) -> dict[str, Any]:
    if _skip(text, at) != len(text):
        raise json.JSONDecodeError("Extra data", text, at)
    return result


class CollectorPause:
    """Pauses the cyclic garbage collector while bulk requests run (nested use counted).

    Entered and left on the event loop's thread only; one per application.
    """

    def __init__(self) -> None:
        self._users = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._users == 0:
            self._resume = gc.isenabled()
            gc.disable()
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0 and self._resume:
                gc.enable()
