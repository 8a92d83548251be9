"""A small client for Toxiproxy's HTTP API (standard library only).

The proxies themselves are made by ``scripts/stack up --toxiproxy`` (``postgres`` and
``kafka-<broker id>``); this adds and removes *toxics* on them, or disables them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["Toxiproxy", "ToxiproxyError"]


class ToxiproxyError(Exception):
    pass


class Toxiproxy:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ToxiproxyError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        except OSError as exc:
            raise ToxiproxyError(f"{method} {path}: {exc}") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def proxies(self) -> dict[str, Any]:
        found = self._call("GET", "/proxies")
        return found if isinstance(found, dict) else {}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.proxies() if n.startswith(prefix))

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._call("POST", "/reset")

    def set_enabled(self, proxy: str, enabled: bool) -> None:
        """A disabled proxy closes its connections and refuses new ones."""
        self._call("POST", f"/proxies/{proxy}", {"enabled": enabled})

    def add_toxic(self, proxy: str, name: str, kind: str, attributes: dict[str, Any],
                  stream: str = "downstream", toxicity: float = 1.0) -> None:
        self._call("POST", f"/proxies/{proxy}/toxics", {
            "name": name, "type": kind, "stream": stream, "toxicity": toxicity,
            "attributes": attributes,
        })

    def remove_toxic(self, proxy: str, name: str) -> None:
        try:
            self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")
        except ToxiproxyError as exc:
            if "404" not in str(exc):
                raise
