"""The metrics' logic without services: the coordinator's observer driven by hand
through the observer protocol, recovery reports published, reason classes of
recovery's real reasons, and the library importing without prometheus-client."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from coordinator import Gid, OutcomeUnknown, Phase, RolledBack, Status
from coordinator.metrics import METRIC_NAMES, PrometheusObserver
from coordinator.observe import Observer, TransactionInfo
from recovery import InDoubt, RecoveryReport, Remaining
from recovery._decide import LogFacts, VerdictKind, decide
from recovery.metrics import METRIC_NAMES as RECOVERY_METRIC_NAMES
from recovery.metrics import REASON_CLASSES, RecoveryMetrics, reason_class

ROOT = Path(__file__).resolve().parents[2]


def value(registry: CollectorRegistry, sample: str, **labels: str) -> float | None:
    return registry.get_sample_value(sample, labels)


def info(name: str = "orders") -> TransactionInfo:
    return TransactionInfo(name, "i1", "txid")


def family_names(registry: CollectorRegistry) -> set[str]:
    """Family names as registered (a counter's with its ``_total``)."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


# -- the coordinator's observer --------------------------------------------------------


def test_a_committed_transaction() -> None:
    reg = CollectorRegistry()
    obs: Observer = PrometheusObserver(reg)
    tx = obs.transaction(info())
    assert value(reg, "pk2pc_transactions_in_flight", name="orders") == 1
    assert tuple(tx.headers()) == ()
    tx.phase(Phase.BEGIN, 0.001)
    tx.phase(Phase.PREPARE, 0.002)
    tx.prepared("gid")
    tx.phase(Phase.KAFKA_COMMIT, 0.004)
    tx.group(3)
    tx.phase(Phase.PG_COMMIT, 0.0015)
    tx.end(Status.COMMITTED, None, None, 0.012)
    assert value(reg, "pk2pc_transactions_in_flight", name="orders") == 0
    assert value(reg, "pk2pc_transactions_total", name="orders", status="committed",
                 phase="none") == 1
    for phase, seconds in [("begin", 0.001), ("prepare", 0.002), ("kafka_commit", 0.004),
                           ("commit_prepared", 0.0015), ("total", 0.012)]:
        assert value(reg, "pk2pc_phase_seconds_count", name="orders", phase=phase) == 1
        assert value(reg, "pk2pc_phase_seconds_sum", name="orders",
                     phase=phase) == pytest.approx(seconds)
    assert value(reg, "pk2pc_phase_seconds_count", name="orders", phase="commit") is None
    # 4 ms lands in the 5 ms bucket, not in the 2 ms one.
    assert value(reg, "pk2pc_phase_seconds_bucket", name="orders", phase="kafka_commit",
                 le="0.002") == 0
    assert value(reg, "pk2pc_phase_seconds_bucket", name="orders", phase="kafka_commit",
                 le="0.005") == 1
    assert value(reg, "pk2pc_group_size_sum", name="orders") == 3
    assert value(reg, "pk2pc_group_size_bucket", name="orders", le="2.0") == 0
    assert value(reg, "pk2pc_group_size_bucket", name="orders", le="4.0") == 1


def test_one_phase_commit_is_labelled_commit() -> None:
    reg = CollectorRegistry()
    tx = PrometheusObserver(reg).transaction(info())
    tx.phase(Phase.BEGIN, 0.001)
    tx.phase(Phase.PG_COMMIT, 0.001)  # never prepared: a plain COMMIT
    tx.end(Status.COMMITTED, None, None, 0.003)
    assert value(reg, "pk2pc_phase_seconds_count", name="orders", phase="commit") == 1
    assert value(reg, "pk2pc_phase_seconds_count", name="orders",
                 phase="commit_prepared") is None


@pytest.mark.parametrize(
    ("status", "phase", "error", "expected"),
    [
        (Status.ROLLED_BACK, Phase.EXECUTE, ValueError("the block"), ("rolled_back", "execute")),
        (Status.ROLLED_BACK, Phase.PRODUCE, RolledBack("x"), ("rolled_back", "produce")),
        (Status.IN_DOUBT, Phase.KAFKA_COMMIT, OutcomeUnknown("x"), ("in_doubt", "kafka_commit")),
        (Status.DECIDED, Phase.PG_COMMIT, RuntimeError("x"), ("decided", "pg_commit")),
        # A one-phase COMMIT that lost its connection: its outcome is unknown.
        (Status.IN_DOUBT, Phase.PG_COMMIT, OutcomeUnknown("x"), ("in_doubt", "pg_commit")),
        (Status.PREPARED, None, KeyboardInterrupt(), ("prepared", "none")),
    ],
)
def test_failures_by_status_and_phase(status: Status, phase: Phase | None,
                                      error: BaseException, expected: tuple[str, str]) -> None:
    reg = CollectorRegistry()
    tx = PrometheusObserver(reg).transaction(info())
    tx.end(status, phase, error, 0.5)
    tx.end(status, phase, error, 0.5)  # told twice: counted once
    want_status, want_phase = expected
    assert value(reg, "pk2pc_transactions_total", name="orders", status=want_status,
                 phase=want_phase) == 1
    assert value(reg, "pk2pc_transactions_in_flight", name="orders") == 0
    assert value(reg, "pk2pc_phase_seconds_count", name="orders", phase="total") == 1


def test_producer_restarts_and_idempotency_hits() -> None:
    reg = CollectorRegistry()
    obs = PrometheusObserver(reg)
    obs.producer_started("orders", "i1", 0, 1)
    obs.producer_started("orders", "i1", 1, 1)
    # Every per-name series exists from start-up on, at zero.
    assert value(reg, "pk2pc_producer_restarts_total", name="orders") == 0
    assert value(reg, "pk2pc_idempotency_hits_total", name="orders") == 0
    assert value(reg, "pk2pc_transactions_in_flight", name="orders") == 0
    obs.producer_started("orders", "i1", 0, 2)
    obs.producer_started("orders", "i1", 0, 3)
    obs.idempotency_hit("orders", "i1")
    assert value(reg, "pk2pc_producer_restarts_total", name="orders") == 2
    assert value(reg, "pk2pc_idempotency_hits_total", name="orders") == 1


def test_observers_share_a_registry() -> None:
    reg = CollectorRegistry()
    a, b = PrometheusObserver(reg), PrometheusObserver(reg)  # no "Duplicated timeseries"
    for obs, name in [(a, "orders"), (b, "orders"), (b, "billing")]:
        obs.transaction(info(name)).end(Status.COMMITTED, None, None, 0.01)
    assert value(reg, "pk2pc_transactions_total", name="orders", status="committed",
                 phase="none") == 2
    assert value(reg, "pk2pc_transactions_total", name="billing", status="committed",
                 phase="none") == 1
    assert family_names(reg) == set(METRIC_NAMES)
    with pytest.raises(ValueError, match="other buckets"):
        PrometheusObserver(reg, latency_buckets=(0.1, 1.0))
    other = CollectorRegistry()
    PrometheusObserver(other, latency_buckets=(0.1, 1.0)).transaction(info()).end(
        Status.COMMITTED, None, None, 0.01)
    assert value(other, "pk2pc_phase_seconds_bucket", name="orders", phase="total",
                 le="0.1") == 1
    assert value(reg, "pk2pc_transactions_total", name="orders", status="committed",
                 phase="none") == 2


def test_nothing_registered_until_constructed() -> None:
    reg = CollectorRegistry()
    import coordinator.metrics  # noqa: F401
    import recovery.metrics  # noqa: F401

    assert generate_latest(reg) == b""


# -- recovery -----------------------------------------------------------------------


LOG = "00aa11bb22cc"


def in_doubt(floor: int = 10, partition: int = 2) -> InDoubt:
    gid = Gid.new("orders", "h", 0, partition, floor, LOG)
    return InDoubt(gid, datetime.now(UTC), "app", "db", 100.0)


def test_recovery_report_published() -> None:
    reg = CollectorRegistry()
    metrics = RecoveryMetrics(reg)
    r = RecoveryReport(
        committed=["c1", "c2"], rolled_back=["r1"],
        remaining=[Remaining("x1", "busy: another session is finishing it"),
                   Remaining("x2", "decision log unreachable: down"),
                   Remaining("x3", "decision log unreachable: down")],
        waiting=["w1"], skipped=["s1"],
        ages={"c1": 900.0, "c2": 80.0, "r1": 70.0, "x1": 65.0, "x2": 300.0, "x3": 61.0,
              "w1": 5.0, "s1": 1000.0},
        oldest_age_seconds=1000.0, duration_seconds=1.25)
    metrics.publish("orders", r, now=1_700_000_000.0)
    assert value(reg, "pk2pc_in_doubt", name="orders") == 4
    # The oldest of those left in doubt, not of those resolved (c1, s1).
    assert value(reg, "pk2pc_in_doubt_oldest_age_seconds", name="orders") == 300.0
    assert value(reg, "pk2pc_recovery_resolved_total", name="orders", decision="commit") == 2
    assert value(reg, "pk2pc_recovery_resolved_total", name="orders", decision="rollback") == 1
    assert value(reg, "pk2pc_recovery_remaining", name="orders", reason="busy") == 1
    assert value(reg, "pk2pc_recovery_remaining", name="orders", reason="log_unreachable") == 2
    for kind in set(REASON_CLASSES) - {"busy", "log_unreachable"}:
        assert value(reg, "pk2pc_recovery_remaining", name="orders", reason=kind) == 0
    assert value(reg, "pk2pc_recovery_duration_seconds", name="orders") == 1.25
    assert value(reg, "pk2pc_recovery_last_success_timestamp_seconds",
                 name="orders") == 1_700_000_000.0
    assert family_names(reg) == set(RECOVERY_METRIC_NAMES)

    # The next run: gauges replaced, counters continue.
    metrics.publish("orders", RecoveryReport(rolled_back=["x2"], ages={"x2": 360.0},
                                             duration_seconds=0.5), now=1_700_000_060.0)
    assert value(reg, "pk2pc_in_doubt", name="orders") == 0
    assert value(reg, "pk2pc_in_doubt_oldest_age_seconds", name="orders") == 0
    assert value(reg, "pk2pc_recovery_resolved_total", name="orders", decision="rollback") == 2
    assert value(reg, "pk2pc_recovery_remaining", name="orders", reason="log_unreachable") == 0
    assert value(reg, "pk2pc_recovery_last_success_timestamp_seconds",
                 name="orders") == 1_700_000_060.0


def test_a_dry_run_resolves_nothing_and_is_no_success() -> None:
    reg = CollectorRegistry()
    RecoveryMetrics(reg).publish("orders", RecoveryReport(
        dry_run=True, committed=["c1"], ages={"c1": 70.0},
        remaining=[Remaining("u1", decide(in_doubt(), LogFacts(LOG)).reason)]))
    assert value(reg, "pk2pc_recovery_resolved_total", name="orders", decision="commit") == 0
    assert value(reg, "pk2pc_recovery_remaining", name="orders", reason="dry_run") == 1
    assert value(reg, "pk2pc_recovery_last_success_timestamp_seconds", name="orders") is None


def test_counters_carry_over_from_a_previous_file() -> None:
    before = CollectorRegistry()
    RecoveryMetrics(before).publish("orders", RecoveryReport(committed=["a", "b"]), now=100.0)
    RecoveryMetrics(before).publish("billing", RecoveryReport(committed=["z"]), now=50.0)
    text = generate_latest(before).decode()
    after = CollectorRegistry()
    metrics = RecoveryMetrics(after)
    metrics.carry_over(text, "orders")
    assert value(after, "pk2pc_recovery_last_success_timestamp_seconds", name="orders") == 100
    metrics.publish("orders", RecoveryReport(committed=["c"], rolled_back=["d"]), now=200.0)
    assert value(after, "pk2pc_recovery_resolved_total", name="orders", decision="commit") == 3
    assert value(after, "pk2pc_recovery_resolved_total", name="orders", decision="rollback") == 1
    assert value(after, "pk2pc_recovery_last_success_timestamp_seconds", name="orders") == 200
    assert value(after, "pk2pc_recovery_resolved_total", name="billing",
                 decision="commit") is None


def _proven_absent(**overrides: Any) -> LogFacts:
    facts: dict[str, Any] = {"fingerprint": LOG, "fenced": True, "reached": frozenset({2}),
                             "log_start": {2: 0}}
    facts.update(overrides)
    return LogFacts(**facts)


@pytest.mark.parametrize(
    ("facts", "kind"),
    [
        (LogFacts("ffffffffffff"), "wrong_log"),
        (LogFacts(None), "wrong_log"),
        (LogFacts(None, unusable="decision log unreachable: KafkaError{...}"),
         "log_unreachable"),
        (LogFacts(None, unusable="decision topic 'pk2pc.decisions' not found (missing); its "
                  "decision log 00aa11bb22cc is not registered"), "topic_missing"),
        (LogFacts(None, unusable="the decision topic given ('x') is not the one its "
                  "coordinator registered ('y' on cluster c)"), "topic_mismatch"),
        (LogFacts("eeeeeeeeeeee", unusable="topic 'x' on cluster c (topic id t) is not its "
                  "decision log 00aa11bb22cc (not registered): wrong topic, wrong cluster, "
                  "or the topic was deleted and re-created"), "wrong_log"),
        (LogFacts(LOG), "dry_run"),
        (_proven_absent(fence_failed={in_doubt().gid.transactional_id: "timed out"}),
         "fence_failed"),
        (_proven_absent(reached=frozenset()), "log_unread"),
        (_proven_absent(log_start={2: 11}), "log_truncated"),
        (_proven_absent(partition_problems={2: "offset 10 of partition 2 is out of range: "
                                               "records were deleted while reading (x)"}),
         "log_truncated"),
        (_proven_absent(compacted=True), "log_unsafe"),
        (_proven_absent(unclean=True), "log_unsafe"),
    ],
)
def test_reason_classes_of_the_verdicts(facts: LogFacts, kind: str) -> None:
    t = in_doubt()
    verdict = decide(t, facts)
    assert verdict.kind is VerdictKind.REMAIN
    assert reason_class(verdict.reason) == kind, verdict.reason


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("another recovery worker for 'orders' holds the lock", "locked"),
        ("busy: another session is finishing it", "busy"),
        ("COMMIT PREPARED failed: error: connection lost", "finish_failed"),
        ("ROLLBACK PREPARED failed: error: cannot connect", "finish_failed"),
        ("something new", "other"),
    ],
)
def test_reason_classes_of_the_worker(reason: str, kind: str) -> None:
    assert reason_class(reason) == kind
    assert kind in REASON_CLASSES


# -- without prometheus-client --------------------------------------------------------


def test_the_library_imports_without_prometheus_client() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None  # any import of it fails
        import coordinator, coordinator.metrics, recovery, recovery.metrics, recovery._cli
        assert coordinator.metrics.METRIC_NAMES and recovery.metrics.METRIC_NAMES
        for make in (coordinator.metrics.PrometheusObserver, recovery.metrics.RecoveryMetrics):
            try:
                make()
            except ImportError as exc:
                assert "pg-kafka-2pc[metrics]" in str(exc), exc
            else:
                raise AssertionError("constructed without prometheus-client")
        code = recovery._cli.main(["--postgres", "host=nowhere", "--name", "orders",
                                   "--metrics-file", "never-written.prom"])
        assert code == 2, code
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "need prometheus-client: pip install 'pg-kafka-2pc[metrics]'" in done.stderr
