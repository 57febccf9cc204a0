"""Which event loop the daemon runs on: uvloop when it is installed, asyncio's otherwise.

uvloop is an optional extra (``pip install 'qbo-daemon[uvloop]'``): its loop and
transports are written in Cython on libuv, which takes a share of the per-refresh
CPU that the daemon spends in aiohttp's and asyncio's Python code. The benchmark
measures the daemon on both (``python -m bench --loops asyncio uvloop``).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Literal

LoopName = Literal["auto", "asyncio", "uvloop"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: LoopName = "auto") -> tuple[str, LoopFactory | None]:
    """The loop's name and a factory for ``asyncio.Runner`` (``None``: asyncio's default).

    ``auto`` takes uvloop when it can be imported; ``uvloop`` insists on it.
    """
    if name == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if name == "uvloop":
            raise
        return "asyncio", None
    factory: LoopFactory = uvloop.new_event_loop
    return "uvloop", factory
