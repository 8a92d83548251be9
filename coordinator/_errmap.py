"""Driver errors (confluent-kafka, psycopg) converted to our terms, in one place."""

from __future__ import annotations

import psycopg
import psycopg.errors
from confluent_kafka import KafkaError, KafkaException

from ._enums import Phase
from ._protocol import KafkaErrorKind
from .errors import (
    ConfigurationError,
    Error,
    PrepareForbidden,
    RolledBack,
    ServiceUnavailable,
)

__all__ = [
    "is_busy_gid",
    "is_connection_error",
    "is_transient",
    "is_unknown_gid",
    "kafka_error_kind",
    "kafka_error_of",
    "pg_prepare_error",
    "pg_startup_error",
]

_FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)
_AUTH_CODES = frozenset(
    {
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
    }
)


_TRANSIENT_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.CONCURRENT_TRANSACTIONS,
    }
)


def is_transient(err: KafkaError) -> bool:
    """Worth trying the same call again: the client says so, or the error is one of a
    broker moving, restarting or not reachable for a moment (admin requests do not
    always carry librdkafka's retriable flag). Never for a fatal error."""
    return not err.fatal() and (err.retriable() or err.code() in _TRANSIENT_CODES)


def kafka_error_of(exc: BaseException) -> KafkaError | None:
    """The KafkaError inside a KafkaException (or None for other exceptions)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def kafka_error_kind(err: KafkaError) -> KafkaErrorKind:
    """Classify a transactional-API error the way librdkafka documents it.

    Order matters: a fenced producer is also reported fatal, and an abortable
    error is never fatal.
    """
    if err.code() in _FENCED_CODES:
        return KafkaErrorKind.FENCED
    if err.fatal():
        return KafkaErrorKind.FATAL
    if err.txn_requires_abort():
        return KafkaErrorKind.ABORTABLE
    if err.retriable():
        return KafkaErrorKind.RETRIABLE
    return KafkaErrorKind.OTHER


def is_kafka_auth_error(err: KafkaError) -> bool:
    return err.code() in _AUTH_CODES


def kafka_startup_error(exc: BaseException, what: str) -> Error:
    err = kafka_error_of(exc)
    if err is not None and is_kafka_auth_error(err):
        return ConfigurationError(
            f"Kafka refused {what}: {err.str()} (check the ACLs for the transactional.id "
            "prefix 'pk2pc.' and the topics)",
            phase=Phase.STARTUP,
        )
    detail = err.str() if err is not None else str(exc)
    return ServiceUnavailable(f"Kafka: {what} failed: {detail}", phase=Phase.STARTUP)


def is_connection_error(exc: BaseException) -> bool:
    """The PostgreSQL connection is gone (as opposed to a statement that failed).

    psycopg files SQLSTATE class 40 (serialization failure, deadlock) under
    ``OperationalError`` too, but those are definite rollbacks by a server that
    answered, not a lost connection.
    """
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return False
    return not (exc.sqlstate or "").startswith("40")


def is_unknown_gid(exc: BaseException) -> bool:
    """``COMMIT/ROLLBACK PREPARED`` of a gid that does not exist (any more)."""
    return isinstance(exc, psycopg.errors.UndefinedObject)


def is_busy_gid(exc: BaseException) -> bool:
    """The prepared transaction is being committed or rolled back by another session."""
    return isinstance(exc, psycopg.errors.ObjectInUse)


def pg_prepare_error(exc: BaseException, gid: str) -> RolledBack:
    """The error to raise when ``PREPARE TRANSACTION`` failed (PostgreSQL rolled back)."""
    if isinstance(exc, psycopg.errors.FeatureNotSupported) and "PREPARE" in str(exc):
        return PrepareForbidden(
            f"PostgreSQL cannot PREPARE this transaction ({_first_line(exc)}); "
            "rolled back, nothing published. Temporary tables, LISTEN/UNLISTEN/NOTIFY "
            "and session-level advisory locks cannot be used in a coordinated transaction",
            gid=gid,
            phase=Phase.PREPARE,
        )
    return RolledBack(
        f"PREPARE TRANSACTION failed, rolled back, nothing published: {_first_line(exc)}",
        gid=gid,
        phase=Phase.PREPARE,
    )


def pg_startup_error(exc: BaseException) -> Error:
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return ConfigurationError(
            f"PostgreSQL: missing privilege: {_first_line(exc)}", phase=Phase.STARTUP
        )
    if isinstance(exc, psycopg.OperationalError):
        return ServiceUnavailable(
            f"PostgreSQL unreachable or credentials rejected: {_first_line(exc)}",
            phase=Phase.STARTUP,
        )
    return ConfigurationError(f"PostgreSQL start-up check failed: {_first_line(exc)}",
                              phase=Phase.STARTUP)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line for a log: the class and first line of an exception, no secrets."""
    err = kafka_error_of(exc)
    if err is not None:
        return f"{err.name()}: {err.str()}"
    return f"{type(exc).__name__}: {_first_line(exc)}"
