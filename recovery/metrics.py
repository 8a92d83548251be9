"""Prometheus metrics of recovery runs, published from a :class:`RecoveryReport`.

::

    from prometheus_client import CollectorRegistry, write_to_textfile
    import recovery
    from recovery.metrics import RecoveryMetrics

    registry = CollectorRegistry()
    report = recovery.recover(DSN, KAFKA, "orders")
    RecoveryMetrics(registry).publish("orders", report)
    write_to_textfile("/var/lib/node_exporter/textfile/pk2pc_orders.prom", registry)

The command line does the same with ``--metrics-file PATH`` (node-exporter
textfile format, written atomically) or ``--pushgateway URL``. Needs the
optional extra ``pg-kafka-2pc[metrics]`` (prometheus-client); importing this
module does not import it. The families, all labelled with the coordinator's
``name``:

``pk2pc_in_doubt{name}`` (gauge)
    Transactions of ours left prepared after the run: those that remain in doubt
    and those younger than the grace period.
``pk2pc_in_doubt_oldest_age_seconds{name}`` (gauge)
    Age of the oldest of them (0: none left).
``pk2pc_recovery_resolved_total{name,decision}`` (counter)
    Transactions recovery committed (``decision="commit"``) or rolled back
    (``rollback``). A dry run resolves nothing.
``pk2pc_recovery_remaining{name,reason}`` (gauge)
    Transactions left in doubt past the grace period, by class of reason
    (:data:`REASON_CLASSES`, see :func:`reason_class`); every class is present.
``pk2pc_recovery_duration_seconds{name}`` (gauge)
    How long the last run took.
``pk2pc_recovery_last_success_timestamp_seconds{name}`` (gauge)
    Unix time of the end of the last run that completed (whatever it left in
    doubt; not a dry run). A run that fails with a configuration or connection
    error (exit code 2) publishes nothing, so this stops moving.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._model import RecoveryReport

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["DECISIONS", "METRIC_NAMES", "REASON_CLASSES", "RecoveryMetrics", "reason_class"]

METRIC_NAMES: tuple[str, ...] = (
    "pk2pc_in_doubt",
    "pk2pc_in_doubt_oldest_age_seconds",
    "pk2pc_recovery_resolved_total",
    "pk2pc_recovery_remaining",
    "pk2pc_recovery_duration_seconds",
    "pk2pc_recovery_last_success_timestamp_seconds",
)
"""Every metric family a :class:`RecoveryMetrics` registers."""

DECISIONS: tuple[str, ...] = ("commit", "rollback")

# (class, pattern) in order: the first match wins. The texts are recovery's own
# reasons (``_decide.py``, ``_worker.py``, ``recovery/_kafka.py``, the decision log).
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern)) for kind, pattern in (
        ("locked", r"^another recovery worker for .* holds the lock"),
        ("dry_run", r"^no decision visible yet; would fence"),
        ("log_unreachable", r"^decision log unreachable"),
        ("topic_missing", r"^decision topic .* not found"),
        ("topic_mismatch", r"is not the one its coordinator registered"),
        ("wrong_log", r"is not its decision log|, but the log read is "),
        ("fence_failed", r"^fencing \S+ failed"),
        ("log_unread", r"could not be read up to its high watermark"),
        ("log_truncated", r"records were deleted"),
        ("log_unsafe", r"^the decision topic (is compacted|allows unclean leader election)"),
        ("busy", r"^busy"),
        ("finish_failed", r"^(COMMIT|ROLLBACK) PREPARED failed"),
    )
)

REASON_CLASSES: tuple[str, ...] = (*(kind for kind, _ in _REASONS), "other")
"""The ``reason`` label values of ``pk2pc_recovery_remaining``."""


def reason_class(reason: str) -> str:
    """The short class of a remaining transaction's reason (``other`` when unknown):

    ``locked`` another worker for the name holds the lock; ``dry_run`` no
    decision visible and a dry run does not fence; ``log_unreachable`` Kafka
    unreachable; ``topic_missing`` the decision topic does not exist;
    ``topic_mismatch`` ``--decision-topic`` is not the registered topic;
    ``wrong_log`` the topic read is not the gid's decision log; ``fence_failed``;
    ``log_unread`` a partition not read to its end (the last stable offset held
    back); ``log_truncated`` records deleted where the decision could be;
    ``log_unsafe`` compacted topic or unclean leader election; ``busy`` another
    session is finishing it; ``finish_failed`` ``COMMIT/ROLLBACK PREPARED`` failed.
    """
    for kind, pattern in _REASONS:
        if pattern.search(reason):
            return kind
    return "other"


@dataclass(frozen=True, slots=True)
class _Families:
    in_doubt: Gauge
    oldest_age: Gauge
    resolved: Counter
    remaining: Gauge
    duration: Gauge
    last_success: Gauge


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = (
    weakref.WeakKeyDictionary())


def _families(registry: CollectorRegistry) -> _Families:
    from prometheus_client import Counter, Gauge

    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = _Families(
                in_doubt=Gauge("pk2pc_in_doubt", "Prepared transactions left in doubt after "
                               "the last recovery run", ["name"], registry=registry),
                oldest_age=Gauge("pk2pc_in_doubt_oldest_age_seconds", "Age of the oldest "
                                 "transaction left in doubt (0: none)", ["name"],
                                 registry=registry),
                resolved=Counter("pk2pc_recovery_resolved_total", "In-doubt transactions "
                                 "recovery committed or rolled back", ["name", "decision"],
                                 registry=registry),
                remaining=Gauge("pk2pc_recovery_remaining", "Transactions recovery left in "
                                "doubt past the grace period, by class of reason",
                                ["name", "reason"], registry=registry),
                duration=Gauge("pk2pc_recovery_duration_seconds", "Duration of the last "
                               "recovery run", ["name"], registry=registry),
                last_success=Gauge("pk2pc_recovery_last_success_timestamp_seconds",
                                   "Unix time the last completed recovery run ended",
                                   ["name"], registry=registry),
            )
        return found


class RecoveryMetrics:
    """Publishes recovery reports to a registry (default
    ``prometheus_client.REGISTRY``); instances on one registry share the families."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise ImportError("recovery.metrics needs prometheus-client: pip install "
                              "'pg-kafka-2pc[metrics]'") from exc
        self.registry: CollectorRegistry = (
            prometheus_client.REGISTRY if registry is None else registry)
        self._m = _families(self.registry)

    def publish(self, name: str, report: RecoveryReport, *, now: float | None = None) -> None:
        """Set the metrics of ``name`` from one run's ``report``; ``now``: the Unix
        time it ended (default: now)."""
        m = self._m
        m.in_doubt.labels(name).set(len(report.in_doubt))
        m.oldest_age.labels(name).set(report.oldest_in_doubt_age_seconds or 0.0)
        counts = dict.fromkeys(REASON_CLASSES, 0)
        for r in report.remaining:
            counts[reason_class(r.reason)] += 1
        for kind, count in counts.items():
            m.remaining.labels(name, kind).set(count)
        if report.duration_seconds is not None:
            m.duration.labels(name).set(report.duration_seconds)
        commit, rollback = (m.resolved.labels(name, d) for d in DECISIONS)
        if report.dry_run:
            return
        commit.inc(len(report.committed))
        rollback.inc(len(report.rolled_back))
        m.last_success.labels(name).set(time.time() if now is None else now)

    def carry_over(self, text: str, name: str) -> None:
        """Continue the counters and the last success time of ``name`` from an
        earlier exposition ``text`` (a previous ``--metrics-file``): a one-shot
        process starts from zero otherwise."""
        from prometheus_client.parser import text_string_to_metric_families

        m = self._m
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("name") != name:
                    continue
                if (s.name == "pk2pc_recovery_resolved_total"
                        and s.labels.get("decision") in DECISIONS):
                    m.resolved.labels(name, s.labels["decision"]).inc(s.value)
                elif s.name == "pk2pc_recovery_last_success_timestamp_seconds":
                    m.last_success.labels(name).set(s.value)
