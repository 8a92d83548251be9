"""An HTTP service on :class:`~coordinator.AsyncCoordinator`: FastAPI, one
coordinated transaction per request.

``POST /orders`` inserts a row into PostgreSQL and publishes an
``order.created`` event to Kafka, committed together; ``GET /orders/{id}``
reads the row. Build the app with :func:`create_app` (importing this module
does no work), or run it from the environment::

    PG_DSN=postgresql://app@127.0.0.1:5432/shop KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 \\
    uvicorn --factory examples.fastapi_app:app_from_env

(the Kafka topic, ``orders.events`` by default or ``ORDERS_TOPIC``, must exist;
uvicorn is not a dependency of this library.)

The app's lifespan opens one coordinator, resolves this instance's transactions
left in doubt by its previous run (:func:`recovery.arecover_own`), then creates
the table. The ``Idempotency-Key`` request header is required and becomes the
transaction's idempotency key, so a client can retry a request whose answer it
lost (a timeout, a 202, a 503) without ordering twice. The answers follow the
IETF draft "The Idempotency-Key HTTP Header Field": a retry of a committed
request replays the first result; a retry while the first is still running or
in doubt gets 409; the same key with a different body gets 422.

Every library error becomes an HTTP answer in :func:`error_reply`, one table.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, LiteralString

import psycopg.errors
from fastapi import FastAPI, Header, Path
from fastapi.responses import JSONResponse
from psycopg.rows import class_row
from pydantic import BaseModel, Field

from coordinator import (
    AlreadyCommitted,
    AsyncCoordinator,
    CommittedPendingRecovery,
    CoordinatorConfig,
    Error,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    Phase,
    PrepareForbidden,
    RolledBack,
    ServiceUnavailable,
    UsageError,
)
from recovery import RecoveryConfig, arecover_own

__all__ = [
    "ErrorReply",
    "Order",
    "Settings",
    "app_from_env",
    "create_app",
    "error_reply",
]

log = logging.getLogger("examples.fastapi_app")

_CREATE = ("CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, total int NOT NULL,"
           " idempotency_key text NOT NULL UNIQUE)")
_INSERT = "INSERT INTO orders (id, total, idempotency_key) VALUES (%s, %s, %s)"
_BY_ID = "SELECT id, total FROM orders WHERE id = %s"
_BY_KEY = "SELECT id, total FROM orders WHERE idempotency_key = %s"
_KEY_SCOPE = "POST /orders:"
"""Prefix of the idempotency keys: the key table is shared by every operation
of the database, so each operation scopes its clients' keys."""
_INT4_MAX = 2**31 - 1


@dataclass(frozen=True)
class Settings:
    """What the app needs; see :class:`~coordinator.AsyncCoordinator`."""

    postgres: str
    kafka: Mapping[str, Any]
    topic: str = "orders.events"
    name: str = "orders"
    instance: str | None = None
    config: CoordinatorConfig | None = None
    recovery: RecoveryConfig | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """``PG_DSN``, ``KAFKA_BOOTSTRAP_SERVERS``; optional ``ORDERS_TOPIC`` and
        ``ORDERS_INSTANCE`` (a stable id per process: see configuration.md)."""
        return cls(
            postgres=os.environ["PG_DSN"],
            kafka={"bootstrap.servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"]},
            topic=os.environ.get("ORDERS_TOPIC", "orders.events"),
            instance=os.environ.get("ORDERS_INSTANCE"),
        )


class Order(BaseModel):
    """An order, as posted and as read back."""

    id: int = Field(ge=1, le=_INT4_MAX)
    total: int = Field(ge=0, le=_INT4_MAX)


