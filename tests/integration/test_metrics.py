"""Prometheus metrics with the real services, read the way Prometheus reads them.

The coordinator's :class:`~coordinator.metrics.PrometheusObserver` and recovery's
:class:`~recovery.metrics.RecoveryMetrics` publish to a fresh registry served by
``prometheus_client.start_http_server`` on 127.0.0.1; the tests scrape
``GET /metrics`` and parse the exposition. Transactions commit, roll back from the
block, hit their idempotency key, fail on a missing topic, stop after the commit
point (an ``on_step`` hook raises) and lose their Kafka commit outcome (the
producer's ``commit_transaction()`` raises a real fatal ``KafkaError``); recovery
then resolves what they left in doubt, in-process and through the command line
(``--metrics-file``, ``--pushgateway`` to a local HTTP receiver).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import recovery
from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    OutcomeUnknown,
    RolledBack,
    Status,
    Step,
)
from coordinator.metrics import PrometheusObserver
from recovery.metrics import REASON_CLASSES, RecoveryMetrics

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration]

BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator

ROOT = Path(__file__).resolve().parents[2]


# -- reading metrics ------------------------------------------------------------------


class Samples:
    """One exposition, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self._values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, sample: str, **labels: str) -> float | None:
        return self._values.get((sample, frozenset(labels.items())))

    def __call__(self, sample: str, **labels: str) -> float:
        found = self.get(sample, **labels)
        assert found is not None, f"no sample {sample}{labels} in:\n{self.text}"
        return found


@dataclass
class Served:
    """A registry served over HTTP on 127.0.0.1."""

    registry: CollectorRegistry
    port: int

    def scrape(self) -> Samples:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            return Samples(resp.read().decode())


