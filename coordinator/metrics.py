"""Prometheus metrics of a coordinator: an :class:`~coordinator.observe.Observer`.

::

    from prometheus_client import start_http_server
    from coordinator import Coordinator, CoordinatorConfig
    from coordinator.metrics import PrometheusObserver

    start_http_server(9464)
    config = CoordinatorConfig(observers=(PrometheusObserver(),))
    coord = Coordinator(postgres=DSN, kafka=KAFKA, name="orders", config=config)

Needs the optional extra ``pg-kafka-2pc[metrics]`` (prometheus-client). Importing
this module does not import prometheus-client; nothing is registered until a
:class:`PrometheusObserver` is made (an :class:`ImportError` then says what to
install). The families, all labelled with the coordinator's ``name``:

``pk2pc_transactions_total{name,status,phase}`` (counter)
    Ended transactions. ``status`` is the transaction's
    :class:`~coordinator.Status` at its end: ``committed``, ``rolled_back``,
    ``decided`` (committed; ``COMMIT PREPARED`` left to recovery),
    ``in_doubt`` (outcome unknown; recovery decides), ``diverged``. A transaction
    whose caller got :class:`~coordinator.OutcomeUnknown` always counts as
    ``in_doubt``. ``phase`` is the :class:`~coordinator.Phase` it failed in
    (``begin``, ``execute``, ``prepare``, ``produce``, ``kafka_commit``,
    ``pg_commit``...), ``none`` when it committed or no phase is known.
``pk2pc_phase_seconds{name,phase}`` (histogram)
    Duration of each protocol phase, successful or not: ``begin`` (connection,
    ``BEGIN``, idempotency claim), ``prepare``, ``kafka_commit`` (produce and the
    commit point, waiting for a group included), ``commit_prepared``; ``commit``
    for the plain ``COMMIT`` of a transaction without Kafka message; ``total``
    from entering the block to the end, whatever the outcome.
``pk2pc_group_size{name}`` (histogram)
    Members of the Kafka transaction each transaction committed in (1 without
    group commit).
``pk2pc_transactions_in_flight{name}`` (gauge)
    Transactions begun and not ended yet.
``pk2pc_producer_restarts_total{name}`` (counter)
    Transactional producers re-created after a failure (sessions of generation > 1).
``pk2pc_idempotency_hits_total{name}`` (counter)
    Transactions that found their idempotency key already committed.

Several observers (several coordinators) may share one registry: the families
are made once per registry and shared.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._enums import Phase, Status
from .errors import OutcomeUnknown
from .observe import Headers, TransactionInfo

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "GROUP_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "METRIC_NAMES",
    "NO_PHASE",
    "PrometheusObserver",
    "phase_label",
]

METRIC_NAMES: tuple[str, ...] = (
    "pk2pc_transactions_total",
    "pk2pc_phase_seconds",
    "pk2pc_group_size",
    "pk2pc_transactions_in_flight",
    "pk2pc_producer_restarts_total",
    "pk2pc_idempotency_hits_total",
)
"""Every metric family a :class:`PrometheusObserver` registers."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)
"""Seconds: a phase takes about a millisecond on a healthy local set-up, a Kafka
commit a few; seconds mean retries, and 30 s a time-out."""

GROUP_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

NO_PHASE = "none"
"""The ``phase`` label of a committed transaction (and of a failure without phase)."""

_PHASES: dict[Phase, str] = {
    Phase.BEGIN: "begin",
    Phase.PREPARE: "prepare",
    Phase.KAFKA_COMMIT: "kafka_commit",
    Phase.PG_COMMIT: "commit_prepared",
}


def phase_label(phase: Phase, prepared: bool) -> str:
    """The ``pk2pc_phase_seconds`` label of ``phase``; ``prepared``: the transaction
    was prepared (its ``PG_COMMIT`` is a ``COMMIT PREPARED``, else a plain ``COMMIT``)."""
    if phase is Phase.PG_COMMIT and not prepared:
        return "commit"
    return _PHASES.get(phase, phase.value)


@dataclass(frozen=True, slots=True)
class _Families:
    transactions: Counter
    phase_seconds: Histogram
    group_size: Histogram
    in_flight: Gauge
    producer_restarts: Counter
    idempotency_hits: Counter
    latency_buckets: tuple[float, ...]
    group_buckets: tuple[float, ...]


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = (
    weakref.WeakKeyDictionary())


