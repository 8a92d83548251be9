"""Commit a PostgreSQL transaction and a Kafka transaction together.

::

    from coordinator import Coordinator, Status

    with Coordinator(postgres=DSN, kafka={"bootstrap.servers": BROKERS}, name="orders") as coord:
        with coord.transaction(idempotency_key="order-42") as tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (42, 10))
            tx.produce("orders.events", value=b'{"id": 42}', key=b"42")
        assert tx.status is Status.COMMITTED
"""

from ._acoordinator import AsyncCoordinator, AsyncTransaction
from ._consume import ConsumerStats
from ._coordinator import Coordinator, Transaction
from ._enums import Phase, Status, Step
from .config import CoordinatorConfig, GroupCommit, RetryPolicy
from .decision_log import DecisionRecord, DecisionTopic
from .errors import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    ConfigurationError,
    DecisionTopicMisconfigured,
    Diverged,
    Error,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    PoisonMessage,
    PreparedTransactionsDisabled,
    PrepareForbidden,
    RolledBack,
    ServiceUnavailable,
    UsageError,
)
from .gid import Gid, InvalidGid

__all__ = [
    "AlreadyCommitted",
    "AsyncCoordinator",
    "AsyncTransaction",
    "CommittedPendingRecovery",
    "ConfigurationError",
    "ConsumerStats",
    "Coordinator",
    "CoordinatorConfig",
    "DecisionRecord",
    "DecisionTopic",
    "DecisionTopicMisconfigured",
    "Diverged",
    "Error",
    "Gid",
    "GroupCommit",
    "IdempotencyKeyBusy",
    "InvalidGid",
    "OutcomeUnknown",
    "Phase",
    "PoisonMessage",
    "PrepareForbidden",
    "PreparedTransactionsDisabled",
    "RetryPolicy",
    "RolledBack",
    "ServiceUnavailable",
    "Status",
    "Step",
    "Transaction",
    "UsageError",
]
