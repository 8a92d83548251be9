"""Error mapping on real confluent-kafka / psycopg error objects, the error tree,
and the decision record format."""

from __future__ import annotations

import json

import psycopg
import psycopg.errors
import pytest
from confluent_kafka import KafkaError, KafkaException

import coordinator
from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    ConfigurationError,
    DecisionRecord,
    DecisionTopicMisconfigured,
    Error,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    Phase,
    PreparedTransactionsDisabled,
    PrepareForbidden,
    RolledBack,
    ServiceUnavailable,
    UsageError,
)
from coordinator._errmap import (
    describe,
    is_connection_error,
    is_unknown_gid,
    kafka_error_kind,
    kafka_error_of,
    kafka_startup_error,
    pg_prepare_error,
    pg_startup_error,
)
from coordinator._protocol import KafkaErrorKind
from coordinator.decision_log import DecisionTopic, partition_for

GID = "pk2pc2:orders:host-1:0:3:17:00aa11bb22cc:0123456789abcdef0123456789abcdef"

# -- kafka_error_kind on real KafkaError objects ---------------------------------


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (KafkaError(KafkaError._FENCED, "fenced", fatal=True), KafkaErrorKind.FENCED),
        (KafkaError(KafkaError._FENCED, "fenced"), KafkaErrorKind.FENCED),
        (KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True), KafkaErrorKind.FENCED),
        (KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "old epoch", fatal=True),
         KafkaErrorKind.FENCED),
        # Fenced wins even over the other flags.
        (KafkaError(KafkaError.PRODUCER_FENCED, "x", fatal=True, retriable=True,
                    txn_requires_abort=True), KafkaErrorKind.FENCED),
        (KafkaError(KafkaError._INVALID_ARG, "bad state", fatal=True), KafkaErrorKind.FATAL),
        (KafkaError(KafkaError.INVALID_TXN_STATE, "librdkafka 4849", fatal=True),
         KafkaErrorKind.FATAL),
        (KafkaError(KafkaError._FATAL, "fatal", fatal=True), KafkaErrorKind.FATAL),
        # Fatal beats abortable / retriable.
        (KafkaError(KafkaError._STATE, "x", fatal=True, retriable=True),
         KafkaErrorKind.FATAL),
        (KafkaError(KafkaError._STATE, "x", fatal=True, txn_requires_abort=True),
         KafkaErrorKind.FATAL),
        (KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True),
         KafkaErrorKind.ABORTABLE),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large", txn_requires_abort=True),
         KafkaErrorKind.ABORTABLE),
        # Abortable beats retriable: retrying an abortable commit cannot succeed.
        (KafkaError(KafkaError._TIMED_OUT, "x", retriable=True, txn_requires_abort=True),
         KafkaErrorKind.ABORTABLE),
        (KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True),
         KafkaErrorKind.RETRIABLE),
        (KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "loading", retriable=True),
         KafkaErrorKind.RETRIABLE),
        (KafkaError(KafkaError._TIMED_OUT, "timed out, not flagged"), KafkaErrorKind.OTHER),
        (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "unknown"), KafkaErrorKind.OTHER),
        (KafkaError(KafkaError._TRANSPORT), KafkaErrorKind.OTHER),
    ],
    ids=lambda v: repr(v) if not isinstance(v, KafkaError) else v.name(),
)
def test_kafka_error_kind(err: KafkaError, kind: KafkaErrorKind) -> None:
    assert kafka_error_kind(err) is kind


def test_kafka_error_of() -> None:
    err = KafkaError(KafkaError._TIMED_OUT, "t", retriable=True)
    assert kafka_error_of(KafkaException(err)) is err
    assert kafka_error_of(KafkaException("not an error object")) is None
    assert kafka_error_of(RuntimeError("x")) is None
    assert kafka_error_of(KafkaException()) is None


