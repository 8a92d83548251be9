"""Start-up checks fail fast with clear, typed errors."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from psycopg import sql
from psycopg_pool import ConnectionPool

from coordinator import (
    ConfigurationError,
    Coordinator,
    DecisionTopic,
    DecisionTopicMisconfigured,
    Phase,
    PreparedTransactionsDisabled,
    ServiceUnavailable,
    Status,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


# -- a second PostgreSQL cluster with max_prepared_transactions = 0 ----------------------


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def _pg_bin(tool: str) -> str:
    found = shutil.which(tool) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None
    )
    if not found:
        pytest.fail(f"{tool} not found (install the PostgreSQL server binaries)", pytrace=False)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def no_prepare_dsn() -> Iterator[str]:
    """A throw-away PostgreSQL cluster started with max_prepared_transactions = 0."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = tempfile.mkdtemp(prefix="pk2pc-noprep-")
    data = os.path.join(tmp, "data")
    if as_postgres:
        shutil.chown(tmp, "postgres", "postgres")
    port = _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_postgres, *cmd], capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed: {done.stdout}\n{done.stderr}", pytrace=False)

    pg_ctl = _pg_bin("pg_ctl")
    started = False
    try:
        run(_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
            "-E", "UTF8")
        run(pg_ctl, "-D", data, "-l", os.path.join(tmp, "log"), "-w", "-t", "60",
            "-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={tmp} "
                  "-c max_prepared_transactions=0 -c fsync=off",
            "start")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_postgres, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_max_prepared_transactions_zero(env: Env, no_prepare_dsn: str) -> None:
    with psycopg.connect(no_prepare_dsn) as conn:
        assert conn.execute("SHOW max_prepared_transactions").fetchone() == ("0",)
    coord = Coordinator(no_prepare_dsn, env.kafka, env.name, instance=env.instance,
                        config=env.config())
    with pytest.raises(PreparedTransactionsDisabled) as info:
        coord.open()
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert err.phase is Phase.STARTUP and err.gid is None
    assert "max_prepared_transactions" in str(err)
    # PostgreSQL is checked first: nothing was done in Kafka.
    assert not env.topic_exists(env.decision_topic.name)
    with pytest.raises(Exception, match="not open"), coord.transaction():
        pass


# -- unreachable services, wrong credentials, missing privileges -------------------------


def test_broker_unreachable(env: Env) -> None:
    cfg = env.config(kafka_timeout=2.0, startup_timeout=5.0)
    coord = Coordinator(env.dsn, {"bootstrap.servers": "127.0.0.1:1"}, env.name,
                        instance=env.instance, config=cfg)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        coord.open()
    assert time.monotonic() - started < 15
    assert info.value.phase is Phase.STARTUP
    assert "Kafka" in str(info.value)
    # Everything it took was given back: the same instance opens against the real broker.
    ok = env.coordinator()
    with ok.transaction() as tx:
        tx.execute("SELECT 1")
    assert tx.status is Status.COMMITTED


