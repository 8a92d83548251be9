"""Thin adapter over psycopg: PREPARE, COMMIT/ROLLBACK PREPARED with retries,
start-up checks, and the idempotency-key table.

psycopg's two-phase API (``tpc_begin``/``tpc_prepare``/``tpc_commit``) is not
used: the coordinator needs the transaction's xid in the same round trip as
``PREPARE TRANSACTION`` (to ask PostgreSQL later what became of a gid that is
gone), checks PREPARE's command tag itself (a failed transaction answers
``ROLLBACK``), runs pooled connections in autocommit mode with an explicit
``BEGIN``, and finishes gids from any pooled connection with retries -- all
simpler with plain SQL than around ``tpc_*``'s own transaction state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from ._enums import Phase
from ._errmap import is_connection_error
from .config import RetryPolicy
from .errors import (
    AlreadyCommitted,
    IdempotencyKeyBusy,
    PreparedTransactionsDisabled,
)
from .prepared import Connection, Finish, advisory_key, finish

__all__ = [
    "IdempotencyTable",
    "NotPrepared",
    "check_server",
    "finish_prepared",
    "instance_lock_key",
    "prepare",
]

log = logging.getLogger("coordinator.postgres")


def check_server(conn: Connection) -> int:
    """Fail fast when PostgreSQL cannot prepare transactions. Returns the limit."""
    row = conn.execute("SHOW max_prepared_transactions").fetchone()
    limit = int(str(row[0])) if row else 0
    if limit <= 0:
        raise PreparedTransactionsDisabled(
            "PostgreSQL has max_prepared_transactions = 0, so it cannot PREPARE TRANSACTION. "
            "Set max_prepared_transactions (at least max_connections used by coordinators, "
            "e.g. 100) in postgresql.conf and restart the server",
            phase=Phase.STARTUP,
        )
    return limit


def prepare(conn: Connection, gid: str) -> int | None:
    """``PREPARE TRANSACTION gid``; raise unless PostgreSQL really prepared.

    Returns the transaction's id (``pg_current_xact_id()``, read in the same
    round trip), so that the transaction's fate can be asked of PostgreSQL
    later (:func:`xact_status`) when its gid is gone. ``None`` when the block
    failed before (the SELECT is then refused along with the PREPARE).

    PREPARE on a transaction that already failed does a ROLLBACK and reports
    the command tag ``ROLLBACK``: that must never be taken for success.
    """
    with conn.cursor() as cur:
        # Two statements, no parameters: one simple-query round trip.
        cur.execute(sql.SQL(
            "SELECT pg_current_xact_id()::text::bigint; PREPARE TRANSACTION {}"
        ).format(sql.Literal(gid)))
        row = cur.fetchone()
        xid = int(str(row[0])) if row is not None else None
        cur.nextset()
        if cur.statusmessage != "PREPARE TRANSACTION":
            raise NotPrepared(
                f"PostgreSQL answered {cur.statusmessage!r} instead of PREPARE TRANSACTION: "
                "a statement inside the block had failed, so the transaction was rolled back"
            )
    return xid


class NotPrepared(Exception):
    pass




def finish_prepared(
    connect: Callable[[], Connection],
    release: Callable[[Connection], None],
    gid: str,
    commit: bool,
    retry: RetryPolicy,
    first: Connection | None = None,
) -> Finish:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` with retries on lost connections
    (and while another session is busy finishing the same gid).

    Any session of the same role can finish a prepared transaction, so each
    retry takes a new connection. Raises the last error when retries are spent.
    """
    conns = [first]

    def attempt() -> Finish:
        conn = conns.pop() if conns else None
        if conn is None or conn.closed:
            conn = connect()
        try:
            if not conn.autocommit:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.rollback()
                conn.autocommit = True
            result = finish(conn, gid, commit)
            if result is Finish.BUSY:
                raise _Busy(gid)
            return result
        finally:
            if conn is not first:
                release(conn)

    for a in retry.retrying(lambda e: isinstance(e, _Busy) or is_connection_error(e)):
        with a:
            if a.retry_state.attempt_number > 1:
                log.warning("gid=%s retrying %s (attempt %d)", gid,
                            "COMMIT PREPARED" if commit else "ROLLBACK PREPARED",
                            a.retry_state.attempt_number)
            return attempt()
    raise AssertionError("unreachable")  # pragma: no cover


class _Busy(Exception):
    """Another session is finishing the gid: retried like a lost connection."""


def instance_lock_key(name: str, instance: str) -> int:
    """The advisory-lock key of one coordinator instance."""
    return advisory_key("pk2pc", name, instance)


class IdempotencyTable:
    """The table recording idempotency keys, written in the business transaction."""

    def __init__(self, table: str, schema: str | None, wait_ms: int) -> None:
        self.ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        self.wait_ms = int(wait_ms)

    def create(self, conn: Connection) -> None:
        """Create the table when missing (``conn`` in autocommit mode).

        Two coordinators starting together on a fresh database race in ``CREATE
        TABLE IF NOT EXISTS``: the loser fails with a unique violation on the
        catalog (``pg_type_typname_nsp_index``) instead of a notice. The winner has
        committed by then, so the table exists and the error is ignored.
        """
        try:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " idempotency_key text PRIMARY KEY,"
                    " txid text NOT NULL,"
                    " gid text,"
                    " created_at timestamptz NOT NULL DEFAULT now())"
                ).format(self.ident)
            )
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            row = conn.execute("SELECT to_regclass(%s)",
                               (self.ident.as_string(conn),)).fetchone()
            if row is None or row[0] is None:
                raise

    def claim(self, conn: Connection, key: str, txid: str) -> None:
        """Insert the key in the open transaction, or raise.

        A committed holder -> :class:`AlreadyCommitted`; a holder still running
        or prepared past ``wait_ms`` -> :class:`IdempotencyKeyBusy`. A holder
        that rolls back meanwhile lets this one proceed.
        """
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{self.wait_ms}ms")))
        try:
            with conn.transaction():  # a savepoint: a time-out must not poison the block
                row = conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (idempotency_key, txid) VALUES (%s, %s) "
                        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1"
                    ).format(self.ident),
                    (key, txid),
                ).fetchone()
        except psycopg.errors.LockNotAvailable:
            raise IdempotencyKeyBusy(
                f"idempotency key {key!r} is held by another transaction that is still "
                f"running or in doubt (waited {self.wait_ms} ms); retry later",
                idempotency_key=key,
            ) from None
        conn.execute("SET LOCAL lock_timeout TO DEFAULT")
        if row is None:
            prev = conn.execute(
                sql.SQL("SELECT gid FROM {} WHERE idempotency_key = %s").format(self.ident),
                (key,),
            ).fetchone()
            previous_gid = str(prev[0]) if prev and prev[0] is not None else None
            raise AlreadyCommitted(
                f"idempotency key {key!r} was already committed"
                + (f" by {previous_gid}" if previous_gid else "")
                + "; nothing was applied or published again",
                idempotency_key=key,
                previous_gid=previous_gid,
            )

    def record_gid(self, conn: Connection, key: str, gid: str) -> None:
        conn.execute(
            sql.SQL("UPDATE {} SET gid = %s WHERE idempotency_key = %s").format(self.ident),
            (gid, key),
        )