def test_describe_kafka_and_other() -> None:
    err = KafkaError(KafkaError._FENCED, "producer fenced by a newer instance", fatal=True)
    assert describe(KafkaException(err)) == "_FENCED: producer fenced by a newer instance"
    assert describe(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert describe(ValueError()) == "ValueError: ValueError"


def test_kafka_startup_error() -> None:
    auth = KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "denied")
    e = kafka_startup_error(KafkaException(auth), "init_transactions(pk2pc.o.i.0)")
    assert type(e) is ConfigurationError
    assert e.phase is Phase.STARTUP
    assert "denied" in str(e)
    down = KafkaError(KafkaError._TRANSPORT, "connection refused")
    e = kafka_startup_error(KafkaException(down), "reaching the brokers")
    assert type(e) is ServiceUnavailable
    assert "connection refused" in str(e)
    assert e.phase is Phase.STARTUP


# -- psycopg errors ------------------------------------------------------------------


def test_is_connection_error() -> None:
    assert is_connection_error(psycopg.OperationalError("server closed the connection"))
    assert is_connection_error(psycopg.errors.AdminShutdown("terminating connection"))
    assert not is_connection_error(psycopg.errors.LockNotAvailable("lock timeout"))
    assert not is_connection_error(psycopg.errors.QueryCanceled("canceled"))
    assert not is_connection_error(psycopg.errors.UniqueViolation("dup"))
    assert not is_connection_error(RuntimeError("x"))


def test_serialization_failures_and_deadlocks_are_not_a_lost_connection() -> None:
    # SQLSTATE class 40: psycopg files them under OperationalError, but the server
    # answered: the transaction is definitely rolled back.
    for exc in (psycopg.errors.SerializationFailure("could not serialize access"),
                psycopg.errors.DeadlockDetected("deadlock detected"),
                psycopg.errors.TransactionRollback("rolled back")):
        assert isinstance(exc, psycopg.OperationalError)
        assert not is_connection_error(exc)


def test_is_unknown_gid() -> None:
    assert is_unknown_gid(psycopg.errors.UndefinedObject("prepared transaction ... not exist"))
    assert not is_unknown_gid(psycopg.errors.ObjectInUse("busy"))


def test_pg_prepare_error() -> None:
    e = pg_prepare_error(
        psycopg.errors.FeatureNotSupported(
            "cannot PREPARE a transaction that has operated on temporary objects"),
        GID,
    )
    assert type(e) is PrepareForbidden
    assert isinstance(e, RolledBack)
    assert e.gid == GID and e.phase is Phase.PREPARE
    e = pg_prepare_error(psycopg.errors.ForeignKeyViolation("violates fk\nDETAIL: x"), GID)
    assert type(e) is RolledBack
    assert "violates fk" in str(e) and "DETAIL" not in str(e)
    assert e.gid == GID and e.phase is Phase.PREPARE


def test_pg_startup_error() -> None:
    assert type(pg_startup_error(psycopg.errors.InsufficientPrivilege("no"))) is (
        ConfigurationError)
    assert type(pg_startup_error(psycopg.OperationalError("refused"))) is ServiceUnavailable
    assert type(pg_startup_error(psycopg.errors.SyntaxError("x"))) is ConfigurationError
    assert pg_startup_error(psycopg.OperationalError("x")).phase is Phase.STARTUP


# -- the error tree ------------------------------------------------------------------

ALL_ERRORS = [
    ConfigurationError, PreparedTransactionsDisabled, DecisionTopicMisconfigured,
    ServiceUnavailable, UsageError, RolledBack, PrepareForbidden, OutcomeUnknown,
    CommittedPendingRecovery,
]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_carry_gid_and_phase(cls: type[Error]) -> None:
    e = cls("something happened", gid=GID, phase=Phase.KAFKA_COMMIT)
    assert isinstance(e, Error) and isinstance(e, Exception)
    assert e.gid == GID
    assert e.phase is Phase.KAFKA_COMMIT
    assert e.message == "something happened"
    text = str(e)
    assert "something happened" in text
    assert GID in text
    assert "kafka_commit" in text


def test_error_without_context() -> None:
    e = Error("plain")
    assert e.gid is None and e.phase is None
    assert str(e) == "plain"
    assert str(Error("m", phase=Phase.STARTUP)) == "m (phase=startup)"


