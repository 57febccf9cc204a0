"""Slows down guessing API keys at the sign-in form.

Each failed sign-in waits a moment before it is answered, and a client address
with too many failures in the last minute is refused for a while, even with the
right key. Kept in memory per daemon: losing it on a restart costs nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

FAILURE_DELAY = 0.5  # seconds a failed sign-in waits before it is answered
WINDOW = 60.0
MAX_FAILURES = 10  # per address and WINDOW
_MAX_ADDRESSES = 10_000


class SignInThrottle:
    def __init__(
        self,
        *,
        window: float = WINDOW,
        max_failures: int = MAX_FAILURES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_failures = max_failures
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        failures = self._recent(address)
        if len(failures) < self.max_failures:
            return None
        return max(failures[0] + self.window - self._clock(), 0.0) or None

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        failures.append(self._clock())
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > _MAX_ADDRESSES:
            self._failures.popitem(last=False)

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.get(address, deque())
        horizon = self._clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            self._failures.pop(address, None)
        return failures
