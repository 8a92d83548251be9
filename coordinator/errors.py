"""One exception tree, rooted at :class:`Error`.

Every error carries the ``gid`` of the transaction it concerns (``None`` when it
happened before a gid existed, e.g. at start-up) and the :class:`Phase` it
failed in. The class says what the caller needs to know most: whether the
transaction is rolled back, committed, or undecided until recovery runs.

::

    Error
    +-- ConfigurationError          start-up checks failed; nothing was done
    |   +-- PreparedTransactionsDisabled
    |   +-- DecisionTopicMisconfigured
    +-- ServiceUnavailable          PostgreSQL or Kafka cannot be reached
    +-- UsageError                  the API was used in a way it cannot honour
    +-- RolledBack                  before the commit point: nothing is visible
    |   +-- PrepareForbidden        the block did work PostgreSQL cannot PREPARE
    +-- AlreadyCommitted            the idempotency key was used by a committed transaction
    +-- IdempotencyKeyBusy          another transaction holds the key (running or in doubt)
    +-- OutcomeUnknown              Kafka commit outcome unknown; PostgreSQL left prepared
    +-- CommittedPendingRecovery    committed; PostgreSQL's COMMIT PREPARED left to recovery
    +-- Diverged                    one side committed and the other rolled back (a bug)
    +-- PoisonMessage               the consume loop's handler keeps failing on a message
"""

from __future__ import annotations

from typing import Any

from ._enums import Phase

__all__ = [
    "AlreadyCommitted",
    "CommittedPendingRecovery",
    "ConfigurationError",
    "DecisionTopicMisconfigured",
    "Diverged",
    "Error",
    "IdempotencyKeyBusy",
    "OutcomeUnknown",
    "PoisonMessage",
    "PrepareForbidden",
    "PreparedTransactionsDisabled",
    "RolledBack",
    "ServiceUnavailable",
    "UsageError",
]


class Error(Exception):
    """Base of every error this library raises."""

    def __init__(self, message: str, *, gid: str | None = None, phase: Phase | None = None):
        super().__init__(message)
        self.message = message
        self.gid = gid
        self.phase = phase

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments break Exception's default pickling;
        # rebuild from the class, the message and the attributes instead (so errors
        # cross multiprocessing, process pools and task queues).
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))

    def __str__(self) -> str:
        context = []
        if self.phase is not None:
            context.append(f"phase={self.phase.value}")
        if self.gid is not None:
            context.append(f"gid={self.gid}")
        return f"{self.message} ({', '.join(context)})" if context else self.message


class ConfigurationError(Error, ValueError):
    """A configuration value or a start-up check failed (settings, privileges,
    topic configuration). Also a :class:`ValueError`."""


class PreparedTransactionsDisabled(ConfigurationError):
    """PostgreSQL's ``max_prepared_transactions`` is 0."""


class DecisionTopicMisconfigured(ConfigurationError):
    """The decision topic exists with a configuration that can lose decisions."""


class ServiceUnavailable(Error):
    """PostgreSQL or Kafka could not be reached (or rejected the credentials)."""


class UsageError(Error):
    """The API was used in a way that cannot keep the guarantee."""


class RolledBack(Error):
    """The transaction failed before the commit point: both sides are rolled back.

    ``complete`` is ``False`` when the decision (abort) is final but PostgreSQL's
    ``ROLLBACK PREPARED`` could not be run; recovery will finish it.
    """

    def __init__(
        self,
        message: str,
        *,
        gid: str | None = None,
        phase: Phase | None = None,
        complete: bool = True,
    ):
        super().__init__(message, gid=gid, phase=phase)
        self.complete = complete


class PrepareForbidden(RolledBack):
    """The block did something PostgreSQL refuses to PREPARE (temporary
    tables, ``LISTEN``/``NOTIFY``...). Nothing was published."""


class AlreadyCommitted(Error):
    """The idempotency key belongs to a transaction that already committed.

    The block's work was neither re-applied nor re-published.
    ``previous_gid`` names the transaction that committed it.
    """

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: str,
        previous_gid: str | None,
        phase: Phase | None = Phase.BEGIN,
    ):
        super().__init__(message, gid=previous_gid, phase=phase)
        self.idempotency_key = idempotency_key
        self.previous_gid = previous_gid


class IdempotencyKeyBusy(Error):
    """Another transaction holds the idempotency key and did not finish in time
    (it is running, or prepared and waiting for recovery). Retry later."""

    def __init__(self, message: str, *, idempotency_key: str, phase: Phase | None = Phase.BEGIN):
        super().__init__(message, phase=phase)
        self.idempotency_key = idempotency_key


class OutcomeUnknown(Error):
    """The Kafka commit may or may not have happened.

    The PostgreSQL transaction is left prepared; the recovery worker reads the
    decision log and commits or rolls it back. Never retry the operation
    without an idempotency key after this error.
    """


class CommittedPendingRecovery(Error):
    """The transaction IS committed (the commit point passed), but PostgreSQL's
    ``COMMIT PREPARED`` failed; the rows become visible when recovery runs.
    Do not retry the operation."""


class Diverged(Error):
    """PostgreSQL and Kafka disagree about this transaction: one side committed
    and the other rolled back. The protocol is built so that this cannot
    happen; it is raised (and logged at CRITICAL) rather than ever reporting
    such a transaction as committed. Reconcile it by hand and report a bug.
    ``kafka_committed`` tells which side committed."""

    def __init__(self, message: str, *, gid: str | None = None, phase: Phase | None = None,
                 kafka_committed: bool = True):
        super().__init__(message, gid=gid, phase=phase)
        self.kafka_committed = kafka_committed


class PoisonMessage(Error):
    """``run_consumer``: the handler failed ``max_attempts`` times on one message and
    there is no dead-letter topic. Nothing about it was committed; the consumer is
    left at that message."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int,
                 gid: str | None = None, phase: Phase | None = None):
        super().__init__(message, gid=gid, phase=phase)
        self.topic = topic
        self.partition = partition
        self.offset = offset


def _rebuild(cls: type[Error], args: tuple[Any, ...], state: dict[str, Any]) -> Error:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err
