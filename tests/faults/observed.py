"""What the campaign's checker looks at: what the clients' logs say (:class:`Logged`, one
:class:`OpView` per operation) and what the two systems show once recovery is done
(:class:`Visible`)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.crash.checker import decision_records, prepared_gids
from tests.plugins.kafka_helpers import read_committed

__all__ = [
    "AttemptView",
    "Logged",
    "OpView",
    "Visible",
    "load_logs",
    "read_logs",
    "read_systems",
    "settle",
]


@dataclass
class AttemptView:
    number: int
    told: str | None = None
    error: str | None = None
    gid: str | None = None


@dataclass
class OpView:
    op: str
    kind: str
    attempts: dict[int, AttemptView] = field(default_factory=dict)
    final: str | None = None
    crashes: list[str] = field(default_factory=list)
    pauses: int = 0
    committed_attempts: list[int] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    by_recovery: bool = False
    numbers: list[int] = field(default_factory=list)
    """Its attempts: those logged and those visible in either system."""
    phantom: bool = False
    """Visible, but no client ever attempted it."""

    def flag(self, category: str, text: str) -> None:
        self.problems[category].append(f"{self.op}: {text}")


def load_logs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every JSON line of the workers' logs (a line torn by a kill is skipped)."""
    lines: list[dict[str, Any]] = []
    for path in paths:
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
    return lines


@dataclass
class Logged:
    """What the clients' logs say."""

    ops: dict[str, OpView]
    gid_owner: dict[str, tuple[str, int]]
    """gid -> (op id, attempt number)."""
    kills: Counter[str]
    crash_gids: list[tuple[str, str | None]]
    """(point, gid) of every deliberate kill."""
    pauses: list[tuple[str, str, int | None]]
    """(op id, step, attempt number) of every deliberate pause."""


@dataclass
class Visible:
    """What the two systems show once recovery is done."""

    rows: dict[tuple[str, int], int]
    """(op id, attempt) -> rows committed."""
    messages: dict[tuple[str, int], dict[int, int]]
    """(op id, attempt) -> {message number: times visible to read_committed}."""
    decisions: Counter[str]
    """gid -> decision records visible."""
    prepared: list[str]
    unparsable: int

    def attempt(self, op_id: str, number: int) -> tuple[int, dict[int, int]]:
        """The attempt's rows and messages."""
        return self.rows.get((op_id, number), 0), self.messages.get((op_id, number), {})


def read_logs(lines: list[dict[str, Any]], plan: Mapping[str, Mapping[str, Any]]) -> Logged:
    """Every operation of ``plan`` the logs mention: its attempts, what they were told,
    their gids, deliberate kills and pauses."""
    logged = Logged({}, {}, Counter(), [], [])
    ops, gid_owner = logged.ops, logged.gid_owner
    open_attempt: dict[str, int] = {}
    for ln in lines:
        ev, op_id = ln.get("event"), ln.get("op")
        if op_id is None or op_id not in plan:
            continue
        view = ops.setdefault(op_id, OpView(op_id, str(plan[op_id].get("kind", "ok"))))
        if ev == "attempt":
            view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            open_attempt[op_id] = int(ln["attempt"])
        elif ev == "pause":
            view.pauses += 1
            logged.pauses.append((op_id, str(ln.get("step")), open_attempt.get(op_id)))
        elif ev == "gid":
            a = view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            a.gid = str(ln["gid"])
            gid_owner[a.gid] = (op_id, a.number)
        elif ev == "result":
            a = view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            a.told, a.error = str(ln["told"]), ln.get("error")
            if ln.get("gid") and a.gid is None:
                a.gid = str(ln["gid"])
                gid_owner[a.gid] = (op_id, a.number)
        elif ev == "op":
            view.final = str(ln["told"])
        elif ev == "crash":
            view.crashes.append(str(ln.get("point")))
            logged.kills[str(ln.get("point"))] += 1
            logged.crash_gids.append((str(ln.get("point")), ln.get("gid")))
    return logged


def read_systems(*, dsn: str, bootstrap: str, name: str, table: str, topic: str,
                 decision_topic: str, timeout: float) -> Visible:
    """The rows of ``table``, the messages of ``topic`` and the decision records a
    ``read_committed`` consumer sees, and the prepared transactions of ``name``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT op_id, attempt, count(*) FROM {} GROUP BY 1, 2")
                            .format(sql.Identifier(table))).fetchall()
    row_count: dict[tuple[str, int], int] = {(str(o), int(str(a))): int(str(c))
                                             for o, a, c in rows}
    msgs: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    unparsable = 0
    for rec in read_committed(bootstrap, topic, timeout):
        try:
            body = json.loads(rec.value or b"")
            key, n = (str(body["op"]), int(body["attempt"])), int(body["n"])
        except (ValueError, KeyError, TypeError):
            unparsable += 1
            continue
        msgs[key][n] = msgs[key].get(n, 0) + 1
    return Visible(row_count, dict(msgs), decision_records(bootstrap, decision_topic, timeout),
                   prepared_gids(dsn, name), unparsable)


def settle(logged: Logged, visible: Visible, resolved_by_recovery: set[str]) -> None:
    """Add the operations visible but never logged (phantoms); for every operation, its
    attempt numbers, which of them are committed, and whether recovery resolved one."""
    for op_id in sorted(({o for o, _ in visible.rows} | {o for o, _ in visible.messages})
                        - set(logged.ops)):
        logged.ops[op_id] = OpView(op_id, "?", phantom=True)
    for op_id, view in logged.ops.items():
        view.numbers = sorted(set(view.attempts) | {a for o, a in visible.rows if o == op_id}
                              | {a for o, a in visible.messages if o == op_id})
        view.committed_attempts = [n for n in view.numbers if visible.attempt(op_id, n)[0]]
        view.by_recovery = any(a.gid in resolved_by_recovery for a in view.attempts.values())
