"""The event loop `qbo-daemon run` picks: uvloop when installed (the test extra has it)."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from qbo_daemon.runtime.loop import loop_factory
from tests.conftest import StartDaemon
from tests.runtime.test_daemon_start import _run_briefly


def test_asyncio_is_asked_for_by_name() -> None:
    assert loop_factory("asyncio") == ("asyncio", None)


def test_auto_takes_uvloop_when_it_is_installed() -> None:
    name, factory = loop_factory()
    assert name == "uvloop"
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


async def test_the_daemon_runs_and_says_so_on_uvloop(daemon_factory: StartDaemon) -> None:
    running = await daemon_factory()
    await running.shutdown()

    lines = await _run_briefly(running.config_path)

    [selected] = [line for line in lines if line.get("event") == "loop.selected"]
    assert selected["loop"] == "uvloop"
    assert any(line.get("event") == "daemon.started" for line in lines)


def test_without_uvloop_auto_falls_back_and_insisting_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # importing it now fails
    with pytest.raises(ImportError):
        loop_factory("uvloop")
    assert loop_factory() == ("asyncio", None)