# -- the library's errors as HTTP answers ------------------------------------


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP answer for a library error. ``code`` is for machines, ``detail``
    for people; neither carries the error's own text (gids, hosts, SQL stay in
    the log)."""

    status: int
    code: str
    detail: str
    retry_after: int | None = None

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        extra = dict(headers or {})
        if self.retry_after is not None:
            extra["Retry-After"] = str(self.retry_after)
        return JSONResponse({"code": self.code, "detail": self.detail},
                            status_code=self.status, headers=extra)


_RESOLVING = ("accepted; the outcome is being resolved: retry with the same "
              "Idempotency-Key or read the order later")

_REPLIES: Mapping[tuple[type, Phase | None], ErrorReply] = {
    # Committed by an earlier request with this key: the endpoint replays the first
    # result (or answers 422 when the key came with a different request).
    (AlreadyCommitted, None): ErrorReply(200, "replayed", "already committed"),
    # The first request with this key is running, or prepared and in doubt.
    (IdempotencyKeyBusy, None): ErrorReply(
        409, "in_progress", "a request with this Idempotency-Key is still being "
        "processed; retry later", retry_after=1),
    # Rolled back, nothing visible; safe to retry. The block's SQL (or the one-phase
    # COMMIT) lost to a concurrent transaction: a conflict. Anything else (Kafka, a
    # lost connection at PREPARE): the service could not complete it for now.
    (RolledBack, Phase.EXECUTE): ErrorReply(
        409, "conflict", "conflicted with a concurrent change; nothing was done"),
    (RolledBack, Phase.PG_COMMIT): ErrorReply(
        409, "conflict", "conflicted with a concurrent change; nothing was done"),
    (RolledBack, None): ErrorReply(
        503, "rolled_back", "could not be completed now; nothing was done, retry",
        retry_after=2),
    # The code did what PostgreSQL cannot prepare: a bug, retrying cannot help.
    (PrepareForbidden, None): ErrorReply(500, "internal", "internal error"),
    # Committed, or decided by recovery from the decision log: not an error to the
    # client, and not to be retried without the key.
    (OutcomeUnknown, None): ErrorReply(202, "being_resolved", _RESOLVING, retry_after=5),
    (CommittedPendingRecovery, None): ErrorReply(202, "being_resolved", _RESOLVING,
                                                 retry_after=5),
    (ServiceUnavailable, None): ErrorReply(
        503, "unavailable", "a backing service is unavailable; nothing was done, retry",
        retry_after=2),
    # A bug of the app (UsageError), a broken set-up (ConfigurationError), a
    # transaction to reconcile by hand (Diverged, logged at CRITICAL): 500, as
    # anything else.
    (UsageError, None): ErrorReply(500, "internal", "internal error"),
    (Error, None): ErrorReply(500, "internal", "internal error"),
}


def error_reply(exc: Error) -> ErrorReply:
    """The answer for ``exc``: the most specific class of the table, and within a
    class a row for the error's phase before the class's catch-all."""
    for cls in type(exc).__mro__:
        for key in ((cls, exc.phase), (cls, None)):
            reply = _REPLIES.get(key)
            if reply is not None:
                return reply
    raise AssertionError(f"not a coordinator.Error: {exc!r}")  # pragma: no cover


# -- the app -------------------------------------------------------------------


class _Runtime:
    """What the lifespan opens, for the endpoints of one app."""

    coord: AsyncCoordinator | None = None

    def coordinator(self) -> AsyncCoordinator:
        if self.coord is None:
            raise UsageError("the app is not started (run it with its lifespan)")
        return self.coord


def create_app(settings: Settings) -> FastAPI:
    """The orders service. Nothing is opened before the app's lifespan starts."""
    runtime = _Runtime()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncCoordinator(postgres=settings.postgres, kafka=settings.kafka,
                                    name=settings.name, instance=settings.instance,
                                    config=settings.config) as coord:
            # First, this instance's own transactions a previous run left in doubt
            # (they may hold locks on the table).
            report = await arecover_own(coord, settings.kafka, settings.recovery)
            if report.committed or report.rolled_back or not report.ok:
                log.warning("start-up recovery: %s", report.as_json())
            async with coord.connection() as conn:
                await conn.execute(_CREATE)
            runtime.coord = coord
            try:
                yield
            finally:
                runtime.coord = None

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.post("/orders", status_code=201, response_model=Order)
    async def place_order(
        order: Order,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Any:
        if not idempotency_key:
            return ErrorReply(400, "idempotency_key_missing",
                              "the Idempotency-Key header is required").response()
        coord = runtime.coordinator()
        location = {"Location": f"/orders/{order.id}"}
        try:
            async with coord.transaction(idempotency_key=_KEY_SCOPE + idempotency_key) as tx:
                await tx.execute(_INSERT, (order.id, order.total, idempotency_key))
                tx.produce(settings.topic, key=str(order.id).encode(),
                           value=json.dumps(order.model_dump()).encode(),
                           headers={"type": "order.created"})
        except AlreadyCommitted:
            return await _replay(coord, order, idempotency_key)
        except psycopg.errors.UniqueViolation:  # raised by the block: rolled back
            return ErrorReply(409, "order_exists",
                              f"order {order.id} exists (placed with another "
                              "Idempotency-Key)").response()
        except Error as exc:
            reply = error_reply(exc)
            log.log(logging.ERROR if reply.status >= 500 else logging.WARNING,
                    "POST /orders id=%s: %s", order.id, exc)
            return reply.response(location if reply.status == 202 else None)
        return JSONResponse(order.model_dump(), status_code=201, headers=location)

    @app.get("/orders/{order_id}", response_model=Order)
    async def read_order(order_id: Annotated[int, Path(ge=1, le=_INT4_MAX)]) -> Any:
        found = await _find(runtime.coordinator(), _BY_ID, order_id)
        if found is None:
            return ErrorReply(404, "not_found", f"no order {order_id}").response()
        return found

    return app


async def _find(coord: AsyncCoordinator, query: LiteralString, value: object) -> Order | None:
    async with coord.connection() as conn, conn.cursor(row_factory=class_row(Order)) as cur:
        await cur.execute(query, (value,))
        return await cur.fetchone()


async def _replay(coord: AsyncCoordinator, order: Order, key: str) -> JSONResponse:
    """The first result of a request with this key (it committed), if this is
    the same request; 422 if the key was used for another one."""
    first = await _find(coord, _BY_KEY, key)
    if first != order:
        return ErrorReply(422, "idempotency_key_reused",
                          "this Idempotency-Key was used for a different request").response()
    return JSONResponse(order.model_dump(), status_code=200,
                        headers={"Location": f"/orders/{order.id}",
                                 "Idempotent-Replayed": "true"})


def app_from_env() -> FastAPI:
    """:func:`create_app` with :meth:`Settings.from_env` (for ``uvicorn --factory``)."""
    return create_app(Settings.from_env())
