"""CPU-bound work on a worker thread that leaves the event loop its turns.

A thread that never blocks keeps the GIL until the event loop has waited a
whole switch interval (5 ms) for it, and the loop asks for it back after each
of its socket calls: a 10,000-row import on worker threads starved a refresh
storm from 150 to 25 refreshes a second. Letting go every few rows hands it
over at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Items a worker thread handles between two hand-overs of the GIL: each costs a
# system call, against some tens of microseconds of work per row (at 20 the storm
# above still lost a third of its rate).
YIELD_EVERY = 5


def let_go(step: int, every: int = YIELD_EVERY) -> None:
    """Step ``step`` (from 1) of a loop: after each ``every`` steps, let go of the GIL."""
    if step % every == 0:
        time.sleep(0)  # releases the GIL: a thread waiting for it takes it now


def yielding(items: Iterable[T], every: int = YIELD_EVERY) -> Iterator[T]:
    """``items``, letting go of the GIL after each ``every`` of them (on a worker thread)."""
    for step, item in enumerate(items, 1):
        let_go(step, every)
        yield item
