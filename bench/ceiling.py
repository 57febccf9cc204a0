"""The ceiling: a bare aiohttp client sending the same refresh requests, nothing else.

``python -m bench.ceiling --url TOKEN_URL --tokens FILE --concurrency C --out FILE``
sends one refresh per token in ``FILE`` (a JSON list), ``C`` at a time, over one
``ClientSession`` with the daemon's connector limit, the same headers and form
body as :class:`qbo_daemon.intuit.client.IntuitClient`, and parses each JSON answer.
No database, no encryption, no logging, no scheduling: what Python and aiohttp
cost per refresh on this machine. Writes ``{"count", "ok", "elapsed", "cpu"}``
measured over the sending only (interpreter start and imports excluded, as the
daemon's start-up is excluded from its own figure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from qbo_daemon.intuit.client import HARD_EXPIRY_HEADER


def headers(client_id: str, client_secret: str) -> dict[str, str]:
    pair = f"{client_id}:{client_secret}".encode()
    return {
        "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
        HARD_EXPIRY_HEADER: "true",
    }


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """The options every client process of the bench takes: the token endpoint, the
    simulator's client credentials, and the JSON file its figures go to."""
    parser.add_argument("--url", required=True)
    parser.add_argument("--client-id", default="sim-client-id")
    parser.add_argument("--client-secret", default="sim-client-secret")
    parser.add_argument("--out", type=Path, required=True)


async def drive(
    url: str, tokens: list[str], concurrency: int, client_id: str, client_secret: str
) -> dict[str, Any]:
    fixed = headers(client_id, client_secret)
    pending: Iterator[str] = iter(tokens)
    ok = 0
    connector = aiohttp.TCPConnector(limit=max(100, concurrency * 2))
    timeout = aiohttp.ClientTimeout(total=30)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok
            for token in pending:
                data = urlencode({"grant_type": "refresh_token", "refresh_token": token}).encode()
                async with session.post(
                    url, data=data, headers=dict(fixed), allow_redirects=False
                ) as answer:
                    body = await answer.read()
                    tid = answer.headers.get("intuit_tid")
                if answer.status == 200 and tid and json.loads(body).get("access_token"):
                    ok += 1

        started_wall, started_cpu = time.time(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.time() - started_wall, time.process_time() - started_cpu
    return {
        "count": len(tokens),
        "ok": ok,
        "started": started_wall,
        "elapsed": elapsed,
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    add_client_options(parser)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    tokens = json.loads(args.tokens.read_text(encoding="utf-8"))
    result = asyncio.run(
        drive(args.url, tokens, args.concurrency, args.client_id, args.client_secret)
    )
    args.out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
