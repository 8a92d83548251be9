"""The FastAPI example's table from library errors to HTTP answers (no services)."""

from __future__ import annotations

import json

import pytest

from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    ConfigurationError,
    DecisionTopicMisconfigured,
    Diverged,
    Error,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    Phase,
    PoisonMessage,
    PreparedTransactionsDisabled,
    PrepareForbidden,
    RolledBack,
    ServiceUnavailable,
    UsageError,
)
from examples.fastapi_app import ErrorReply, error_reply
from recovery import RecoveryError

GID = "pk2pc2:orders:host-1:0:3:17:00aa11bb22cc:0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (AlreadyCommitted("k done", idempotency_key="k", previous_gid=GID), 200, "replayed",
         None),
        (IdempotencyKeyBusy("k busy", idempotency_key="k"), 409, "in_progress", 1),
        # Rolled back by the database as a conflict: the block's SQL or the one-phase COMMIT.
        (RolledBack("statement failed", phase=Phase.EXECUTE), 409, "conflict", None),
        (RolledBack("COMMIT failed", phase=Phase.PG_COMMIT), 409, "conflict", None),
        # Rolled back for want of a service: retry later.
        (RolledBack("PREPARE failed", gid=GID, phase=Phase.PREPARE), 503, "rolled_back", 2),
        (RolledBack("topic missing", phase=Phase.PRODUCE), 503, "rolled_back", 2),
        (RolledBack("Kafka aborted", gid=GID, phase=Phase.KAFKA_COMMIT, complete=False), 503,
         "rolled_back", 2),
        (RolledBack("no phase"), 503, "rolled_back", 2),
        # A subclass's own row wins over its parent's, phase rows included.
        (PrepareForbidden("temp table", gid=GID, phase=Phase.PREPARE), 500, "internal", None),
        (OutcomeUnknown("unknown", gid=GID, phase=Phase.KAFKA_COMMIT), 202, "being_resolved", 5),
        (OutcomeUnknown("one phase", phase=Phase.PG_COMMIT), 202, "being_resolved", 5),
        (CommittedPendingRecovery("pending", gid=GID, phase=Phase.PG_COMMIT), 202,
         "being_resolved", 5),
        (ServiceUnavailable("PostgreSQL down", phase=Phase.BEGIN), 503, "unavailable", 2),
        (UsageError("outside the block"), 500, "internal", None),
        (ConfigurationError("bad", phase=Phase.STARTUP), 500, "internal", None),
        (PreparedTransactionsDisabled("off"), 500, "internal", None),
        (DecisionTopicMisconfigured("compacted"), 500, "internal", None),
        (Diverged("diverged", gid=GID, kafka_committed=True), 500, "internal", None),
        (PoisonMessage("poison", topic="t", partition=0, offset=1), 500, "internal", None),
        (RecoveryError("no registry"), 500, "internal", None),
        (Error("base"), 500, "internal", None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Error) else None,
)
def test_error_reply(error: Error, status: int, code: str, retry_after: int | None) -> None:
    reply = error_reply(error)
    assert (reply.status, reply.code, reply.retry_after) == (status, code, retry_after)


def test_reply_never_carries_the_errors_text() -> None:
    """The gid and the driver's message go to the log, not to the client."""
    for error in (RolledBack(f"PREPARE failed at host db-7 for {GID}", gid=GID,
                             phase=Phase.PREPARE),
                  Diverged("diverged", gid=GID),
                  OutcomeUnknown(f"unknown {GID}", gid=GID)):
        body = error_reply(error).response().body
        assert GID.encode() not in bytes(body)
        assert b"db-7" not in bytes(body)


def test_response_headers_and_body() -> None:
    reply = error_reply(ServiceUnavailable("Kafka down"))
    response = reply.response({"Location": "/orders/1"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.headers["location"] == "/orders/1"
    assert json.loads(bytes(response.body)) == {"code": "unavailable", "detail": reply.detail}

    no_wait = ErrorReply(404, "not_found", "no order 1").response()
    assert "retry-after" not in no_wait.headers
