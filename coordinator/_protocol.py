"""The two-phase protocol as an explicit state machine, free of I/O.

The coordinator drives a :class:`Protocol` with :class:`Event` values as the
I/O adapters report them; the machine says which status follows and refuses
any transition the protocol does not allow. It imports neither psycopg nor
confluent_kafka, so it is tested without services.

::

    ACTIVE --block raised / prepare failed / kafka produce failed--> ROLLED_BACK
    ACTIVE --PREPARE TRANSACTION ok--> PREPARED
    ACTIVE --no Kafka message: plain COMMIT ok--> COMMITTED       (one-phase)
    PREPARED --produce failed, Kafka aborted, ROLLBACK PREPARED--> ROLLED_BACK
    PREPARED --commit_transaction() called--> COMMITTING
    COMMITTING --Kafka committed (commit point)--> DECIDED
    COMMITTING --Kafka aborted--> ROLLED_BACK
    COMMITTING --fatal / fenced / retries exhausted--> IN_DOUBT
    DECIDED --COMMIT PREPARED ok--> COMMITTED
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ._enums import Status

__all__ = [
    "CommitAction",
    "Event",
    "IllegalTransition",
    "KafkaErrorKind",
    "Protocol",
    "commit_action",
]


class Event(StrEnum):
    BLOCK_FAILED = "block_failed"
    PREPARED = "prepared"
    PREPARE_FAILED = "prepare_failed"
    ONE_PHASE_COMMITTED = "one_phase_committed"
    FAILED_BEFORE_COMMIT = "failed_before_commit"
    KAFKA_COMMIT_STARTED = "kafka_commit_started"
    KAFKA_COMMITTED = "kafka_committed"
    KAFKA_ABORTED = "kafka_aborted"
    KAFKA_OUTCOME_UNKNOWN = "kafka_outcome_unknown"
    PG_COMMITTED = "pg_committed"


_TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (Status.ACTIVE, Event.BLOCK_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARE_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARED): Status.PREPARED,
    (Status.ACTIVE, Event.ONE_PHASE_COMMITTED): Status.COMMITTED,
    (Status.PREPARED, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.PREPARED, Event.KAFKA_COMMIT_STARTED): Status.COMMITTING,
    (Status.COMMITTING, Event.KAFKA_COMMITTED): Status.DECIDED,
    (Status.COMMITTING, Event.KAFKA_ABORTED): Status.ROLLED_BACK,
    (Status.COMMITTING, Event.KAFKA_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.DECIDED, Event.PG_COMMITTED): Status.COMMITTED,
}


class IllegalTransition(RuntimeError):
    """A bug: the coordinator fired an event its current status does not allow."""


@dataclass
class Protocol:
    """The status of one transaction and the events that moved it."""

    status: Status = Status.ACTIVE
    history: list[Event] = field(default_factory=list)

    def fire(self, event: Event) -> Status:
        try:
            nxt = _TRANSITIONS[(self.status, event)]
        except KeyError:
            raise IllegalTransition(
                f"{event.value} is not allowed in status {self.status.value}"
            ) from None
        self.history.append(event)
        self.status = nxt
        return nxt

    def allows(self, event: Event) -> bool:
        return (self.status, event) in _TRANSITIONS

    @property
    def past_commit_point(self) -> bool:
        """True once Kafka committed: from then on the only outcome is commit."""
        return self.status in (Status.DECIDED, Status.COMMITTED) and (
            Event.KAFKA_COMMITTED in self.history
        )


class KafkaErrorKind(StrEnum):
    """How the transactional producer API classifies an error (librdkafka)."""

    RETRIABLE = "retriable"
    """Retry the same call (``err.retriable()``)."""
    ABORTABLE = "abortable"
    """The transaction must be aborted (``err.txn_requires_abort()``)."""
    FENCED = "fenced"
    """Another producer with the same transactional.id took over."""
    FATAL = "fatal"
    """The producer is unusable (``err.fatal()``): close it, make a new one."""
    OTHER = "other"
    """Anything else (treated like fatal for a transaction in flight)."""


class CommitAction(StrEnum):
    RETRY = "retry"
    """Call ``commit_transaction()`` again."""
    ABORT = "abort"
    """Abort the Kafka transaction, then ``ROLLBACK PREPARED``."""
    LEAVE_IN_DOUBT = "leave_in_doubt"
    """The outcome cannot be known here: leave PostgreSQL prepared for recovery."""


def commit_action(kind: KafkaErrorKind, retries_left: bool, attempts: int = 1) -> CommitAction:
    """What to do when the ``attempts``-th call of ``commit_transaction()`` raised
    an error of ``kind``.

    A retriable error (a time-out included) leaves the commit possibly in
    flight: it is retried, and once the retries are spent the outcome is
    unknown -- never guessed. An abortable error is a definite abort only on
    the first attempt: after a retry, an earlier attempt's EndTxn may have
    reached the broker and committed (librdkafka documents that the commit
    may have succeeded in that state), so the outcome is unknown.
    """
    if kind is KafkaErrorKind.ABORTABLE:
        return CommitAction.ABORT if attempts <= 1 else CommitAction.LEAVE_IN_DOUBT
    if kind is KafkaErrorKind.RETRIABLE and retries_left:
        return CommitAction.RETRY
    return CommitAction.LEAVE_IN_DOUBT
