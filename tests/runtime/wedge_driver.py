"""``python -m tests.runtime.wedge_driver run --config FILE``: the daemon, wedgeable.

The real :class:`Daemon` on a real configuration, as ``qbo-daemon run`` starts
it, with one difference: its clock's sleeps never end once a file named
``wedge`` exists beside the configuration file. The dispatcher waits on that
clock, so creating the file wedges it while the event loop, the listeners
and everything else run on: the one failure the watchdog's heartbeat exists
to catch. (Time is the daemon's injected dependency, the seam tests use.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from qbo_daemon.config.load import load_config
from qbo_daemon.core.clock import SystemClock
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.runtime.logs import configure_logging


class WedgingClock(SystemClock):
    def __init__(self, trigger: Path) -> None:
        self._trigger = trigger

    async def sleep(self, seconds: float) -> None:
        if self._trigger.exists():
            await asyncio.Event().wait()  # wedged: this sleep never ends
        await super().sleep(seconds)


async def run(config_path: Path) -> None:
    config = load_config(config_path, os.environ)
    configure_logging(config.log.format, config.log.level)
    daemon = Daemon(config, clock=WedgingClock(config_path.parent / "wedge"), environ=os.environ)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await daemon.run(stop)


if __name__ == "__main__":
    command, flag, path = sys.argv[1:]
    assert (command, flag) == ("run", "--config"), sys.argv
    asyncio.run(run(Path(path)))