@pytest.fixture
def served() -> Iterator[Served]:
    registry = CollectorRegistry()
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield Served(registry, httpd.server_port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


# -- causing failures -------------------------------------------------------------------


class FailingCommit:
    """A real producer whose ``commit_transaction()`` first raises the queued errors
    (a ``producer_factory``)."""

    def __init__(self, real: Producer, errors: list[KafkaError]) -> None:
        self._real = real
        self._errors = errors

    def commit_transaction(self, *args: Any) -> None:
        if self._errors:
            raise KafkaException(self._errors.pop(0))
        self._real.commit_transaction(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@dataclass
class Faults:
    """What the next transactions of a coordinator run into."""

    commit_errors: list[KafkaError] = field(default_factory=list)
    stop_after_kafka_commit: bool = False

    def producer(self, conf: dict[str, Any]) -> Any:
        return FailingCommit(Producer(conf), self.commit_errors)

    def on_step(self, step: Step, gid: str | None) -> None:
        if step is Step.AFTER_KAFKA_COMMIT and self.stop_after_kafka_commit:
            self.stop_after_kafka_commit = False
            raise RuntimeError("injected: stopped before COMMIT PREPARED")

    def config(self) -> dict[str, Any]:
        return {"producers": 1, "producer_factory": self.producer, "on_step": self.on_step}


def order(coord: Any, topic: str | None, order_id: int, key: str | None = None) -> Any:
    tx = coord.transaction(idempotency_key=key)
    with tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (%s, 1)", (order_id,))
        if topic is not None:
            tx.produce(topic, value=f"order {order_id}")
    return tx


def leave_in_doubt(env: Env, coord: Any, faults: Faults, topic: str) -> tuple[str, str]:
    """Two prepared transactions for recovery: one past the commit point (its
    process stopped before COMMIT PREPARED), one whose Kafka commit outcome is
    unknown (never committed in fact). Returns (decided gid, undecided gid)."""
    faults.stop_after_kafka_commit = True
    with pytest.raises(CommittedPendingRecovery) as stopped:
        order(coord, topic, 101)
    faults.commit_errors.append(KafkaError(KafkaError.INVALID_TXN_STATE, "injected fatal",
                                           fatal=True))
    with pytest.raises(OutcomeUnknown) as unknown:
        order(coord, topic, 102)
    decided, undecided = stopped.value.gid, unknown.value.gid
    assert decided is not None and undecided is not None
    assert sorted(env.prepared()) == sorted([decided, undecided])
    return decided, undecided


# -- the coordinator --------------------------------------------------------------------


def test_coordinator_metrics_scraped(env: Env, orders: str, served: Served) -> None:
    faults = Faults()
    coord = env.coordinator(observers=(PrometheusObserver(served.registry),),
                            **faults.config())
    # A second coordinator on the same registry: the families are shared.
    other = env.coordinator(instance=env.instance + "b", producers=1,
                            observers=(PrometheusObserver(served.registry),))
    topic = env.topic()
    name = env.name

    m = served.scrape()
    assert m("pk2pc_producer_restarts_total", name=name) == 0
    assert m("pk2pc_idempotency_hits_total", name=name) == 0
    assert m("pk2pc_transactions_in_flight", name=name) == 0

    assert order(coord, topic, 1, key="k1").status is Status.COMMITTED
    assert order(coord, None, 2).status is Status.COMMITTED  # no message: one-phase
    with pytest.raises(ValueError), coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (3, 1)")
        raise ValueError("the block fails")
    with pytest.raises(AlreadyCommitted):
        order(coord, topic, 4, key="k1")
    with pytest.raises(RolledBack):
        order(coord, "no-such-topic-" + name, 5)
    faults.stop_after_kafka_commit = True
    with pytest.raises(CommittedPendingRecovery):
        order(coord, topic, 6)
    faults.commit_errors.append(KafkaError(KafkaError.INVALID_TXN_STATE, "injected fatal",
                                           fatal=True))
    with pytest.raises(OutcomeUnknown):
        order(coord, topic, 7)
    assert order(coord, topic, 8).status is Status.COMMITTED  # on a re-created producer
    assert order(other, topic, 9).status is Status.COMMITTED

    m = served.scrape()
    by_outcome = {
        ("committed", "none"): 4,  # 1, 2, 8 and the other coordinator's
        ("rolled_back", "execute"): 1,
        ("rolled_back", "begin"): 1,  # the idempotency hit
        ("rolled_back", "produce"): 1,  # the missing topic
        ("decided", "pg_commit"): 1,
        ("in_doubt", "kafka_commit"): 1,
    }
    for (status, phase), count in by_outcome.items():
        assert m("pk2pc_transactions_total", name=name, status=status, phase=phase) == count
    total = sum(s.value for f in text_string_to_metric_families(m.text) for s in f.samples
                if s.name == "pk2pc_transactions_total" and s.labels["name"] == name)
    assert total == 8 + 1  # and the other coordinator's
    assert m("pk2pc_transactions_in_flight", name=name) == 0
    assert m("pk2pc_idempotency_hits_total", name=name) == 1
    assert m("pk2pc_producer_restarts_total", name=name) == 1

    phases = {"total": 9, "begin": 8, "prepare": 5, "kafka_commit": 5, "commit_prepared": 3,
              "commit": 1}
    for phase, count in phases.items():
        assert m("pk2pc_phase_seconds_count", name=name, phase=phase) == count, phase
        assert m("pk2pc_phase_seconds_bucket", name=name, phase=phase, le="+Inf") == count
        assert 0 < m("pk2pc_phase_seconds_sum", name=name, phase=phase) < 60 * count
    assert m("pk2pc_group_size_count", name=name) == 5
    assert m("pk2pc_group_size_sum", name=name) == 5  # one member each, no group commit
    assert m("pk2pc_group_size_bucket", name=name, le="1.0") == 5

    # Recovery commits the decided one, rolls back the other (left for the test's end).
    assert len(env.prepared()) == 2


# -- recovery -------------------------------------------------------------------------


def test_recovery_metrics_scraped(env: Env, orders: str, served: Served) -> None:
    faults = Faults()
    coord = env.coordinator(**faults.config())
    decided, undecided = leave_in_doubt(env, coord, faults, env.topic())
    metrics = RecoveryMetrics(served.registry)
    name = env.name

    def run(**config: Any) -> recovery.RecoveryReport:
        report = recovery.recover(env.dsn, env.kafka, name, recovery.RecoveryConfig(**config))
        metrics.publish(name, report)
        return report

    # Within the grace period: both waiting, in doubt, nothing resolved.
    started = time.time()
    report = run(grace_seconds=3600)
    assert sorted(report.waiting) == sorted([decided, undecided])
    m = served.scrape()
    assert m("pk2pc_in_doubt", name=name) == 2
    assert 0 < m("pk2pc_in_doubt_oldest_age_seconds", name=name) < 600
    for kind in REASON_CLASSES:
        assert m("pk2pc_recovery_remaining", name=name, reason=kind) == 0
    assert m("pk2pc_recovery_resolved_total", name=name, decision="commit") == 0
    assert m("pk2pc_recovery_resolved_total", name=name, decision="rollback") == 0
    first_success = m("pk2pc_recovery_last_success_timestamp_seconds", name=name)
    assert started <= first_success <= time.time()
    assert 0 < m("pk2pc_recovery_duration_seconds", name=name) < 180

    # A dry run: would commit one, cannot conclude on the other without a fence.
    report = run(grace_seconds=0, dry_run=True)
    assert report.committed == [decided] and [r.gid for r in report.remaining] == [undecided]
    m = served.scrape()
    assert m("pk2pc_in_doubt", name=name) == 1
    assert m("pk2pc_recovery_remaining", name=name, reason="dry_run") == 1
    assert m("pk2pc_recovery_resolved_total", name=name, decision="commit") == 0
    assert m("pk2pc_recovery_last_success_timestamp_seconds", name=name) == first_success

    report = run(grace_seconds=0)
    assert report.committed == [decided] and report.rolled_back == [undecided]
    m = served.scrape()
    assert m("pk2pc_in_doubt", name=name) == 0
    assert m("pk2pc_in_doubt_oldest_age_seconds", name=name) == 0
    assert m("pk2pc_recovery_remaining", name=name, reason="dry_run") == 0
    assert m("pk2pc_recovery_resolved_total", name=name, decision="commit") == 1
    assert m("pk2pc_recovery_resolved_total", name=name, decision="rollback") == 1
    assert m("pk2pc_recovery_last_success_timestamp_seconds", name=name) >= first_success
    assert env.prepared() == [] and env.ids() == [101]


# -- the command line -------------------------------------------------------------------


@dataclass
class Pushed:
    method: str
    path: str
    body: str


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[Pushed]]]:
    """A local HTTP receiver standing for a Pushgateway: records each request."""
    received: list[Pushed] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            received.append(Pushed(self.command, self.path,
                                   self.rfile.read(size).decode()))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def recover_cli(env: Env, *extra: str, postgres: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recovery", "--postgres", postgres or env.dsn,
         "--bootstrap-servers", env.bootstrap, "--name", env.name, "--grace-seconds", "0",
         "--json", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)


