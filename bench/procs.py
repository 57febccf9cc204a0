"""Child processes and what the kernel says about them: CPU seconds and memory from /proc.

Every measured party (simulator, daemon, bare client, cron batch) runs in a
process of its own, so its CPU time and resident memory are its own. Nothing
here needs psutil: ``/proc/<pid>/stat`` gives user and system time in clock
ticks, ``/proc/<pid>/status`` gives ``VmRSS`` and the peak ``VmHWM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: the fields start after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (peak) of ``pid`` in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine (all cores) since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(v) for v in first[1:9]]  # user … steal; guest time is inside user already
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / _TICKS, sum(ticks) / _TICKS


def named_cpu(name: str) -> float:
    """CPU seconds of every process alive now whose command name is ``name``.

    For a server that forks a process per connection (PostgreSQL's backends):
    read before and after a run that keeps its connections open, the
    difference is the server's CPU over the run.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        if text[text.index("(") + 1 : text.rindex(")")] != name:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass
class CpuMark:
    """A wall-clock instant and a process's CPU seconds at it."""

    wall: float
    cpu: float


class Child:
    """A Python child process (``python -m module args``), stopped by SIGTERM then SIGKILL."""

    def __init__(self, module: str, args: Sequence[str], *, log: Path) -> None:
        self.module = module
        self.args = list(args)
        self.log_path = log
        self.started_wall = 0.0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.started_wall = time.time()
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    def mark(self) -> CpuMark:
        return CpuMark(time.time(), cpu_seconds(self.pid))

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.module} exited early; see {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode

    async def wait(self, timeout: float) -> int:
        """Wait for the child to exit by itself (bounded); kill it when it does not."""
        proc = self._proc
        assert proc is not None
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            await self.stop(timeout=1.0)
            raise TimeoutError(f"{self.module} did not finish within {timeout:g}s") from None


async def wait_for_port(port: int, child: Child, timeout: float = 20.0) -> None:
    """Until something accepts connections on loopback ``port`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")
