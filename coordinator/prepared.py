"""PostgreSQL's prepared transactions of this library: list them, finish them.

Shared by the coordinator (finishing its own transactions) and the recovery
worker (finishing everybody's): one implementation of each operation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import psycopg
from psycopg import sql

from ._effects import Execute, Flow, run_on
from ._errmap import is_busy_gid, is_unknown_gid
from .gid import Gid, InvalidGid, parse

__all__ = [
    "Connection",
    "Finish",
    "PreparedTransaction",
    "advisory_key",
    "finish",
    "finish_flow",
    "list_prepared",
    "xact_status",
    "xact_status_flow",
]

Connection = psycopg.Connection[tuple[object, ...]]
"""The connection type used throughout (tuple rows)."""


@dataclass(frozen=True, slots=True)
class PreparedTransaction:
    """A prepared transaction of ours, as ``pg_prepared_xacts`` shows it."""

    gid: Gid
    prepared: datetime
    owner: str
    database: str
    age_seconds: float
    """By PostgreSQL's clock (``clock_timestamp() - prepared``)."""

    @property
    def text(self) -> str:
        return str(self.gid)


def list_prepared(conn: Connection, name: str,
                  instance: str | None = None) -> list[PreparedTransaction]:
    """Prepared transactions of this library for ``name`` in the connected database,
    oldest first.

    Other databases' prepared transactions and gids that do not parse as ours
    are never returned, so nothing built on this can touch them.
    """
    rows = conn.execute(
        "SELECT gid, prepared, owner, database,"
        " extract(epoch FROM (clock_timestamp() - prepared))::float8"
        " FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
    ).fetchall()
    found = []
    for gid_text, prepared, owner, database, age in rows:
        try:
            gid = parse(str(gid_text))
        except InvalidGid:
            continue
        if gid.name != name or (instance is not None and gid.instance != instance):
            continue
        assert isinstance(prepared, datetime) and isinstance(age, float)
        found.append(PreparedTransaction(gid, prepared, str(owner), str(database), age))
    return found


class Finish(StrEnum):
    """What ``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` found."""

    DONE = "done"
    GONE = "gone"
    """The gid no longer exists: someone (an earlier attempt, recovery) finished
    it. Not proof of either outcome: ask :func:`xact_status`."""
    BUSY = "busy"
    """Another session is finishing it right now."""


def finish(conn: Connection, gid: str, commit: bool) -> Finish:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` on an autocommit connection.

    Raises anything else PostgreSQL answers (a lost connection included).
    """
    return run_on(conn, finish_flow(gid, commit))


def finish_flow(gid: str, commit: bool, on_pool: bool = False) -> Flow[Finish]:
    """:func:`finish` as a flow (``_effects.py``), for the coordinator's drivers."""
    stmt = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
    try:
        yield Execute(sql.SQL(stmt).format(sql.Literal(gid)), on_pool=on_pool)
    except psycopg.Error as exc:
        if is_unknown_gid(exc):
            return Finish.GONE
        if is_busy_gid(exc):
            return Finish.BUSY
        raise
    return Finish.DONE


def xact_status(conn: Connection, xid: int) -> str | None:
    """PostgreSQL's word on transaction ``xid``: ``committed``, ``aborted``,
    ``in progress`` (a prepared transaction is), or ``None`` when too old to tell."""
    return run_on(conn, xact_status_flow(xid))


def xact_status_flow(xid: int, on_pool: bool = False) -> Flow[str | None]:
    """:func:`xact_status` as a flow."""
    results = yield Execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),),
                            on_pool=on_pool)
    rows = results[0].rows
    return None if not rows or rows[0][0] is None else str(rows[0][0])


def advisory_key(*parts: str) -> int:
    """A 64-bit PostgreSQL advisory-lock key for ``parts`` (e.g. a coordinator
    instance, or recovery for a name)."""
    text = ":".join(parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