def test_recovery_command_metrics_file_and_pushgateway(
        env: Env, orders: str, tmp_path: Path, pushgateway: tuple[str, list[Pushed]]) -> None:
    url, pushed = pushgateway
    faults = Faults()
    coord = env.coordinator(**faults.config())
    leave_in_doubt(env, coord, faults, env.topic())
    path = tmp_path / "pk2pc_recovery.prom"
    name = env.name

    started = time.time()
    done = recover_cli(env, "--metrics-file", str(path), "--pushgateway", url)
    assert done.returncode == 0, done.stderr
    m = Samples(path.read_text())
    assert m("pk2pc_recovery_resolved_total", name=name, decision="commit") == 1
    assert m("pk2pc_recovery_resolved_total", name=name, decision="rollback") == 1
    assert m("pk2pc_in_doubt", name=name) == 0
    assert m("pk2pc_recovery_remaining", name=name, reason="other") == 0
    first_success = m("pk2pc_recovery_last_success_timestamp_seconds", name=name)
    assert started <= first_success <= time.time()
    assert m("pk2pc_recovery_duration_seconds", name=name) > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    assert len(pushed) == 1
    assert pushed[0].method == "PUT"
    assert pushed[0].path == f"/metrics/job/pk2pc_recovery/name/{name}"
    assert Samples(pushed[0].body).text and Samples(pushed[0].body)(
        "pk2pc_recovery_resolved_total", name=name, decision="rollback") == 1

    # Nothing left to do: the counters continue from the file, the success time moves.
    done = recover_cli(env, "--metrics-file", str(path))
    assert done.returncode == 0, done.stderr
    m = Samples(path.read_text())
    assert m("pk2pc_recovery_resolved_total", name=name, decision="commit") == 1
    assert m("pk2pc_recovery_resolved_total", name=name, decision="rollback") == 1
    assert m("pk2pc_recovery_last_success_timestamp_seconds", name=name) >= first_success

    # A run that cannot start (PostgreSQL unreachable) publishes nothing: the last
    # success time stops moving, which is what the alert watches.
    before = path.read_text()
    mtime = os.stat(path).st_mtime_ns
    done = recover_cli(env, "--metrics-file", str(path), "--pushgateway", url,
                       postgres="postgresql://nobody@127.0.0.1:1/none?connect_timeout=5")
    assert done.returncode == 2, done.stderr
    assert path.read_text() == before and os.stat(path).st_mtime_ns == mtime
    assert len(pushed) == 1
    assert env.ids() == [101] and env.prepared() == []
