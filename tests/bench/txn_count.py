"""Kafka transactions of a coordinator and the decision records in each, counted
through the library's ``CoordinatorConfig(producer_factory=...)`` seam.

Every coordinated transaction writes one decision record, in the same Kafka
transaction as its messages; with group commit one Kafka transaction carries the
decision records of every member of the group. So decision records per committed
Kafka transaction is the mean group size (1.0 without group commit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

__all__ = ["CountingProducer", "TxnStats", "counting_factory"]


class TxnStats:
    """Totals over every producer of one coordinator (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transactions = 0
        self._decisions = 0

    def add(self, decisions: int) -> None:
        with self._lock:
            self._transactions += 1
            self._decisions += decisions

    def snapshot(self) -> tuple[int, int]:
        """(Kafka transactions committed, decision records in them) so far."""
        with self._lock:
            return self._transactions, self._decisions


class CountingProducer(Producer):
    """A transactional producer that counts its produce() calls to the decision
    topic between begin_transaction() and a successful commit_transaction()."""

    def __init__(self, conf: dict[str, Any], stats: TxnStats, decision_topic: str) -> None:
        super().__init__(conf)
        self._stats = stats
        self._decision_topic = decision_topic
        self._decisions = 0  # in the open transaction

    def begin_transaction(self) -> None:
        super().begin_transaction()
        self._decisions = 0

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        super().produce(topic, *args, **kwargs)
        if topic == self._decision_topic:
            self._decisions += 1

    def commit_transaction(self, timeout: float = -1) -> None:
        super().commit_transaction(timeout)  # raises when not committed (then retried)
        self._stats.add(self._decisions)
        self._decisions = 0

    def abort_transaction(self, timeout: float = -1) -> None:
        self._decisions = 0
        super().abort_transaction(timeout)


def counting_factory(stats: TxnStats, decision_topic: str) -> Callable[[dict[str, Any]],
                                                                       Producer]:
    """A ``producer_factory`` whose producers add to ``stats``."""

    def make(conf: dict[str, Any]) -> Producer:
        return CountingProducer(conf, stats, decision_topic)

    return make
