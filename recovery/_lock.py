"""PostgreSQL side of recovery: one worker per name at a time.

Listing and finishing prepared transactions is ``coordinator.prepared``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg
import psycopg.errors
from psycopg import sql

from coordinator.prepared import Connection, advisory_key

__all__ = ["recovery_lock"]


@contextmanager
def recovery_lock(conn: Connection, name: str, wait_seconds: float) -> Iterator[bool]:
    """Hold the recovery lock of ``name`` (a session advisory lock), waiting up to
    ``wait_seconds`` for another worker to finish. Yields whether it was taken."""
    key = advisory_key("pk2pc-recovery", name)
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
