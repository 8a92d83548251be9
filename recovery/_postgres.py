"""PostgreSQL side of recovery: list our prepared transactions, finish them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from enum import StrEnum

import psycopg
import psycopg.errors
from psycopg import sql

from coordinator.gid import InvalidGid, parse

from ._model import InDoubt

__all__ = ["FinishOutcome", "finish", "list_in_doubt", "recovery_lock"]

Connection = psycopg.Connection[tuple[object, ...]]


def list_in_doubt(conn: Connection, name: str, instance: str | None = None) -> list[InDoubt]:
    """Prepared transactions of this library for ``name`` in the connected database.

    Other databases' prepared transactions and gids that do not parse as ours
    are never returned, so recovery cannot touch them.
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
        found.append(InDoubt(gid, prepared, str(owner), str(database), float(age)))  # type: ignore[arg-type]
    return found


class FinishOutcome(StrEnum):
    DONE = "done"
    GONE = "gone"
    BUSY = "busy"


def finish(conn: Connection, gid: str, commit: bool) -> FinishOutcome:
    """``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` on an autocommit connection."""
    stmt = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
    try:
        conn.execute(sql.SQL(stmt).format(sql.Literal(gid)))
    except psycopg.errors.UndefinedObject:
        return FinishOutcome.GONE
    except psycopg.errors.ObjectInUse:
        return FinishOutcome.BUSY
    return FinishOutcome.DONE


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(f"pk2pc-recovery:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def recovery_lock(conn: Connection, name: str, wait_seconds: float) -> Iterator[bool]:
    """Hold the recovery lock of ``name`` (a session advisory lock), waiting up to
    ``wait_seconds`` for another worker to finish. Yields whether it was taken."""
    key = _lock_key(name)
    taken = False
    try:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(
            sql.Literal(f"{max(1, int(wait_seconds * 1000))}ms")))
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            taken = True
        except psycopg.errors.LockNotAvailable:
            taken = False
        conn.execute("SET lock_timeout TO DEFAULT")
        yield taken
    finally:
        if taken and not conn.closed:
            with suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
