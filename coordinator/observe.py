"""Hooks for metrics, traces and logs: what a coordinator tells its observers.

An :class:`Observer` is given to the coordinator in
``CoordinatorConfig(observers=(...))``. For each coordinated transaction the
coordinator asks every observer for a :class:`TransactionObserver` and reports
the transaction's life to it: how long each phase took, its gid once prepared,
the size of the Kafka group it committed in, and how it ended.

Observers run on the transaction's own thread (or event loop) and must be
fast and must not raise: an exception from an observer is logged and
ignored, never allowed to change a transaction's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._enums import Phase, Status

__all__ = [
    "Observer",
    "TransactionInfo",
    "TransactionObserver",
]

log = logging.getLogger("coordinator")

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """Who a transaction belongs to, given to :meth:`Observer.transaction`."""

    name: str
    instance: str
    txid: str
    idempotency_key: str | None = None
    consumed_headers: Sequence[Headers] = ()
    """Headers of the consumed messages the transaction commits the offsets of
    (the consume path), e.g. to continue their trace."""


class TransactionObserver(Protocol):
    """Told about one coordinated transaction, from begin to end."""

    def headers(self) -> Headers:
        """Headers to add to every message the transaction produces (e.g. W3C
        ``traceparent``). Asked once, when the first message is staged."""
        ...

    def phase(self, phase: Phase, seconds: float) -> None:
        """A phase completed (successfully or not) after ``seconds``: one of
        ``BEGIN``, ``PREPARE``, ``KAFKA_COMMIT``, ``PG_COMMIT``."""
        ...

    def prepared(self, gid: str) -> None:
        """PostgreSQL prepared the transaction under ``gid``."""
        ...

    def group(self, members: int) -> None:
        """The Kafka transaction that carried this one had ``members`` members."""
        ...

    def end(self, status: Status, phase: Phase | None, error: BaseException | None,
            seconds: float) -> None:
        """The transaction ended with ``status``; ``phase`` and ``error`` say where
        and why when it did not commit; ``seconds`` is its whole duration."""
        ...


class Observer(Protocol):
    """Makes a :class:`TransactionObserver` per transaction; told about events of
    the coordinator itself."""

    def transaction(self, info: TransactionInfo) -> TransactionObserver: ...

    def producer_started(self, name: str, instance: str, slot: int, generation: int) -> None:
        """A producer session started (generation 1) or was re-created (> 1)."""
        ...

    def idempotency_hit(self, name: str, instance: str) -> None:
        """A transaction found its idempotency key already committed."""
        ...
