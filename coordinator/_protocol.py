"""The two-phase protocol as an explicit state machine, free of I/O.

The transaction tells the :class:`Protocol` what happened (an :class:`Event`,
or the :class:`KafkaOutcome` of its Kafka transaction); the machine answers
with the status that follows and, after the Kafka transaction, with what to do
next and which error to raise -- one table, :data:`AFTER_KAFKA`. Any event the
protocol does not allow in the current status raises :class:`IllegalTransition`
(a bug). It imports neither psycopg nor confluent_kafka, so it is tested
without services.

::

    NOT_STARTED --BEGIN ok--> ACTIVE          NOT_STARTED --BEGIN failed--> ROLLED_BACK
    ACTIVE --block raised / PREPARE failed / failed before the Kafka work--> ROLLED_BACK
    ACTIVE --no Kafka message: plain COMMIT ok--> COMMITTED          (one-phase)
    ACTIVE --one-phase COMMIT lost its connection--> IN_DOUBT     (nothing to recover)
    ACTIVE --PREPARE TRANSACTION ok--> PREPARED
    PREPARED --the Kafka transaction starts--> COMMITTING
    COMMITTING --failed before commit_transaction()--> ROLLED_BACK
    COMMITTING --Kafka committed (the commit point)--> DECIDED
    COMMITTING --outcome unknown--> IN_DOUBT  (recovery decides)
    DECIDED --COMMIT PREPARED ok (or the gid committed by another session)--> COMMITTED
    DECIDED / ROLLED_BACK --PostgreSQL ended the other way--> DIVERGED   (must not happen)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ._enums import Phase, Status
from .errors import Error, OutcomeUnknown, RolledBack

__all__ = [
    "AFTER_KAFKA",
    "AfterKafka",
    "CommitAction",
    "Event",
    "IllegalTransition",
    "KafkaErrorKind",
    "KafkaOutcome",
    "Protocol",
    "Then",
    "commit_action",
]


class Event(StrEnum):
    BEGUN = "begun"
    BEGIN_FAILED = "begin_failed"
    BLOCK_FAILED = "block_failed"
    PREPARED = "prepared"
    PREPARE_FAILED = "prepare_failed"
    ONE_PHASE_COMMITTED = "one_phase_committed"
    ONE_PHASE_OUTCOME_UNKNOWN = "one_phase_outcome_unknown"
    KAFKA_STARTED = "kafka_started"
    FAILED_BEFORE_COMMIT = "failed_before_commit"
    KAFKA_COMMITTED = "kafka_committed"
    KAFKA_OUTCOME_UNKNOWN = "kafka_outcome_unknown"
    PG_COMMITTED = "pg_committed"
    DIVERGED = "diverged"


_TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (Status.NOT_STARTED, Event.BEGUN): Status.ACTIVE,
    (Status.NOT_STARTED, Event.BEGIN_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.BLOCK_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARE_FAILED): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.ACTIVE, Event.PREPARED): Status.PREPARED,
    (Status.ACTIVE, Event.ONE_PHASE_COMMITTED): Status.COMMITTED,
    (Status.ACTIVE, Event.ONE_PHASE_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.PREPARED, Event.KAFKA_STARTED): Status.COMMITTING,
    (Status.COMMITTING, Event.FAILED_BEFORE_COMMIT): Status.ROLLED_BACK,
    (Status.COMMITTING, Event.KAFKA_COMMITTED): Status.DECIDED,
    (Status.COMMITTING, Event.KAFKA_OUTCOME_UNKNOWN): Status.IN_DOUBT,
    (Status.DECIDED, Event.PG_COMMITTED): Status.COMMITTED,
    (Status.DECIDED, Event.DIVERGED): Status.DIVERGED,
    (Status.ROLLED_BACK, Event.DIVERGED): Status.DIVERGED,
}


class IllegalTransition(RuntimeError):
    """A bug: the coordinator fired an event its current status does not allow."""


class KafkaOutcome(StrEnum):
    """How a Kafka transaction ended, as the Kafka adapter reports it."""

    COMMITTED = "committed"
    """The commit point has passed."""
    FAILED_BEFORE_COMMIT = "failed_before_commit"
    """``commit_transaction()`` was never called: the transaction cannot commit."""
    UNKNOWN = "unknown"
    """The commit may or may not have happened."""


class Then(StrEnum):
    """What the coordinator does with PostgreSQL after the Kafka transaction."""

    COMMIT_PREPARED = "commit_prepared"
    ROLLBACK_PREPARED = "rollback_prepared"
    LEAVE_PREPARED = "leave_prepared"
    """For recovery to decide from the decision log."""


@dataclass(frozen=True, slots=True)
class AfterKafka:
    event: Event
    then: Then
    error: type[Error] | None
    """Raised to the caller once ``then`` is done (``None``: success)."""
    phase: Phase


AFTER_KAFKA: dict[KafkaOutcome, AfterKafka] = {
    KafkaOutcome.COMMITTED: AfterKafka(
        Event.KAFKA_COMMITTED, Then.COMMIT_PREPARED, None, Phase.PG_COMMIT),
    KafkaOutcome.FAILED_BEFORE_COMMIT: AfterKafka(
        Event.FAILED_BEFORE_COMMIT, Then.ROLLBACK_PREPARED, RolledBack, Phase.PRODUCE),
    KafkaOutcome.UNKNOWN: AfterKafka(
        Event.KAFKA_OUTCOME_UNKNOWN, Then.LEAVE_PREPARED, OutcomeUnknown, Phase.KAFKA_COMMIT),
}
"""What follows each outcome of the Kafka transaction."""


@dataclass
class Protocol:
    """The status of one transaction."""

    status: Status = Status.NOT_STARTED

    def fire(self, event: Event) -> Status:
        try:
            nxt = _TRANSITIONS[(self.status, event)]
        except KeyError:
            raise IllegalTransition(
                f"{event.value} is not allowed in status {self.status.value}"
            ) from None
        self.status = nxt
        return nxt

    def after_kafka(self, outcome: KafkaOutcome) -> AfterKafka:
        """Record the Kafka transaction's outcome; what to do next."""
        step = AFTER_KAFKA[outcome]
        self.fire(step.event)
        return step


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
    LEAVE_IN_DOUBT = "leave_in_doubt"
    """The outcome cannot be known here: leave PostgreSQL prepared for recovery."""


def commit_action(kind: KafkaErrorKind, retries_left: bool) -> CommitAction:
    """What to do when ``commit_transaction()`` raised an error of ``kind``
    (``retries_left``: the retry policy allows another call).

    A retriable error (a time-out included) leaves the commit possibly in
    flight: it is retried, and once the retries are spent the outcome is
    unknown -- never guessed. Every other error is an unknown outcome too,
    *abortable ones included*: every message was delivered before
    ``commit_transaction()`` was called, so the error concerns the EndTxn
    itself, which librdkafka may have sent more than once within one call; an
    earlier send may have committed on the broker (librdkafka's own comment on
    that state: "the EndTxn(commit) may have succeeded"). Nor would a
    successful ``abort_transaction()`` prove otherwise (it may only bump the
    epoch). Recovery decides from the decision log.
    """
    if kind is KafkaErrorKind.RETRIABLE and retries_left:
        return CommitAction.RETRY
    return CommitAction.LEAVE_IN_DOUBT