def test_error_hierarchy() -> None:
    assert issubclass(PreparedTransactionsDisabled, ConfigurationError)
    assert issubclass(DecisionTopicMisconfigured, ConfigurationError)
    assert issubclass(PrepareForbidden, RolledBack)
    for cls in (*ALL_ERRORS, AlreadyCommitted, IdempotencyKeyBusy):
        assert issubclass(cls, coordinator.Error)
    # What the caller must tell apart is never confused by inheritance.
    for a, b in [(RolledBack, OutcomeUnknown), (RolledBack, CommittedPendingRecovery),
                 (OutcomeUnknown, CommittedPendingRecovery), (AlreadyCommitted, RolledBack)]:
        assert not issubclass(a, b) and not issubclass(b, a)


def test_rolled_back_complete_flag() -> None:
    assert RolledBack("x").complete is True
    e = RolledBack("x", gid=GID, phase=Phase.KAFKA_COMMIT, complete=False)
    assert e.complete is False and e.gid == GID


def test_already_committed() -> None:
    e = AlreadyCommitted("dup", idempotency_key="order-42", previous_gid=GID)
    assert e.previous_gid == GID and e.gid == GID
    assert e.idempotency_key == "order-42"
    assert e.phase is Phase.BEGIN
    assert GID in str(e)


def test_idempotency_key_busy() -> None:
    e = IdempotencyKeyBusy("busy", idempotency_key="k")
    assert e.idempotency_key == "k" and e.gid is None and e.phase is Phase.BEGIN


# -- decision records ----------------------------------------------------------------


def test_decision_record_round_trip() -> None:
    rec = DecisionRecord(GID)
    assert rec.key() == GID.encode()
    assert json.loads(rec.value()) == {"gid": GID, "decision": "commit"}
    assert ("pk2pc-decision", b"1") in rec.headers()
    assert DecisionRecord.decode(rec.key(), rec.value()) == rec


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (None, None),
        (GID.encode(), None),
        (None, json.dumps({"gid": GID, "decision": "commit"}).encode()),
        (b"", b""),
        (GID.encode(), b"not json"),
        (GID.encode(), b"\xff\xfe"),
        (b"\xff\xfe", json.dumps({"gid": GID, "decision": "commit"}).encode()),
        (GID.encode(), b"[1, 2]"),
        (GID.encode(), b'"commit"'),
        (GID.encode(), json.dumps({"gid": GID}).encode()),
        (GID.encode(), json.dumps({"gid": GID, "decision": "abort"}).encode()),
        (GID.encode(), json.dumps({"gid": GID, "decision": "COMMIT"}).encode()),
        (GID.encode(), json.dumps({"gid": GID + "x", "decision": "commit"}).encode()),
        (b"other-key", json.dumps({"gid": GID, "decision": "commit"}).encode()),
        (GID.encode(), b'{"id": 42}'),
    ],
)
def test_decision_record_rejects_foreign_records(key: bytes | None, value: bytes | None) -> None:
    assert DecisionRecord.decode(key, value) is None


def test_decision_topic_validation() -> None:
    assert DecisionTopic().name == "pk2pc.decisions"
    assert DecisionTopic().retention_ms == 7 * 24 * 3600 * 1000
    with pytest.raises(ValueError):
        DecisionTopic(partitions=0)
    with pytest.raises(ValueError):
        DecisionTopic(retention_ms=3600 * 1000)


@pytest.mark.parametrize("partitions", [1, 2, 3, 6, 7, 50, 1000])
def test_partition_for_stable_and_in_range(partitions: int) -> None:
    seen = set()
    for instance in ("a", "host-1", "pod_7.zone-a", "x" * 48):
        for slot in range(64):
            p = partition_for(instance, slot, partitions)
            assert 0 <= p < partitions
            assert p == partition_for(instance, slot, partitions)
            seen.add(p)
    if partitions <= 7:
        assert seen == set(range(partitions))  # spreads over every partition


def test_partition_for_known_values() -> None:
    # Recovery in another process (or another client library) must compute the same
    # partition: the function is crc32("<instance>/<slot>") mod partitions.
    import zlib

    for instance, slot, n in [("host-1", 0, 6), ("pod-7", 3, 12), ("a", 999, 5)]:
        assert partition_for(instance, slot, n) == zlib.crc32(f"{instance}/{slot}".encode()) % n
