"""Configuration objects with defaults that are safe in production."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity
from confluent_kafka import Producer
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from ._enums import Step
from .decision_log import DecisionTopic
from .errors import ConfigurationError
from .observe import Observer

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

    def __post_init__(self) -> None:
        _check(isinstance(self.max_batch, int) and self.max_batch >= 1,
               f"GroupCommit.max_batch must be an integer >= 1, got {self.max_batch!r}")
        _check(_number(self.max_wait) and 0 <= self.max_wait <= 60,
               f"GroupCommit.max_wait must be between 0 and 60 seconds, got {self.max_wait!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigurationError(message)


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
    decision_log_table: str = "pk2pc_decision_logs"
    """Where each coordinator registers its decision log (cluster id, topic, topic
    id) at start-up, in ``idempotency_schema``; recovery reads it from there."""
    max_clock_skew_seconds: float | None = 300.0
    """Start-up fails when this host's clock and PostgreSQL's differ by more
    (``None``: no check). No guarantee depends on clocks; a skewed host makes
    logs, alert ages and operators' reasoning wrong."""
    producer_factory: Callable[[dict[str, Any]], Producer] = Producer
    """Makes each transactional producer from its configuration (a seam for
    tests and instrumentation, like psycopg_pool's ``connection_class``)."""
    on_step: Callable[[Step, str | None], None] | None = None
    """Called with each :class:`~coordinator.Step` a transaction reaches and its
    gid (a seam for tests, fault injection and tracing)."""
    observers: tuple[Observer, ...] = ()
    """Told about every transaction (phases, outcome) and producer session: the
    seam metrics and tracing plug into (``coordinator.observe``,
    ``coordinator.metrics``, ``coordinator.tracing``)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.producers, int) and 1 <= self.producers <= 1000,
               f"producers must be between 1 and 1000, got {self.producers!r}")
        _check(isinstance(self.transaction_timeout_ms, int)
               and 1000 <= self.transaction_timeout_ms <= 3_600_000,
               "transaction_timeout_ms must be between 1000 and 3600000, got "
               f"{self.transaction_timeout_ms!r}")
        for name in ("kafka_timeout", "startup_timeout", "connection_timeout"):
            value = getattr(self, name)
            _check(_number(value) and 0 < value <= 3600,
                   f"{name} must be between 0 (excluded) and 3600 seconds, got {value!r}")
        _check(isinstance(self.pool_min_size, int) and isinstance(self.pool_max_size, int)
               and 0 <= self.pool_min_size <= self.pool_max_size and self.pool_max_size >= 1,
               "need 0 <= pool_min_size <= pool_max_size and pool_max_size >= 1, got "
               f"{self.pool_min_size!r}, {self.pool_max_size!r}")
        _check(isinstance(self.idempotency_wait_ms, int) and self.idempotency_wait_ms >= 1,
               f"idempotency_wait_ms must be an integer >= 1, got {self.idempotency_wait_ms!r}")
        for name in ("idempotency_table", "decision_log_table"):
            _check(isinstance(getattr(self, name), str) and bool(getattr(self, name)),
                   f"{name} must be a non-empty string")
        _check(self.max_clock_skew_seconds is None or (
            _number(self.max_clock_skew_seconds) and self.max_clock_skew_seconds > 0),
            f"max_clock_skew_seconds must be > 0 or None, got {self.max_clock_skew_seconds!r}")
        _check(self.group_commit is None or isinstance(self.group_commit, GroupCommit),
               "group_commit must be a GroupCommit or None")
        _check(isinstance(self.decision_topic, DecisionTopic),
               "decision_topic must be a DecisionTopic")
        _check(isinstance(self.observers, tuple),
               "observers must be a tuple of Observer objects")
        _check("transactional.id" not in self.producer_overrides,
               "do not set 'transactional.id': the coordinator derives one per producer")