@pytest.mark.parametrize("what", ["unreachable", "no such role", "no such database"])
def test_postgres_unreachable_or_rejected(
    env: Env, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"
    params = psycopg.conninfo.conninfo_to_dict(env.dsn)
    if what == "unreachable":
        params.update(host="127.0.0.1", port=1)
    elif what == "no such role":
        params.update(user=f"nobody_{uuid.uuid4().hex[:8]}", password=secret)
    else:
        params.update(dbname=f"nodb_{uuid.uuid4().hex[:8]}", password=secret)
    dsn = psycopg.conninfo.make_conninfo("", **params)
    coord = Coordinator(dsn, env.kafka, env.name, instance=env.instance,
                        config=env.config(startup_timeout=3.0, connection_timeout=3.0))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        coord.open()
    assert time.monotonic() - started < 15
    assert info.value.phase is Phase.STARTUP
    assert "PostgreSQL" in str(info.value)
    # No credentials in the error or the logs.
    assert secret not in str(info.value)
    assert secret not in caplog.text
    assert not env.topic_exists(env.decision_topic.name)


def test_missing_privilege_is_configuration_error(env: Env, pg_dsn: str) -> None:
    role = f"app_{uuid.uuid4().hex[:8]}"
    env.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        dsn = psycopg.conninfo.make_conninfo(env.dsn, user=role)
        coord = Coordinator(dsn, env.kafka, env.name, instance=env.instance,
                            config=env.config())
        with pytest.raises(ConfigurationError) as info:
            coord.open()
        assert type(info.value) is ConfigurationError
        assert "privilege" in str(info.value)
        assert info.value.phase is Phase.STARTUP
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_bad_kafka_configuration(env: Env) -> None:
    with pytest.raises(ConfigurationError, match=r"bootstrap\.servers"):
        Coordinator(env.dsn, {}, env.name)
    with pytest.raises(ConfigurationError, match=r"transactional\.id"):
        Coordinator(env.dsn, {**env.kafka, "transactional.id": "mine"}, env.name)
    for bad in ("", "a:b", "-x", "x" * 49, "ünï"):
        with pytest.raises(ConfigurationError, match="invalid name"):
            Coordinator(env.dsn, env.kafka, bad)
        if bad:  # instance="" means the default instance id
            with pytest.raises(ConfigurationError, match="invalid instance"):
                Coordinator(env.dsn, env.kafka, "ok", instance=bad)


# -- the decision topic --------------------------------------------------------------------


def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = admin.describe_configs([res])[res].result(30)
    return {k: str(v.value) for k, v in configs.items()}


def test_decision_topic_created_with_time_retention(env: Env) -> None:
    assert not env.topic_exists(env.decision_topic.name)
    env.coordinator()
    cfg = _topic_config(env.bootstrap, env.decision_topic.name)
    assert cfg["cleanup.policy"] == "delete"
    assert int(cfg["retention.ms"]) == 7 * 24 * 3600 * 1000
    assert cfg["retention.bytes"] == "-1"
    md = AdminClient({"bootstrap.servers": env.bootstrap}).list_topics(
        env.decision_topic.name, timeout=30)
    t = md.topics[env.decision_topic.name]
    assert len(t.partitions) == env.decision_topic.partitions
    brokers = len(md.brokers)
    assert all(len(p.replicas) == min(3, brokers) for p in t.partitions.values())
    # A second start finds it and accepts it.
    env.close()
    env.coordinator()


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"cleanup.policy": "compact"}, "cleanup.policy"),
        ({"cleanup.policy": "compact,delete"}, "cleanup.policy"),
        ({"retention.ms": str(3600 * 1000)}, "retention.ms"),
        ({"retention.bytes": str(1 << 30), "retention.ms": str(30 * 24 * 3600 * 1000)},
         "retention.bytes"),
        ({"unclean.leader.election.enable": "true"}, "unclean.leader.election.enable"),
    ],
    ids=["compact", "compact-delete", "short-retention", "size-retention", "unclean"],
)
def test_decision_topic_misconfigured(env: Env, config: dict[str, str], complaint: str) -> None:
    name = env.topic(partitions=2, config=config)
    coord = Coordinator(
        env.dsn, env.kafka, env.name, instance=env.instance,
        config=env.config(decision_topic=DecisionTopic(name=name)),
    )
    with pytest.raises(DecisionTopicMisconfigured) as info:
        coord.open()
    assert isinstance(info.value, ConfigurationError)
    assert info.value.phase is Phase.STARTUP
    assert name in str(info.value) and complaint in str(info.value)
    # Nothing half-open stays behind: the same instance can start with a good topic.
    env.coordinator()


def test_decision_topic_with_infinite_retention_is_accepted(env: Env) -> None:
    name = env.topic(partitions=2, config={"retention.ms": "-1"})
    env.coordinator(decision_topic=DecisionTopic(name=name))


# -- instances -----------------------------------------------------------------------------


def test_same_name_and_instance_twice_is_refused(env: Env) -> None:
    first = env.coordinator()
    second = Coordinator(env.dsn, env.kafka, env.name, instance=env.instance,
                         config=env.config())
    with pytest.raises(ConfigurationError) as info:
        second.open()
    assert env.instance in str(info.value)
    assert info.value.phase is Phase.STARTUP
    # The first one was not disturbed (its producers were not fenced).
    topic = env.topic()
    with first.transaction() as tx:
        tx.execute("SELECT 1")
        tx.produce(topic, value=b"still mine")
    assert tx.status is Status.COMMITTED
    assert [m.value for m in env.read(topic)] == [b"still mine"]
    # Another instance of the same service is fine, and so is a restart after close.
    env.coordinator(instance=env.instance + "-b")
    first.close()
    env.coordinator()


@pytest.mark.sync_only  # a psycopg_pool.ConnectionPool; the async form: test_async_coordinator
def test_borrowed_pool_is_not_closed(env: Env) -> None:
    env.execute("CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
    topic = env.topic()
    with ConnectionPool(env.dsn, min_size=1, max_size=4, open=True) as pool:
        coord = env.coordinator(postgres=pool)
        with coord.transaction() as tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            tx.produce(topic, value=b"1")
        assert tx.status is Status.COMMITTED
        coord.close()
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("SELECT id FROM orders").fetchall() == [(1,)]
    assert [m.value for m in env.read(topic)] == [b"1"]


def test_close_is_idempotent_and_reopen_works(env: Env) -> None:
    coord = env.coordinator()
    coord.close()
    coord.close()
    coord.open()
    with contextlib.closing(coord), coord.transaction() as tx:
        tx.execute("SELECT 1")
    assert tx.status is Status.COMMITTED
