"""Check that PostgreSQL, Kafka and the decision log agree after crashes and recovery.

For every operation (``op_id``) a crash worker attempted (see :mod:`tests.crash.worker`):

* its row is in PostgreSQL  <=>  its messages are visible to a ``read_committed`` consumer
  (all ``messages_per_op`` of them, never only some)  <=>  a decision record for its gid
  is visible (when the gid is known);
* no message and no decision record is visible twice, no row exists twice;
* what the client was told is honoured: ``committed`` (or ``committed_pending_recovery``)
  means committed, ``rolled_back`` means not; ``unknown`` and ``error`` may go either way;
* nothing appears that no op made (a row or message of an unknown op id);
* no prepared transaction of the coordinator's ``name`` remains in the database.

Nothing here depends on pytest: :func:`check` returns a :class:`Verdict` listing every
problem; :meth:`Verdict.assert_ok` raises one AssertionError with all of them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from psycopg import sql

from coordinator import DecisionRecord
from coordinator.gid import InvalidGid, parse
from tests.plugins.kafka_helpers import read_committed

__all__ = [
    "Verdict",
    "WorkerLog",
    "check",
    "decision_records",
    "prepared_gids",
    "read_log",
    "wait_backends_gone",
]

COMMITTED_TOLD = frozenset({"committed", "committed_pending_recovery"})


@dataclass
class WorkerLog:
    """The JSON lines one worker wrote before it ended (or was killed)."""

    lines: list[dict[str, Any]]

    @property
    def ops(self) -> dict[str, dict[str, Any]]:
        """op id -> the op's final line (what the client was told)."""
        return {ln["op"]: ln for ln in self.lines if ln.get("event") == "op"}

    @property
    def crash(self) -> dict[str, Any] | None:
        crashes = [ln for ln in self.lines if ln.get("event") == "crash"]
        return crashes[-1] if crashes else None

    @property
    def gids(self) -> dict[str, str]:
        """op id -> gid, for every op whose gid the worker saw."""
        out: dict[str, str] = {}
        for ln in self.lines:
            if ln.get("op") and ln.get("gid"):
                out[ln["op"]] = ln["gid"]
        return out

    @property
    def ended(self) -> bool:
        return any(ln.get("event") == "end" for ln in self.lines)


def read_log(path: str | Path) -> WorkerLog:
    """Parse a worker's JSON lines; a torn last line (killed mid-write) is ignored."""
    lines = []
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return WorkerLog(lines)


def merge_logs(logs: Iterable[WorkerLog]) -> WorkerLog:
    return WorkerLog([ln for log in logs for ln in log.lines])


