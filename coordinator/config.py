"""Configuration objects with defaults that are safe in production."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .decision_log import DecisionTopic

__all__ = ["CoordinatorConfig", "GroupCommit", "RetryPolicy", "default_instance"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how fast to retry, as tenacity strategy objects.

    Replace any part: ``RetryPolicy(stop=tenacity.stop_after_attempt(3))``.
    ``sleep`` is injectable so tests need no real time.
    """

    stop: stop_base = field(default_factory=lambda: tenacity.stop_after_delay(30))
    wait: wait_base = field(
        default_factory=lambda: tenacity.wait_exponential(multiplier=0.05, max=2)
    )
    sleep: Callable[[float], None] = time.sleep

    def retrying(self, retry_if: Callable[[BaseException], bool]) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=self.stop,
            wait=self.wait,
            sleep=self.sleep,
            retry=tenacity.retry_if_exception(retry_if),
            reraise=True,
        )


@dataclass(frozen=True, slots=True)
class GroupCommit:
    """Share one Kafka transaction between transactions that reach the commit
    point together. ``max_wait`` is how long the first member of a batch waits
    for others (seconds); ``max_batch`` caps the members of one batch."""

    max_wait: float = 0.002
    max_batch: int = 64


def default_instance() -> str:
    """The default instance id: the host name, made a valid identifier.

    Stable across restarts where the host name is (a StatefulSet pod, a VM).
    Two processes on one host need distinct ids: pass ``instance=`` explicitly
    (start-up fails with a clear error when an id is already in use).
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    host = host.lstrip("._-") or "host"
    return host[:48]


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything tunable about a :class:`~coordinator.Coordinator`.

    The defaults favour correctness and short stalls for ``read_committed``
    consumers; see ``docs/configuration.md`` for each knob.
    """

    decision_topic: DecisionTopic = field(default_factory=DecisionTopic)
    producers: int = 4
    """Transactional producers in the pool, each with its own stable transactional.id."""
    transaction_timeout_ms: int = 10_000
    """Kafka ``transaction.timeout.ms``: how long a crashed coordinator's open
    Kafka transaction can hold back ``read_committed`` consumers. Recovery's
    grace period must stay well above it (default 60 s)."""
    kafka_timeout: float = 10.0
    """Seconds for one Kafka call (init, commit, abort, metadata)."""
    startup_timeout: float = 30.0
    pool_min_size: int = 1
    pool_max_size: int = 20
    """Size of the connection pool created from a conninfo string."""
    connection_timeout: float = 30.0
    """Seconds to wait for a pooled connection."""
    idempotency_table: str = "pk2pc_idempotency"
    idempotency_schema: str | None = None
    idempotency_wait_ms: int = 5_000
    """How long a transaction waits for another holder of its idempotency key."""
    instance_lock: bool = True
    """Hold a PostgreSQL advisory lock on (name, instance) while open, so a second
    process started with the same instance id fails fast instead of fencing this one."""
    check_topics: bool = True
    """Check before PREPARE that every target topic exists (fails fast, nothing published)."""
    kafka_commit_retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of ``commit_transaction()`` on retriable errors. When spent, the
    outcome is unknown and left to recovery."""
    pg_commit_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            stop=tenacity.stop_after_delay(15),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2),
        )
    )
    """Retries of ``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` (on new connections)."""
    group_commit: GroupCommit | None = None
    """``None``: one Kafka transaction per operation."""
    producer_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra librdkafka settings for the transactional producers only."""

    def __post_init__(self) -> None:
        if not 1 <= self.producers <= 1000:
            raise ValueError("producers must be between 1 and 1000")
        if self.transaction_timeout_ms < 1000:
            raise ValueError("transaction_timeout_ms below 1000 is not supported")
