"""The status page's stylesheet, script and icon, read once from the package."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

_TYPES = {
    "app.css": "text/css",
    "app.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    version: str  # a digest of the content: pages link ``?v=<version>``


class StaticFiles:
    """Every file the pages link, by name; nothing else is served."""

    def __init__(self) -> None:
        folder = resources.files("qbo_daemon.http.ui") / "static"
        self._files = {}
        for name, content_type in _TYPES.items():
            body = (folder / name).read_bytes()
            self._files[name] = StaticFile(
                body, content_type, hashlib.sha256(body).hexdigest()[:10]
            )

    def get(self, name: str) -> StaticFile | None:
        return self._files.get(name)

    def versions(self) -> dict[str, str]:
        return {name: file.version for name, file in self._files.items()}