def prepared_gids(dsn: str, name: str | None = None) -> list[str]:
    """Prepared transactions in the database of ``dsn`` (only ``name``'s, when given)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = "
                            "current_database() ORDER BY prepared, gid").fetchall()
    gids = [str(r[0]) for r in rows]
    if name is None:
        return gids
    out = []
    for g in gids:
        try:
            if parse(g).name == name:
                out.append(g)
        except InvalidGid:
            continue
    return out


def wait_backends_gone(admin_dsn: str, dbname: str, timeout: float = 30.0,
                       application_name: str | None = None) -> None:
    """Wait until no other session is connected to ``dbname``: the backends of a killed
    client end only when they notice the closed socket, and until then they hold their
    locks (and an in-flight ``COMMIT PREPARED`` is still running)."""
    deadline = time.monotonic() + timeout
    query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
             "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    params: list[Any] = [dbname]
    if application_name is not None:
        query += " AND application_name = %s"
        params.append(application_name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query, params).fetchone()
            if row is not None and row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row and row[0]} session(s) still connected to {dbname} "
                                   f"after {timeout}s")
            time.sleep(0.05)


def decision_records(bootstrap: str, topic: str, timeout: float = 60.0) -> Counter[str]:
    """gid -> how many decision records a read_committed consumer sees (0 when the topic
    does not exist)."""
    try:
        records = read_committed(bootstrap, topic, timeout)
    except KafkaException as exc:
        if "UNKNOWN_TOPIC" in str(exc) or "no topic" in str(exc):
            return Counter()
        raise
    out: Counter[str] = Counter()
    for rec in records:
        d = DecisionRecord.decode(rec.key, rec.value)
        out[d.gid if d is not None else f"<foreign record at offset {rec.offset}>"] += 1
    return out


@dataclass
class Verdict:
    committed: set[str] = field(default_factory=set)
    """op ids committed on both sides."""
    rolled_back: set[str] = field(default_factory=set)
    """op ids visible on neither side."""
    problems: list[str] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    prepared: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def assert_ok(self) -> None:
        assert self.ok, "inconsistent after recovery:\n  " + "\n  ".join(self.problems)


def check(
    *,
    dsn: str,
    bootstrap: str,
    name: str,
    table: str,
    topic: str,
    decision_topic: str,
    op_ids: Iterable[str],
    log: WorkerLog | None = None,
    gids: Mapping[str, str] | None = None,
    messages_per_op: int = 2,
    timeout: float = 60.0,
) -> Verdict:
    """Compare both sides for ``op_ids``; see the module docstring."""
    v = Verdict()
    expected = list(op_ids)
    known = set(expected)
    told = log.ops if log is not None else {}
    op_gid: dict[str, str] = dict(log.gids) if log is not None else {}
    op_gid.update(gids or {})

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT op_id FROM {}").format(
            sql.Identifier(table))).fetchall()
    v.rows = Counter(str(r[0]) for r in rows)

    seen: Counter[tuple[str, int]] = Counter()
    for rec in read_committed(bootstrap, topic, timeout):
        try:
            body = json.loads(rec.value or b"")
            op, n = str(body["op"]), int(body["n"])
        except (ValueError, KeyError, TypeError):
            v.problems.append(f"unparsable message in {topic} at {rec.partition}/{rec.offset}")
            continue
        if rec.key is not None and rec.key.decode() != op:
            v.problems.append(f"message key {rec.key!r} does not match its op {op}")
        seen[(op, n)] += 1
        v.messages[op] += 1
    v.decisions = decision_records(bootstrap, decision_topic, timeout)
    v.prepared = prepared_gids(dsn, name)

    for (op, n), count in sorted(seen.items()):
        if count > 1:
            v.problems.append(f"message {n} of {op} visible {count} times")
    for op, count in sorted(v.rows.items()):
        if count > 1:
            v.problems.append(f"row {op} exists {count} times")
    for gid, count in sorted(v.decisions.items()):
        if count > 1:
            v.problems.append(f"decision record for {gid} visible {count} times")
        if gid.startswith("<foreign"):
            v.problems.append(f"{gid} in the decision topic")
    for op in sorted((set(v.rows) | set(v.messages)) - known):
        v.problems.append(f"{op} is visible (row: {v.rows[op]}, messages: {v.messages[op]}) "
                          "but no such op was attempted")

    for op in expected:
        in_pg = v.rows[op] > 0
        msgs = v.messages[op]
        if in_pg and msgs != messages_per_op:
            v.problems.append(f"{op}: row committed but {msgs}/{messages_per_op} messages "
                              "visible")
        if not in_pg and msgs:
            v.problems.append(f"{op}: no row but {msgs} message(s) visible")
        op_g = op_gid.get(op)
        if op_g is not None:
            decided = v.decisions[op_g] > 0
            if decided != in_pg:
                d_state, r_state = ("visible", "absent") if decided else ("absent", "present")
                v.problems.append(f"{op} ({op_g}): decision record {d_state} but the row is "
                                  f"{r_state}")
        t = told.get(op, {}).get("told")
        if t in COMMITTED_TOLD and not in_pg:
            v.problems.append(f"{op}: the client was told {t!r} but it is not committed")
        if t == "rolled_back" and (in_pg or msgs):
            v.problems.append(f"{op}: the client was told rolled_back but it is visible")
        (v.committed if in_pg else v.rolled_back).add(op)

    for gid in v.prepared:
        v.problems.append(f"prepared transaction {gid} of {name!r} remains")
    return v
