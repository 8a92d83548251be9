"""A workload operation's attempts and the client's final answer; resuming a plan after
the client process was killed (``tests/faults/workload.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMMITTED_TOLD",
    "FINAL_TOLD",
    "MAX_ATTEMPTS",
    "NOT_APPLIED_TOLD",
    "OP_DEADLINE",
    "RETRY_AFTER",
    "OpState",
    "resume",
]

COMMITTED_TOLD = frozenset({"committed", "already_committed", "pending"})
"""Attempt answers that say the operation is committed."""
NOT_APPLIED_TOLD = frozenset({"rolled_back", "busy"})
"""Attempt answers that say this attempt changed nothing."""
FINAL_TOLD = ("committed", "rolled_back", "unknown")

MAX_ATTEMPTS = 6
OP_DEADLINE = 240.0
"""Seconds after its first attempt an operation is given up (told unknown)."""
RETRY_AFTER = {"busy": 2.0, "unknown": 3.0, "killed": 0.5, "rolled_back": 0.3, "error": 1.0}


@dataclass
class OpState:
    spec: dict[str, Any]
    attempts: list[str] = field(default_factory=list)
    """What each attempt was told, in order."""
    first_at: float | None = None
    crashed: bool = False

    @property
    def op(self) -> str:
        return str(self.spec["op"])

    @property
    def idem(self) -> bool:
        return bool(self.spec.get("idem"))

    @property
    def kind(self) -> str:
        return str(self.spec.get("kind", "ok"))

    def final(self) -> str | None:
        """The client's final answer when no further attempt will be made, else None."""
        if not self.attempts:
            return None
        last = self.attempts[-1]
        if any(t in COMMITTED_TOLD for t in self.attempts):
            return "committed"
        if self.kind != "ok" and last in NOT_APPLIED_TOLD and last != "busy":
            return "rolled_back"  # the application's own failure: it does not retry
        retry = (last in ("unknown", "killed", "busy", "rolled_back", "error") if self.idem
                 else last == "rolled_back")
        if retry and len(self.attempts) < MAX_ATTEMPTS and not self._expired():
            return None
        if all(t in NOT_APPLIED_TOLD for t in self.attempts):
            return "rolled_back"
        return "unknown"

    def _expired(self) -> bool:
        return self.first_at is not None and time.monotonic() - self.first_at > OP_DEADLINE


def resume(path: Path, plan: list[dict[str, Any]],
           emit: Callable[..., None]) -> list[OpState]:
    """The operations still to do, from the plan and what the log says happened.

    An attempt with no ``result`` was interrupted by a kill: it is recorded as ``killed``
    now. Operations with a final ``op`` record are done.
    """
    lines: list[dict[str, Any]] = []
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue  # torn by the kill
    done = {ln["op"] for ln in lines if ln.get("event") == "op"}
    attempts: dict[str, list[str]] = {}
    open_attempt: dict[str, int] = {}
    crashed: set[str] = set()
    for ln in lines:
        ev, op = ln.get("event"), str(ln.get("op"))
        if ev == "attempt":
            attempts.setdefault(op, [])
            open_attempt[op] = int(ln["attempt"])
        elif ev == "result":
            attempts.setdefault(op, []).append(str(ln["told"]))
            open_attempt.pop(op, None)
        elif ev in ("crash", "pause"):
            crashed.add(op)
    out: list[OpState] = []
    for spec in plan:
        op_id = str(spec["op"])
        if op_id in done:
            continue
        st = OpState(spec, list(attempts.get(op_id, [])), crashed=op_id in crashed)
        if op_id in open_attempt:
            emit(event="result", op=op_id, attempt=open_attempt[op_id], told="killed",
                 error="killed", detail="the client process was killed during this attempt",
                 phase=None, gid=None, status=None, t=time.time())
            st.attempts.append("killed")
        if st.attempts:
            st.first_at = time.monotonic()
            final = st.final()
            if final is not None:
                emit(event="op", op=op_id, told=final, attempts=len(st.attempts),
                     error=None if final == "committed" else st.attempts[-1])
                continue
        out.append(st)
    return out