def _families(registry: CollectorRegistry, latency_buckets: tuple[float, ...],
              group_buckets: tuple[float, ...]) -> _Families:
    """The families of ``registry``, registered on first use."""
    from prometheus_client import Counter, Gauge, Histogram

    with _lock:
        found = _by_registry.get(registry)
        if found is not None:
            if (found.latency_buckets, found.group_buckets) != (latency_buckets,
                                                               group_buckets):
                raise ValueError("this registry's pk2pc metrics were made with other "
                                 "buckets; every PrometheusObserver of a registry must "
                                 "use the same ones")
            return found
        made = _Families(
            transactions=Counter(
                "pk2pc_transactions_total",
                "Coordinated transactions ended, by final status and the phase that failed "
                "(none: committed)", ["name", "status", "phase"], registry=registry),
            phase_seconds=Histogram(
                "pk2pc_phase_seconds", "Duration of each protocol phase, and the total",
                ["name", "phase"], buckets=latency_buckets, registry=registry),
            group_size=Histogram(
                "pk2pc_group_size", "Members of the Kafka transaction a transaction "
                "committed in", ["name"], buckets=group_buckets, registry=registry),
            in_flight=Gauge(
                "pk2pc_transactions_in_flight", "Coordinated transactions begun and not "
                "ended", ["name"], registry=registry),
            producer_restarts=Counter(
                "pk2pc_producer_restarts_total", "Transactional producers re-created after "
                "a failure", ["name"], registry=registry),
            idempotency_hits=Counter(
                "pk2pc_idempotency_hits_total", "Transactions whose idempotency key was "
                "already committed", ["name"], registry=registry),
            latency_buckets=latency_buckets,
            group_buckets=group_buckets,
        )
        _by_registry[registry] = made
        return made


class PrometheusObserver:
    """Records every transaction of the coordinators it is given to in
    Prometheus metrics (see the module documentation).

    ``registry``: where to register the families (default
    ``prometheus_client.REGISTRY``); observers sharing a registry share them,
    and must then use the same buckets.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 latency_buckets: Sequence[float] = LATENCY_BUCKETS,
                 group_size_buckets: Sequence[float] = GROUP_SIZE_BUCKETS) -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise ImportError(
                "coordinator.metrics needs prometheus-client: pip install "
                "'pg-kafka-2pc[metrics]'") from exc
        self.registry: CollectorRegistry = (
            prometheus_client.REGISTRY if registry is None else registry)
        self._m = _families(self.registry, tuple(latency_buckets), tuple(group_size_buckets))
        self._series: dict[str, _Series] = {}

    def transaction(self, info: TransactionInfo) -> _TransactionMetrics:
        series = self._series.get(info.name)
        if series is None:
            series = self._series.setdefault(info.name, _Series(self._m, info.name))
        return _TransactionMetrics(series)

    def producer_started(self, name: str, instance: str, slot: int, generation: int) -> None:
        m = self._m
        restarts = m.producer_restarts.labels(name)
        # Every series of the name exists from start-up on (rate() needs a first sample).
        m.idempotency_hits.labels(name)
        m.in_flight.labels(name)
        if generation > 1:
            restarts.inc()

    def idempotency_hit(self, name: str, instance: str) -> None:
        self._m.idempotency_hits.labels(name).inc()


class _Series:
    """The labelled series of one coordinator name, looked up once (a label
    lookup costs more than the update itself)."""

    __slots__ = ("_outcomes", "_phases", "group_size", "in_flight", "m", "name")

    def __init__(self, families: _Families, name: str) -> None:
        self.m = families
        self.name = name
        self.in_flight = families.in_flight.labels(name)
        self.group_size = families.group_size.labels(name)
        self._phases: dict[str, Histogram] = {}
        self._outcomes: dict[tuple[str, str], Counter] = {}

    def phase(self, label: str) -> Histogram:
        found = self._phases.get(label)
        if found is None:
            found = self._phases.setdefault(
                label, self.m.phase_seconds.labels(self.name, label))
        return found

    def outcome(self, status: str, phase: str) -> Counter:
        found = self._outcomes.get((status, phase))
        if found is None:
            found = self._outcomes.setdefault(
                (status, phase), self.m.transactions.labels(self.name, status, phase))
        return found


class _TransactionMetrics:
    """One transaction's :class:`~coordinator.observe.TransactionObserver`."""

    __slots__ = ("_ended", "_prepared", "_series")

    def __init__(self, series: _Series) -> None:
        self._series = series
        self._prepared = False
        self._ended = False
        series.in_flight.inc()

    def headers(self) -> Headers:
        return ()

    def phase(self, phase: Phase, seconds: float) -> None:
        self._series.phase(phase_label(phase, self._prepared)).observe(seconds)

    def prepared(self, gid: str) -> None:
        self._prepared = True

    def group(self, members: int) -> None:
        self._series.group_size.observe(members)

    def end(self, status: Status, phase: Phase | None, error: BaseException | None,
            seconds: float) -> None:
        if self._ended:
            return
        self._ended = True
        series = self._series
        series.in_flight.dec()
        label = Status.IN_DOUBT if isinstance(error, OutcomeUnknown) else status
        failed = NO_PHASE if phase is None or status is Status.COMMITTED else phase.value
        series.outcome(label.value, failed).inc()
        series.phase("total").observe(seconds)
