"""What the campaign reads from its client processes' logs while they run: whether a
process is inside an attempt (for aimed faults), has started, has ended, or -- a pipeline
stage -- waits for recovery or is stuck retrying one batch (the liveness probe)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["STUCK_RETRIES", "STUCK_SECONDS", "ended", "in_attempt", "started", "stuck",
           "waiting"]

STUCK_RETRIES = 5
STUCK_SECONDS = 20.0
"""A stage is stuck when the same batch rolled back this many times in a row, over at
least this many seconds, with no pause or wait for recovery in between."""


def _tail(path: Path, start: int, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - limit))
            return f.read()
    except OSError:
        return b""


def in_attempt(path: Path) -> bool:
    """Whether the last record says the process is inside an attempt (a workload client)
    or a transaction (a pipeline stage)."""
    tail = _tail(path, 0, 2048).splitlines()
    last = tail[-1] if tail else b""
    return any(f'"event": "{ev}"'.encode() in last for ev in ("attempt", "gid", "batch"))


def waiting(path: Path) -> bool:
    """Whether the last record says a pipeline stage waits for recovery to decide."""
    tail = _tail(path, 0, 2048).splitlines()
    return bool(tail) and b'"event": "wait"' in tail[-1]


def started(path: Path, pos: int) -> bool:
    """Whether the process whose records begin at ``pos`` logged its ``start`` record."""
    return b'"event": "start"' in _tail(path, pos, 1 << 30)


def ended(path: Path) -> bool:
    lines = _tail(path, 0, 4096).splitlines()
    return any(b'"event": "end"' in ln for ln in lines[-3:])


def stuck(path: Path, pos: int) -> str | None:
    """Why the stage whose records begin at ``pos`` is stuck (see ``STUCK_RETRIES``), or
    None."""
    batch: object = None
    streak: list[dict[str, object]] = []
    for raw in _tail(path, pos, 256 * 1024).splitlines():
        try:
            ln = json.loads(raw)
        except ValueError:
            continue
        ev = ln.get("event")
        if ev == "batch":
            if ln.get("msgs") != batch:
                batch, streak = ln.get("msgs"), []
        elif ev == "result":
            streak = [*streak, ln] if ln.get("status") == "rolled_back" else []
        elif ev in ("pause", "wait", "start"):
            batch, streak = None, []
    if len(streak) < STUCK_RETRIES:
        return None
    span = float(str(streak[-1].get("t", 0))) - float(str(streak[0].get("t", 0)))
    if span < STUCK_SECONDS:
        return None
    return (f"the same batch rolled back {len(streak)} times in a row over {span:.0f} s; "
            f"last reason: {streak[-1].get('reason')}")
