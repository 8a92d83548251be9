"""Pytest plugin (loaded by `-p tests.plugins.services`): real PostgreSQL and Kafka for tests.

Session fixtures `pg_dsn` and `kafka_bootstrap` find the services in this order:
  (a) the environment: PG_DSN / KAFKA_BOOTSTRAP_SERVERS;
  (b) testcontainers, when a Docker engine answers (PostgreSQL with
      max_prepared_transactions=128, the apache/kafka image in KRaft mode);
  (c) the local stack: `scripts/stack up` (a no-op when it already runs), then its `env`.
A test that needs a service which cannot be had FAILS with the reason; it is never skipped,
in CI (CI=true) or anywhere else. Tests using these fixtures get the `integration` marker.
With PK2PC_NO_SKIPS=1 (`.ci/run` sets it) a test that skips itself for any other reason
(it restarts a broker of the local stack only, it needs faketime) FAILS instead: CI runs
every test, a skipped one proves nothing.

Per-test isolation: `pg_db` is a fresh database (dropped afterwards, prepared transactions in
it rolled back first), `topic_factory` makes topics with unique names, `unique_name` is a
name no other test uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.plugins.kafka_helpers import create_topic, delete_topics

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack"
KAFKA_PROBE = ROOT / "scripts" / "kafka_probe.py"
POSTGRES_IMAGE = "postgres:15"
KAFKA_IMAGE = "apache/kafka:4.1.1"
SERVICE_FIXTURES = frozenset({"pg_dsn", "kafka_bootstrap", "pg_db", "topic_factory"})
STACK_UP_TIMEOUT = 1800.0


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With PK2PC_NO_SKIPS=1, a skip is a failure (with the skip's reason)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (report.skipped and os.environ.get("PK2PC_NO_SKIPS") == "1"
            and not hasattr(report, "wasxfail")):
        report.outcome = "failed"
        report.longrepr = f"skipped, but PK2PC_NO_SKIPS=1 (CI runs every test): {report.longrepr}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a service is an integration test, marked or not."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# --- where the services come from ------------------------------------------------------------


def docker_reachable(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers GET /_ping (DOCKER_HOST or the default socket)."""
    url = urllib.parse.urlparse(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    address: str | tuple[str, int]
    if url.scheme == "unix":
        family, address = socket.AF_UNIX, url.path
    elif url.scheme in ("tcp", "http") and url.hostname:
        family, address = socket.AF_INET, (url.hostname, url.port or 2375)
    else:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(64)
    except OSError:
        return False


def _run_stack(*args: str) -> str:
    try:
        done = subprocess.run([str(STACK), *args], capture_output=True, text=True,
                              timeout=STACK_UP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    else:
        error = ""
    if error:
        _fail(f"`scripts/stack {' '.join(args)}` could not run: {error}")
    if done.returncode != 0:
        _fail(f"`scripts/stack {' '.join(args)}` failed (exit {done.returncode}):\n"
              f"{done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="session")
def local_stack() -> dict[str, str]:
    """Start the local stack when needed; its PG_DSN and KAFKA_BOOTSTRAP_SERVERS."""
    _run_stack("up")
    env: dict[str, str] = {}
    for line in _run_stack("env").splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


@contextlib.contextmanager
def _postgres_container() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the `community` split
        from testcontainers.postgres import PostgresContainer
    container = PostgresContainer(POSTGRES_IMAGE, driver=None).with_command(
        "postgres -c max_prepared_transactions=128 -c max_connections=300"
    )
    with container:
        yield container.get_connection_url()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    """apache/kafka as a single KRaft node, published on a fixed free host port."""
    from testcontainers.core.container import DockerContainer

    port = _free_port()
    container = DockerContainer(KAFKA_IMAGE)
    host = container.get_docker_client().host()
    container.with_bind_ports(9092, port).with_envs(
        KAFKA_NODE_ID="1",
        KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{host}:{port}",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
        KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
    )
    with container:
        bootstrap = f"{host}:{port}"
        _wait_transactional_kafka(bootstrap, timeout=120.0)
        yield bootstrap


def _wait_transactional_kafka(bootstrap: str, timeout: float) -> None:
    """Retry the stack's readiness probe (a transactional commit) until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            [sys.executable, str(KAFKA_PROBE), "--bootstrap", bootstrap, "--timeout", "15"],
            capture_output=True, text=True, check=False,
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            _fail(f"Kafka container at {bootstrap} not ready: {done.stdout.strip()}")
        time.sleep(1)


# --- checks: fail clearly instead of somewhere inside a test -------------------------------------


def _check_postgres(dsn: str, source: str) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute("SHOW max_prepared_transactions").fetchone()
    except psycopg.Error as exc:
        error = str(exc)
    else:
        error = ""
    if error:
        _fail(f"PostgreSQL from {source} ({dsn}) is not usable: {error}")
    if row is None or int(row[0]) < 1:
        _fail(f"PostgreSQL from {source} ({dsn}) has max_prepared_transactions = "
              f"{row and row[0]}; two-phase commit needs it > 0 (for example 128)")


def _check_kafka(bootstrap: str, source: str) -> None:
    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=10)
    except KafkaException as exc:
        error = str(exc)
    else:
        return
    _fail(f"Kafka from {source} ({bootstrap}) is not reachable: {error}")


# --- session fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A superuser DSN of a PostgreSQL with max_prepared_transactions > 0."""
    if dsn := os.environ.get("PG_DSN"):
        _check_postgres(dsn, "$PG_DSN")
        yield dsn
    elif docker_reachable():
        with _postgres_container() as dsn:
            _check_postgres(dsn, "a testcontainers container")
            yield dsn
    else:
        dsn = request.getfixturevalue("local_stack")["PG_DSN"]
        _check_postgres(dsn, "scripts/stack")
        yield dsn


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """bootstrap.servers of a Kafka that supports transactions."""
    if bootstrap := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        _check_kafka(bootstrap, "$KAFKA_BOOTSTRAP_SERVERS")
        yield bootstrap
    elif docker_reachable():
        with _kafka_container() as bootstrap:
            yield bootstrap
    else:
        bootstrap = request.getfixturevalue("local_stack")["KAFKA_BOOTSTRAP_SERVERS"]
        _check_kafka(bootstrap, "scripts/stack")
        yield bootstrap


# --- per-test isolation ------------------------------------------------------------------------


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test (or run) uses: test name plus random hex, [a-z0-9-] only."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48]
    return f"{test}-{secrets.token_hex(4)}"


@pytest.fixture
def pg_db(pg_dsn: str) -> Iterator[str]:
    """The DSN of a fresh database `t_<random>`, dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(pg_dsn, dbname=name)
    try:
        yield dsn
    finally:
        drop_database(pg_dsn, dsn, name)


def drop_database(admin_dsn: str, dsn: str, name: str) -> None:
    """End sessions, roll back transactions prepared in the database, then drop it."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        rows = admin.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s",
                             (name,)).fetchall()
    if rows:  # ROLLBACK PREPARED only works from inside the database that prepared it
        with psycopg.connect(dsn, autocommit=True) as conn:
            for (gid,) in rows:
                conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def topic_factory(kafka_bootstrap: str, unique_name: str) -> Iterator[Callable[..., str]]:
    """`topic_factory(prefix="topic", *, partitions=1, replication_factor=-1, config=None)`
    creates a topic with a unique name, waits until it is visible and returns the name.
    The topics are deleted (best effort) after the test."""
    created: list[str] = []

    def create(prefix: str = "topic", *, partitions: int = 1, replication_factor: int = -1,
               config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{unique_name}-{len(created)}"
        create_topic(kafka_bootstrap, name, partitions=partitions,
                     replication_factor=replication_factor, config=config)
        created.append(name)
        return name

    yield create
    delete_topics(kafka_bootstrap, created)
