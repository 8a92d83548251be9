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

import psycopg
import psycopg.errors
import tenacity
from psycopg import sql

from ._effects import Execute, Flow, Result, Sleep
from ._enums import Phase
from ._errmap import is_connection_error
from ._logging import log_extra
from .config import RetryPolicy
from .errors import (
    AlreadyCommitted,
    IdempotencyKeyBusy,
    PreparedTransactionsDisabled,
)
from .prepared import Connection, Finish, advisory_key, finish_flow

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


def prepare(gid: str) -> Flow[int | None]:
    """``PREPARE TRANSACTION gid`` on the transaction's connection; raise
    :class:`NotPrepared` unless PostgreSQL really prepared.

    Returns the transaction's id (``pg_current_xact_id()``, read in the same
    round trip), so that the transaction's fate can be asked of PostgreSQL
    later (:func:`xact_status`) when its gid is gone. ``None`` when the block
    failed before (the SELECT is then refused along with the PREPARE).

    PREPARE on a transaction that already failed does a ROLLBACK and reports
    the command tag ``ROLLBACK``: that must never be taken for success.
    """
    # Two statements, no parameters: one simple-query round trip.
    results: list[Result] = yield Execute(sql.SQL(
        "SELECT pg_current_xact_id()::text::bigint; PREPARE TRANSACTION {}"
    ).format(sql.Literal(gid)))
    rows = results[0].rows
    xid = int(str(rows[0][0])) if rows and len(results) > 1 else None
    status = results[-1].status
    if status != "PREPARE TRANSACTION":
        raise NotPrepared(
            f"PostgreSQL answered {status!r} instead of PREPARE TRANSACTION: "
            "a statement inside the block had failed, so the transaction was rolled back"
        )
    return xid


class NotPrepared(Exception):
    pass


def finish_prepared(gid: str, commit: bool, retry: RetryPolicy,
                    on_own_connection: bool) -> Flow[Finish]:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` with retries on lost connections
    (and while another session is busy finishing the same gid).

    The first attempt runs on the transaction's own connection when
    ``on_own_connection`` (it is idle and usable); any session of the same role
    can finish a prepared transaction, so each retry takes a pooled connection.
    Raises the last error when retries are spent.
    """
    delays: list[float] = []
    retrying = tenacity.Retrying(
        stop=retry.stop, wait=retry.wait, sleep=delays.append, reraise=True,
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, _Busy)
                                          or is_connection_error(e)),
    )
    on_pool = not on_own_connection
    for a in retrying:
        if delays:  # tenacity chose the wait; the driver does the waiting
            yield Sleep(delays.pop(), retry.sleep)
        with a:
            if a.retry_state.attempt_number > 1:
                log.warning("gid=%s retrying %s (attempt %d)", gid,
                            "COMMIT PREPARED" if commit else "ROLLBACK PREPARED",
                            a.retry_state.attempt_number,
                            extra=log_extra(gid=gid, phase=Phase.PG_COMMIT))
            here, on_pool = on_pool, True  # any retry takes a pooled connection
            result = yield from finish_flow(gid, commit, on_pool=here)
            if result is Finish.BUSY:
                raise _Busy(gid)
            return result
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

    def claim(self, key: str, txid: str) -> Flow[None]:
        """Insert the key in the open transaction, or raise.

        A committed holder -> :class:`AlreadyCommitted`; a holder still running
        or prepared past ``wait_ms`` -> :class:`IdempotencyKeyBusy`. A holder
        that rolls back meanwhile lets this one proceed.
        """
        yield Execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{self.wait_ms}ms")))
        # A savepoint: a time-out must not poison the block.
        yield Execute("SAVEPOINT pk2pc_idempotency")
        try:
            results = yield Execute(
                sql.SQL(
                    "INSERT INTO {} (idempotency_key, txid) VALUES (%s, %s) "
                    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1"
                ).format(self.ident),
                (key, txid),
            )
        except psycopg.errors.LockNotAvailable:
            raise IdempotencyKeyBusy(
                f"idempotency key {key!r} is held by another transaction that is still "
                f"running or in doubt (waited {self.wait_ms} ms); retry later",
                idempotency_key=key,
            ) from None
        yield Execute("RELEASE SAVEPOINT pk2pc_idempotency")
        yield Execute("SET LOCAL lock_timeout TO DEFAULT")
        if not results[0].rows:
            found = yield Execute(
                sql.SQL("SELECT gid FROM {} WHERE idempotency_key = %s").format(self.ident),
                (key,),
            )
            prev = found[0].rows
            previous_gid = str(prev[0][0]) if prev and prev[0][0] is not None else None
            raise AlreadyCommitted(
                f"idempotency key {key!r} was already committed"
                + (f" by {previous_gid}" if previous_gid else "")
                + "; nothing was applied or published again",
                idempotency_key=key,
                previous_gid=previous_gid,
            )

    def record_gid(self, key: str, gid: str) -> Flow[None]:
        yield Execute(
            sql.SQL("UPDATE {} SET gid = %s WHERE idempotency_key = %s").format(self.ident),
            (gid, key),
        )
