"""A real Chromium for the status page's tests, driven by Playwright, and what it saw.

Debian's ``chromium`` (``apt-get install chromium``; ``scripts/check`` installs it)
is launched through ``executable_path``: Playwright's own browser download is
never used. Without a browser the tests are skipped with the reason, except under
``CI=true``, where a missing browser fails them. Screenshots go to
``test-artifacts/ui/`` (or ``$QBO_TEST_ARTIFACTS/ui/``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Page, Response

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("QBO_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "ui"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("QBO_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    return None


def unavailable(reason: str) -> None:
    """Skip with the reason; under CI a missing browser is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason}")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install -e '.[test]')")
        raise AssertionError("unreachable") from None
    path = chromium_path()
    if path is None:
        unavailable("no Chromium found (apt-get install chromium, or set QBO_CHROMIUM)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Seen:
    """Everything one page was served, and what its console said."""

    page: Page
    name: str
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def watch(self) -> None:
        self.page.on("response", self._on_response)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_response(self, response: Response) -> None:
        task = asyncio.ensure_future(self._keep(response))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _keep(self, response: Response) -> None:
        if 300 <= response.status < 400:
            self.bodies.append((response.url, b""))  # a redirect has no body to show
            return
        try:
            self.bodies.append((response.url, await response.body()))
        except Exception as exc:  # the page moved on before the body was read
            self.bodies.append((response.url, f"<unavailable: {exc}>".encode()))

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    async def settle(self) -> None:
        """Wait until every response seen so far has been read."""
        while self._pending:
            await asyncio.gather(*list(self._pending))

    async def visit(self, url: str) -> None:
        """Open ``url`` and read what it was served before anything else happens."""
        await self.page.goto(url)
        await self.settle()

    async def shot(self, step: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


async def open_page(browser: Browser, name: str) -> Seen:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    seen = Seen(await context.new_page(), name)
    seen.watch()
    return seen
