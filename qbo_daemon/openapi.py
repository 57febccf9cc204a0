"""The OpenAPI document of the token API (filled in by the API issue)."""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "qbo-daemon token API", "version": "1"}}
