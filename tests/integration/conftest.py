"""Helpers for the coordinator's integration tests: look at both sides.

Built on the session plugin's fixtures (``pg_dsn``, ``kafka_bootstrap``,
``pg_db``, ``topic_factory``, ``unique_name``). The :class:`Env` fixture gives
each test a fresh database, a unique coordinator name/instance, its own
decision topic, and ways to read what PostgreSQL holds and what a
``read_committed`` consumer sees.

Kafka is read with ``tests.plugins.kafka_helpers.read_committed``: everything a
``read_committed`` consumer sees up to the high watermark at the time of the
call, waiting out commit markers still on their way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from psycopg import sql

from coordinator import (
    AsyncCoordinator,
    Coordinator,
    CoordinatorConfig,
    DecisionRecord,
    DecisionTopic,
    GroupCommit,
)
from coordinator.gid import parse
from tests.plugins.drivers import Blocking, EventLoopThread
from tests.plugins.kafka_helpers import Record, read_committed


def topic_exists(bootstrap: str, topic: str) -> bool:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    t = md.topics.get(topic)
    return t is not None and t.error is None


@dataclass
class Env:
    """One test's world: a fresh database, unique names, its own decision topic."""

    dsn: str
    admin_dsn: str
    bootstrap: str
    name: str
    instance: str
    decision_topic: DecisionTopic
    topic_factory: Callable[..., str]
    driver: str = "sync"
    """``sync``: :class:`Coordinator`; ``async``: :class:`AsyncCoordinator` behind a
    blocking view (``tests/plugins/drivers.py``)."""
    _coordinators: list[Any] = field(default_factory=list)
    _loop: EventLoopThread | None = None

    @property
    def kafka(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap}

    @property
    def dbname(self) -> str:
        return str(psycopg.conninfo.conninfo_to_dict(self.dsn)["dbname"])

    def config(self, **overrides: Any) -> CoordinatorConfig:
        overrides.setdefault("decision_topic", self.decision_topic)
        overrides.setdefault("kafka_timeout", 10.0)
        overrides.setdefault("startup_timeout", 30.0)
        return CoordinatorConfig(**overrides)

    def coordinator(self, *, instance: str | None = None, name: str | None = None,
                    postgres: Any = None, **overrides: Any) -> Coordinator:
        """An open coordinator of this test's driver, closed at teardown."""
        coord = self.new_coordinator(instance=instance, name=name, postgres=postgres,
                                     **overrides)
        coord.open()
        self._coordinators.append(coord)
        return coord

    def new_coordinator(self, *, instance: str | None = None, name: str | None = None,
                        postgres: Any = None, **overrides: Any) -> Coordinator:
        """A coordinator of this test's driver, not opened (the caller closes it)."""
        kind: Any = Coordinator if self.driver == "sync" else AsyncCoordinator
        made = kind(
            postgres=postgres if postgres is not None else self.dsn,
            kafka=self.kafka,
            name=name or self.name,
            instance=instance or self.instance,
            config=self.config(**overrides),
        )
        if self.driver == "sync":
            return made  # type: ignore[no-any-return]
        if self._loop is None:
            self._loop = EventLoopThread()
        view: Any = Blocking(made, self._loop)
        return view  # type: ignore[no-any-return]

    def recover_own(self, coord: Any, config: Any = None) -> Any:
        """``recovery.recover_own`` (or ``arecover_own`` for the async driver)."""
        import recovery

        if self.driver == "sync":
            return recovery.recover_own(coord, self.kafka, config)
        assert self._loop is not None
        return self._loop.run(recovery.arecover_own(coord.wrapped, self.kafka, config))

    def topic(self, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        return self.topic_factory(partitions=partitions, config=config)

    # -- PostgreSQL side --------------------------------------------------------

    def execute(self, query: str | sql.SQL | sql.Composed,
                params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def ids(self, table: str = "orders") -> list[int]:
        """The ``id`` column of a table, sorted (duplicates kept)."""
        return [r[0] for r in self.execute(
            sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(table))
        )]

    def prepared(self) -> list[str]:
        """gids prepared in this test's database (asked through another database,
        so it works while this one refuses connections)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = %s ORDER BY gid",
                (self.dbname,),
            ).fetchall()
        return [r[0] for r in rows]

    def idempotency_rows(self, table: str = "pk2pc_idempotency") -> dict[str, str | None]:
        rows = self.execute(
            sql.SQL("SELECT idempotency_key, gid FROM {}").format(sql.Identifier(table))
        )
        return {k: g for k, g in rows}

    def terminate(self, pid: int) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
        assert row and row[0], f"backend {pid} not terminated"

    def block_connections(self) -> None:
        """Refuse new connections to this database and end the existing ones."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false")
                         .format(sql.Identifier(self.dbname)))
            conn.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.dbname,),
            )

    def allow_connections(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true")
                         .format(sql.Identifier(self.dbname)))

    # -- Kafka side -------------------------------------------------------------

    def topic_exists(self, topic: str) -> bool:
        return topic_exists(self.bootstrap, topic)

    def read(self, topic: str, timeout: float = 60.0) -> list[Record]:
        return read_committed(self.bootstrap, topic, timeout)

    def decisions(self, topic: str | None = None, strict: bool = True) -> dict[str, Record]:
        """The decision records visible to a read_committed consumer, by gid.
        ``strict``: fail on anything that is not a decision record."""
        out: dict[str, Record] = {}
        for rec in self.read(topic or self.decision_topic.name):
            decision = DecisionRecord.decode(rec.key, rec.value)
            if decision is None and not strict:
                continue
            assert decision is not None, f"foreign record in the decision topic: {rec}"
            assert decision.gid not in out, f"two decision records for {decision.gid}"
            out[decision.gid] = rec
        return out

    def assert_decided(self, gid: str, topic: str | None = None) -> None:
        """A decision record for ``gid`` sits in the partition the gid names."""
        decisions = self.decisions(topic, strict=topic is None)
        assert gid in decisions, f"no decision record for {gid}"
        assert decisions[gid].partition == parse(gid).partition

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the async driver's event loop (started if needed)."""
        if self._loop is None:
            self._loop = EventLoopThread()
        return self._loop.run(coro)

    def close_coordinators(self) -> None:
        for coord in reversed(self._coordinators):
            coord.close()
        self._coordinators.clear()

    def close(self) -> None:
        self.close_coordinators()
        if self._loop is not None:
            self._loop.close()
            self._loop = None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules with ``BOTH_DRIVERS = True`` run each ``env`` test with both drivers."""
    if ("env" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_DRIVERS", False)
            and metafunc.definition.get_closest_marker("sync_only") is None):
        metafunc.parametrize("driver", ["sync", "async"], indirect=True)


@pytest.fixture
def driver(request: pytest.FixtureRequest) -> str:
    """The coordinator driver of the test: ``sync`` unless parametrized."""
    return str(getattr(request, "param", "sync"))


@pytest.fixture
def env(
    pg_dsn: str, pg_db: str, kafka_bootstrap: str, topic_factory: Callable[..., str],
    unique_name: str, driver: str,
) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:10]
    e = Env(
        dsn=pg_db,
        admin_dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        name=f"t{suffix}",
        instance=f"i{suffix}",
        decision_topic=DecisionTopic(name=f"pk2pc.test-decisions.{suffix}", partitions=3),
        topic_factory=topic_factory,
        driver=driver,
    )
    try:
        yield e
    finally:
        e.close()
        with contextlib.suppress(Exception):
            e.allow_connections()
        # Leave nothing prepared behind: it would block dropping the database.
        with psycopg.connect(pg_db, autocommit=True) as conn:
            for gid in e.prepared():
                conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        if topic_exists(kafka_bootstrap, e.decision_topic.name):
            for fut in admin.delete_topics([e.decision_topic.name],
                                           operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    fut.result(30)


@pytest.fixture(params=[None, GroupCommit()], ids=["per-op", "group"])
def group_commit(request: pytest.FixtureRequest) -> GroupCommit | None:
    """Both commit modes: one Kafka transaction per operation, or group commit."""
    mode: GroupCommit | None = request.param
    return mode


@pytest.fixture
def engine(env: Env) -> Iterator[Any]:
    """An SQLAlchemy engine of the test's driver kind, with the model's tables
    (``tests/integration/orm.py``); disposed after the test's coordinators close."""
    from tests.integration.orm import make_engine

    made = make_engine(env)
    yield made
    env.close_coordinators()  # first: their connections belong to the engine
    if env.driver == "sync":
        made.dispose()
    else:
        env.run(made.dispose())  # on the loop its connections were made on


@pytest.fixture
def orders(env: Env) -> str:
    """A business table ``orders(id int primary key, total int)`` in the test database."""
    env.execute("CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")
    return "orders"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; continued, killed and reaped at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(30)
        if p.stdout is not None:
            p.stdout.close()
