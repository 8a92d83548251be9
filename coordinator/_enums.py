"""Status and phase enums of a coordinated transaction."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Phase", "Status", "Step"]


class Status(StrEnum):
    """Where a transaction stands in the two-phase protocol.

    The happy path is ``NOT_STARTED -> ACTIVE -> PREPARED -> COMMITTING ->
    DECIDED -> COMMITTED``. ``DECIDED`` means the commit point (the Kafka
    commit) has passed: the transaction *is* committed, only PostgreSQL's
    ``COMMIT PREPARED`` is pending.
    """

    NOT_STARTED = "not_started"
    """The ``with`` block has not begun."""
    ACTIVE = "active"
    """The ``with`` block is running; nothing is prepared yet."""
    PREPARED = "prepared"
    """PostgreSQL has prepared the transaction; Kafka not committed yet."""
    COMMITTING = "committing"
    """The Kafka transaction (produce, then the commit point) is in flight."""
    DECIDED = "decided"
    """Kafka committed: the decision is commit; ``COMMIT PREPARED`` pending."""
    COMMITTED = "committed"
    """Both sides committed."""
    ROLLED_BACK = "rolled_back"
    """Neither side is, or will become, visible."""
    IN_DOUBT = "in_doubt"
    """The outcome is unknown. With Kafka messages: the Kafka commit's outcome is
    unknown and recovery will decide from the decision log. Without (the
    one-phase ``COMMIT`` lost its connection): PostgreSQL committed or not, and
    nothing was published either way; look at the data (or retry with the same
    idempotency key)."""
    DIVERGED = "diverged"
    """One side committed and the other rolled back: the protocol is built so that
    this cannot happen (reported with :class:`~coordinator.Diverged`)."""

    @property
    def is_final(self) -> bool:
        return self in (Status.COMMITTED, Status.ROLLED_BACK, Status.DIVERGED)


class Phase(StrEnum):
    """The protocol step an error happened in."""

    STARTUP = "startup"
    BEGIN = "begin"
    EXECUTE = "execute"
    PREPARE = "prepare"
    PRODUCE = "produce"
    KAFKA_COMMIT = "kafka_commit"
    PG_COMMIT = "pg_commit"


class Step(StrEnum):
    """Points of the protocol a :attr:`~coordinator.CoordinatorConfig.on_step`
    hook is called at (in the thread running the transaction).

    A hook may block (tests use it to freeze a transaction at an exact step) or
    raise (the transaction then ends as if the process had stopped there: its
    fate is left to the protocol's error handling and to recovery).
    """

    BEFORE_PREPARE = "before_prepare"
    """The producer session is taken, the gid chosen; PREPARE not sent."""
    AFTER_PREPARE = "after_prepare"
    """PostgreSQL prepared; no Kafka work of this transaction has started."""
    AFTER_KAFKA_COMMIT = "after_kafka_commit"
    """The commit point passed; ``COMMIT PREPARED`` not sent."""
