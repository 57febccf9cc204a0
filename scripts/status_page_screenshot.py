"""Take the README's picture of the status page: ``python scripts/status_page_screenshot.py``.

Runs ``qbo-daemon demo`` as a person would, reads the address and sign-in key it
prints, lets the demo run (connections, refreshes, the injected outage), then
signs in with Debian's Chromium through Playwright and saves the overview to
docs/status-page.png.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
_ADDRESS = re.compile(r"status page (http://\S+/ui/)")
_KEY = re.compile(r"sign-in key (\S+)")


async def main(wait: float, out: Path, width: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "qbo_daemon",
            "demo",
            "--data-dir",
            data_dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert demo.stdout is not None
        address = key = None
        while address is None or key is None:
            line = (await asyncio.wait_for(demo.stdout.readline(), 30)).decode()
            if not line:
                raise SystemExit("the demo stopped before printing its address")
            address = address or (m.group(1) if (m := _ADDRESS.search(line)) else None)
            key = key or (m.group(1) if (m := _KEY.search(line)) else None)
        drain = asyncio.create_task(demo.stdout.read())
        try:
            print(f"demo at {address}; waiting {wait:.0f} s for refreshes and the outage")
            await asyncio.sleep(wait)
            await _shoot(address, key, out, width)
        finally:
            demo.send_signal(signal.SIGINT)
            await demo.wait()
            drain.cancel()
    print(f"saved {out}")


async def _shoot(address: str, key: str, out: Path, width: int) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium"
        )
        page = await browser.new_page(
            viewport={"width": width, "height": 900}, device_scale_factor=1
        )
        await page.goto(address)
        await page.fill("#key", key)
        await page.click("form[action='/ui/login'] button[type=submit]")
        await page.wait_for_selector("#stats")
        await page.goto(address + "?history=15m")
        await page.wait_for_timeout(1500)
        await page.screenshot(path=str(out), full_page=True)
        await browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wait", type=float, default=200.0, help="seconds of demo first")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    asyncio.run(main(args.wait, args.out, args.width))
