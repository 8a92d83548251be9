#!/usr/bin/env python3
"""Throughput and latency of the coordinator against the alternatives (issue 7).

The business operation is always the same: one INSERT of a row and one 1 KB
Kafka message. It goes through four paths, side by side in one process tree:

``naive``   (a) commit PostgreSQL, then produce with an idempotent producer
            (``acks=all``) and wait for the delivery report. Unsafe: a crash
            between the two loses the message.
``outbox``  (b) transactional outbox: the business transaction also inserts an
            outbox row; a relay process polls ``SELECT ... FOR UPDATE SKIP
            LOCKED LIMIT n``, publishes the rows in one Kafka transaction and
            deletes them after the Kafka commit. Measured end to end: an
            operation completes when a ``read_committed`` consumer (another
            process) receives its message.
``per_op``  (c) the coordinator, one Kafka transaction per operation.
``group``   (d) the coordinator with group commit.

(c) and (d) use the same producer pool size. Every path runs at each
concurrency (threads, closed loop); the first ``--warmup`` seconds of every
measurement are excluded, and each figure is the median of ``--runs`` runs,
interleaved (run 1 of every path and concurrency, then run 2, ...) so that
drift on a shared machine hits every path alike.

Usage (through ``scripts/bench``, which starts the local stack)::

    scripts/bench                 # full benchmark, writes docs/bench-results.*
    scripts/bench --quick         # under two minutes, writes bench-results/
    scripts/bench --memory 300000 # RSS of the group-commit path over many operations

The services come from ``PG_DSN`` and ``KAFKA_BOOTSTRAP_SERVERS``. The last
line of the main mode is::

    twopc_group_vs_naive=R twopc_group_vs_outbox=R twopc_group_vs_per_op=R

(throughput ratios at concurrency 32, or the highest concurrency measured).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

import coordinator  # noqa: E402
from coordinator import Coordinator, CoordinatorConfig, GroupCommit  # noqa: E402
from coordinator.gid import GID_PREFIX  # noqa: E402

log = logging.getLogger("bench")

PATHS = ("naive", "outbox", "per_op", "group")
REFERENCE_PATHS = ("pg_commit", "pg_2pc")  # PostgreSQL alone, no Kafka: only with --paths
ALL_PATHS = PATHS + REFERENCE_PATHS
LABELS = {
    "naive": "(a) naive dual-write",
    "outbox": "(b) outbox + relay (end to end)",
    "per_op": "(c) 2PC, Kafka txn per op",
    "group": "(d) 2PC, group commit",
    "pg_commit": "(ref) PostgreSQL only: INSERT + COMMIT",
    "pg_2pc": "(ref) PostgreSQL only: INSERT + PREPARE + COMMIT PREPARED",
}
PAYLOAD = bytes(range(256)) * 4  # 1 KB
COORD_NAME = "bench"
PID_LABELS: dict[int, str] = {os.getpid(): "bench process"}
SERVICE_PORTS: tuple[int, int] = (0, 0)  # PostgreSQL, Kafka: set by env_services()
DEFAULT_OUT = ROOT / "docs"
QUICK_OUT = ROOT / "bench-results"


# -- environment ---------------------------------------------------------------


def env_services() -> tuple[str, str]:
    dsn = os.environ.get("PG_DSN")
    brokers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not dsn or not brokers:
        sys.exit("set PG_DSN and KAFKA_BOOTSTRAP_SERVERS (scripts/bench does it: "
                 "eval \"$(scripts/stack env)\")")
    global SERVICE_PORTS
    pg_port = int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)
    kafka_port = int(brokers.split(",")[0].rsplit(":", 1)[1])
    SERVICE_PORTS = (pg_port, kafka_port)
    return dsn, brokers


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def create_topics(brokers: str, names: Sequence[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
        operation_timeout=30,
    )
    for _name, fut in futures.items():
        try:
            fut.result(30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        # wait until metadata shows every partition with a leader
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=10)
        ok = all(
            n in md.topics and md.topics[n].error is None
            and len(md.topics[n].partitions) == partitions
            and all(p.leader >= 0 for p in md.topics[n].partitions.values())
            for n in names
        )
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"topics {names} not ready")


def delete_topics(brokers: str, names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": brokers})
    for fut in admin.delete_topics(list(names), operation_timeout=30).values():
        with contextlib.suppress(Exception):
            fut.result(30)


class Tables:
    """The business table and the outbox table of one bench invocation."""

    def __init__(self, dsn: str, suffix: str) -> None:
        self.dsn = dsn
        self.rows = f"pk2pc_bench_rows_{suffix}"
        self.outbox = f"pk2pc_bench_outbox_{suffix}"
        self.insert_row = sql.SQL("INSERT INTO {} (op_id, amount) VALUES (%s, %s)").format(
            sql.Identifier(self.rows))
        self.insert_outbox = sql.SQL(
            "INSERT INTO {} (op_id, topic, payload) VALUES (%s, %s, %s)").format(
            sql.Identifier(self.outbox))

    def create(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (op_id text PRIMARY KEY, amount int NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())").format(
                sql.Identifier(self.rows)))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, op_id text NOT NULL, "
                "topic text NOT NULL, payload bytea NOT NULL)").format(
                sql.Identifier(self.outbox)))

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for t in (self.rows, self.outbox):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def make_pool(dsn: str, size: int, name: str) -> ConnectionPool[Any]:
    pool: ConnectionPool[Any] = ConnectionPool(
        dsn, min_size=size, max_size=size, open=False, name=name, timeout=60)
    pool.open(wait=True, timeout=60)
    return pool


def rollback_own_prepared(dsn: str, instances: Sequence[str]) -> int:
    """Roll back prepared transactions left by this invocation (only after errors)."""
    if not instances:
        return 0
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
        for (gid,) in rows:
            ours = any(str(gid).startswith(f"{GID_PREFIX}:{COORD_NAME}:{i}:") for i in instances)
            if ours or str(gid).startswith(f"pk2pc-bench-ref-{os.getpid()}-"):
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
                    n += 1
    return n


# -- machine-wide CPU accounting --------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """Cores busy machine-wide and cores used by this process over an interval."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, _ = _cpu_jiffies()
        t = os.times()
        self.proc0 = t.user + t.system

    def read(self) -> tuple[float, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        busy, _ = _cpu_jiffies()
        t = os.times()
        hz = os.sysconf("SC_CLK_TCK")
        return (busy - self.busy0) / hz / dt, (t.user + t.system - self.proc0) / dt


_LABELS_CACHE: dict[int, str] = {}


def _read(path: str, binary: bool = False) -> Any:
    with open(path, "rb" if binary else "r") as f:
        return f.read()


def _service_label(pid: int, comm: str, cmdline: list[bytes], ppid: int) -> str:
    """'kafka'/'postgres' for the services this bench uses, '... (other)' for the rest."""
    pg_port, kafka_port = SERVICE_PORTS
    try:
        if comm == "java" and any(b"kafka.Kafka" in a for a in cmdline):
            conf = next((a.decode() for a in reversed(cmdline) if a.endswith(b".properties")),
                        "")
            path = Path(os.readlink(f"/proc/{pid}/cwd")) / conf
            mine = f":{kafka_port}" in _read(str(path))
            return "kafka broker" if mine else "kafka broker (other)"
        if comm.startswith("postgres"):
            master = pid if b"-D" in cmdline else ppid
            args = _read(f"/proc/{master}/cmdline", True).split(b"\0")
            datadir = args[args.index(b"-D") + 1].decode()
            if not datadir.startswith("/"):
                datadir = str(Path(os.readlink(f"/proc/{master}/cwd")) / datadir)
            port = _read(f"{datadir}/postmaster.pid").splitlines()[3].strip()
            return "postgres" if port == str(pg_port) else "postgres (other)"
    except (OSError, ValueError, IndexError):
        pass
    if comm.startswith("postgres"):
        return "postgres (other)"
    return f"{comm} (other)"


def cpu_by_process() -> dict[tuple[int, str], float]:
    """CPU seconds (user+system) of every process now running, by (pid, label)."""
    out: dict[tuple[int, str], float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            raw = _read(f"/proc/{d}/stat")
            comm = raw[raw.index("(") + 1: raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            secs = (int(fields[11]) + int(fields[12])) / hz
            label = PID_LABELS.get(pid) or _LABELS_CACHE.get(pid)
            if label is None:
                cmdline = _read(f"/proc/{d}/cmdline", True).split(b"\0")
                label = _service_label(pid, comm, cmdline, int(fields[1]))
                _LABELS_CACHE[pid] = label
        except OSError:
            continue
        out[(pid, label)] = secs
    return out


def cpu_delta(before: dict[tuple[int, str], float],
              after: dict[tuple[int, str], float]) -> list[tuple[str, float]]:
    """CPU seconds used between two snapshots, by label (processes that exited in
    between are not counted), largest first."""
    sums: dict[str, float] = {}
    for key, secs in after.items():
        sums[key[1]] = sums.get(key[1], 0.0) + secs - before.get(key, 0.0)
    return sorted(((k, v) for k, v in sums.items() if v > 0), key=lambda kv: -kv[1])


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the outbox relay and the end-to-end consumer (separate processes) --------------


def relay_main(dsn: str, brokers: str, outbox: str, active: Any, stop: Any, batch: int,
               poll_s: float, counters: Any) -> None:
    """The outbox relay: poll, publish in one Kafka transaction, delete after the commit."""
    producer = Producer({
        "bootstrap.servers": brokers, "transactional.id": f"pk2pc-bench-relay-{uuid.uuid4()}",
        "enable.idempotence": True, "acks": "all", "linger.ms": 1,
    })
    producer.init_transactions(30)
    select = sql.SQL(
        "SELECT id, op_id, topic, payload FROM {} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    ).format(sql.Identifier(outbox))
    delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(sql.Identifier(outbox))
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            if not active.is_set():
                active.wait(0.1)
                continue
            with conn.transaction():
                rows = conn.execute(select, (batch,)).fetchall()
                if rows:
                    producer.begin_transaction()
                    for _id, op_id, topic, payload in rows:
                        while True:
                            try:
                                producer.produce(topic, value=bytes(payload), key=op_id.encode())
                                break
                            except BufferError:
                                producer.poll(0.01)
                    producer.commit_transaction(30)
                    conn.execute(delete, ([r[0] for r in rows],))
            if rows:
                with counters.get_lock():
                    counters[0] += len(rows)
                    counters[1] += 1
            else:
                time.sleep(poll_s)
    producer.flush(5)


def consumer_main(brokers: str, topic: str, partitions: int, stop: Any, pipe: Any) -> None:
    """A read_committed consumer recording when each operation's message arrives."""
    consumer = Consumer({
        "bootstrap.servers": brokers, "group.id": f"pk2pc-bench-{uuid.uuid4()}",
        "isolation.level": "read_committed", "enable.auto.commit": False,
        "fetch.wait.max.ms": 10, "enable.partition.eof": False,
    })
    consumer.assign([TopicPartition(topic, p, -2) for p in range(partitions)])  # beginning
    buf: list[tuple[str, float]] = []
    pipe.send("ready")
    try:
        while not stop.is_set():
            if pipe.poll():
                pipe.recv()
                pipe.send(buf)
                buf = []
            msg = consumer.poll(0.01)
            if msg is None:
                continue
            now = time.monotonic()
            msgs = [msg, *consumer.consume(1000, 0)]
            for m in msgs:
                if m.error() is None and m.key() is not None:
                    buf.append((m.key().decode(), now))
    finally:
        consumer.close()


# -- the four paths --------------------------------------------------------------


class Path_:
    name = ""

    def op(self, op_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Naive(Path_):
    """(a) commit PostgreSQL, then produce (idempotent, acks=all) and wait for delivery."""

    name = "naive"

    def __init__(self, dsn: str, brokers: str, tables: Tables, topic: str, pool_size: int,
                 producer_conf: dict[str, Any]) -> None:
        self.pool = make_pool(dsn, pool_size, "bench-naive")
        self.tables = tables
        self.topic = topic
        self.producer = Producer({
            "bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
            **producer_conf,
        })
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="naive-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(self.tables.insert_row, (op_id, 1))
        done = threading.Event()
        errors: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            done.set()

        while True:
            try:
                self.producer.produce(self.topic, value=PAYLOAD, key=op_id.encode(),
                                      on_delivery=on_delivery)
                break
            except BufferError:
                time.sleep(0.001)
        if not done.wait(30):
            raise TimeoutError("no delivery report within 30 s")
        if errors:
            raise RuntimeError(f"delivery failed: {errors[0]}")

    def close(self) -> None:
        self.producer.flush(10)
        self._stop.set()
        self._poller.join()
        self.pool.close()


class Outbox(Path_):
    """(b) the outbox row in the business transaction; the relay publishes later."""

    name = "outbox"

    def __init__(self, dsn: str, brokers: str, tables: Tables, topic: str, partitions: int,
                 pool_size: int, batch: int, poll_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.tables = tables
        self.topic = topic
        self.active = ctx.Event()
        self.stop = ctx.Event()
        self.counters = ctx.Array("q", 2)  # rows relayed, Kafka transactions
        self.relay = ctx.Process(
            target=relay_main, name="outbox-relay",
            args=(dsn, brokers, tables.outbox, self.active, self.stop, batch, poll_s,
                  self.counters))
        self.pipe, child = ctx.Pipe()
        self.consumer = ctx.Process(
            target=consumer_main, name="outbox-consumer",
            args=(brokers, topic, partitions, self.stop, child))
        self.relay.start()
        self.consumer.start()
        PID_LABELS[self.relay.pid or 0] = "outbox relay"
        PID_LABELS[self.consumer.pid or 0] = "outbox consumer"
        if not self.pipe.poll(60):
            raise RuntimeError("the outbox consumer did not start")
        self.pipe.recv()
        self.pool = make_pool(dsn, pool_size, "bench-outbox")

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(self.tables.insert_row, (op_id, 1))
            conn.execute(self.tables.insert_outbox, (op_id, self.topic, PAYLOAD))

    def arrivals(self) -> list[tuple[str, float]]:
        self.pipe.send("collect")
        got: list[tuple[str, float]] = self.pipe.recv()
        return got

    def close(self) -> None:
        self.stop.set()
        self.active.set()
        self.relay.join(15)
        self.consumer.join(15)
        for p in (self.relay, self.consumer):
            if p.is_alive():
                p.terminate()  # our own child, by its handle
        self.pool.close()


class TwoPC(Path_):
    """(c)/(d) the coordinator: one INSERT and one message in a coordinated transaction."""

    def __init__(self, name: str, dsn: str, brokers: str, tables: Tables, topic: str,
                 pool_size: int, instance: str, config: CoordinatorConfig,
                 kafka_conf: dict[str, Any] | None = None) -> None:
        self.name = name
        self.tables = tables
        self.topic = topic
        self.pool = make_pool(dsn, pool_size, f"bench-{name}")
        self.coord = Coordinator(self.pool, {"bootstrap.servers": brokers, **(kafka_conf or {})},
                                 COORD_NAME, instance=instance, config=config)
        self.coord.open()

    def op(self, op_id: str) -> None:
        with self.coord.transaction() as tx:
            tx.execute(self.tables.insert_row, (op_id, 1))
            tx.produce(self.topic, value=PAYLOAD, key=op_id.encode())

    def close(self) -> None:
        self.coord.close()
        self.pool.close()


class PgOnly(Path_):
    """Reference: the PostgreSQL side alone (no Kafka), plain COMMIT or 2PC."""

    def __init__(self, name: str, dsn: str, tables: Tables, pool_size: int) -> None:
        self.name = name
        self.tables = tables
        self.pool = make_pool(dsn, pool_size, f"bench-{name}")
        self.prefix = f"pk2pc-bench-ref-{os.getpid()}-"

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            if self.name == "pg_commit":
                conn.execute(self.tables.insert_row, (op_id, 1))
                return
            conn.autocommit = True
            gid = sql.Literal(self.prefix + op_id)
            conn.execute("BEGIN")
            conn.execute(self.tables.insert_row, (op_id, 1))
            conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(gid))
            conn.execute(sql.SQL("COMMIT PREPARED {}").format(gid))

    def close(self) -> None:
        self.pool.close()


class KafkaTxnCounter:
    """Counts Kafka transactions run by the coordinator (for the mean group size)."""

    def __init__(self) -> None:
        import coordinator._committer as committer_mod
        import coordinator._group as group_mod

        self.count = 0
        self.members = 0
        self._lock = threading.Lock()
        self._mods = (group_mod, committer_mod)
        self._orig = [m.run_transaction for m in self._mods]
        orig = self._orig[0]

        def counting(slot: Any, messages: Any, decisions: Any, *a: Any, **kw: Any) -> Any:
            with self._lock:
                self.count += 1
                self.members += len(decisions)
            return orig(slot, messages, decisions, *a, **kw)

        for m in self._mods:
            m.run_transaction = counting  # type: ignore[assignment]

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.count, self.members

    def restore(self) -> None:
        for m, o in zip(self._mods, self._orig, strict=True):
            m.run_transaction = o  # type: ignore[assignment]


# -- measurement -------------------------------------------------------------------


@dataclass
class RunResult:
    path: str
    concurrency: int
    run: int
    throughput: float
    p50_ms: float
    p99_ms: float
    completed: int
    errors: int
    machine_cores_busy: float
    bench_process_cores: float
    extra: dict[str, float] = field(default_factory=dict)
    cores_by_process: dict[str, float] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


_op_counter = itertools.count()


def run_closed_loop(
    op: Callable[[str], None], concurrency: int, warmup: float, duration: float, tag: str,
    first_error: list[BaseException],
) -> tuple[list[tuple[str, float, float]], int, float, float]:
    """Run ``op`` from ``concurrency`` threads; return (op_id, start, end) of every
    operation, the error count, and the measurement window."""
    records: list[list[tuple[str, float, float]]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)
    window: list[float] = []

    def worker(i: int) -> None:
        out = records[i]
        barrier.wait()
        end = window[1]
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            op_id = f"{tag}{next(_op_counter)}"
            try:
                op(op_id)
            except Exception as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(exc)
                time.sleep(0.01)
                continue
            out.append((op_id, t0, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(i,), name=f"w{i}", daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    start = time.monotonic()
    window[:] = [start + warmup, start + warmup + duration]
    barrier.wait()
    for t in threads:
        t.join()
    return [r for rs in records for r in rs], sum(errors), window[0], window[1]


def summarize(path: str, concurrency: int, run: int,
              ops: Sequence[tuple[str, float, float]], errors: int, w0: float, w1: float,
              cpu: tuple[float, float], extra: dict[str, float] | None = None) -> RunResult:
    inside = sorted(end - start for _, start, end in ops if w0 <= end <= w1)
    dur = w1 - w0
    return RunResult(
        path=path, concurrency=concurrency, run=run,
        throughput=len(inside) / dur,
        p50_ms=percentile(inside, 0.50) * 1e3, p99_ms=percentile(inside, 0.99) * 1e3,
        completed=len(inside), errors=errors,
        machine_cores_busy=cpu[0], bench_process_cores=cpu[1], extra=extra or {},
    )


def measure(path: Path_, concurrency: int, run: int, warmup: float, duration: float,
            counter: KafkaTxnCounter | None) -> RunResult:
    first_error: list[BaseException] = []
    tag = f"{path.name[0]}{concurrency}r{run}-"
    extra: dict[str, float] = {}
    relay0 = (0, 0)
    if isinstance(path, Outbox):
        path.arrivals()  # discard leftovers
        with path.counters.get_lock():
            relay0 = (path.counters[0], path.counters[1])
        path.active.set()
    before = counter.snapshot() if counter else (0, 0)
    procs0 = cpu_by_process()
    meter = CpuMeter()
    ops, errors, w0, w1 = run_closed_loop(path.op, concurrency, warmup, duration, tag,
                                          first_error)
    cpu = meter.read()
    elapsed = time.monotonic() - meter.t0
    by_proc = {k: v / elapsed for k, v in cpu_delta(procs0, cpu_by_process())}
    if counter is not None:
        after = counter.snapshot()
        txns = after[0] - before[0]
        if txns:
            extra["kafka_txns_per_s"] = txns / (w1 - w0 + warmup)
            extra["mean_group_size"] = (after[1] - before[1]) / txns
    if isinstance(path, Outbox):
        committed = [(op_id, s, e) for op_id, s, e in ops]
        extra["pg_commit_throughput"] = sum(1 for _, _, e in committed if w0 <= e <= w1) / (
            w1 - w0)
        wanted = {op_id: s for op_id, s, _ in committed}
        arrived: dict[str, float] = {}
        drain_start = time.monotonic()
        deadline = drain_start + max(30.0, 3 * duration)
        while time.monotonic() < deadline:
            for key, t in path.arrivals():
                if key in wanted and key not in arrived:
                    arrived[key] = t
            if len(arrived) >= len(wanted):
                break
            time.sleep(0.05)
        path.active.clear()
        extra["drain_s"] = time.monotonic() - drain_start
        with path.counters.get_lock():
            rows, txns = path.counters[0] - relay0[0], path.counters[1] - relay0[1]
        if txns:
            extra["relay_rows_per_txn"] = rows / txns
        extra["lost"] = float(len(wanted) - len(arrived))
        ops = [(k, wanted[k], arrived[k]) for k in arrived]
    result = summarize(path.name, concurrency, run, ops, errors, w0, w1, cpu, extra)
    result.cores_by_process = by_proc
    if first_error:
        say(f"  ! {path.name} c={concurrency}: {errors} errors, first: {first_error[0]!r}")
    return result


# -- reporting ---------------------------------------------------------------------


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, tuple) else v


def machine_notes() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "memory": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "confluent_kafka": _first(__import__("confluent_kafka").version()),
        "librdkafka": __import__("confluent_kafka").libversion()[0],
        "psycopg": psycopg.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def server_notes(dsn: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT version()").fetchone()
        out["postgres"] = str(row[0]).split(" on ")[0] if row else "?"
        for s in ("fsync", "synchronous_commit", "wal_sync_method", "commit_delay",
                  "max_prepared_transactions", "shared_buffers"):
            r = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(s))).fetchone()
            out[s] = str(r[0]) if r else "?"
    return out


@dataclass
class Cell:
    path: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    tput_min: float
    tput_max: float
    runs: int
    errors: int
    machine_cores_busy: float
    extra: dict[str, float]
    cores_by_process: dict[str, float]


def aggregate(results: Sequence[RunResult]) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    keys = sorted({(r.path, r.concurrency) for r in results},
                  key=lambda k: (k[1], ALL_PATHS.index(k[0])))
    for key in keys:
        rs = [r for r in results if (r.path, r.concurrency) == key]
        tp = [r.throughput for r in rs]
        extra_keys = sorted({k for r in rs for k in r.extra})
        cells[key] = Cell(
            path=key[0], concurrency=key[1], throughput=statistics.median(tp),
            p50_ms=statistics.median(r.p50_ms for r in rs),
            p99_ms=statistics.median(r.p99_ms for r in rs),
            tput_min=min(tp), tput_max=max(tp), runs=len(rs),
            errors=sum(r.errors for r in rs),
            machine_cores_busy=statistics.median(r.machine_cores_busy for r in rs),
            extra={k: statistics.median(r.extra[k] for r in rs if k in r.extra)
                   for k in extra_keys},
            cores_by_process={
                k: statistics.median(r.cores_by_process.get(k, 0.0) for r in rs)
                for k in sorted({k for r in rs for k in r.cores_by_process})},
        )
    return cells


def table_markdown(cells: dict[tuple[str, int], Cell]) -> str:
    lines = [
        "| path | threads | throughput (ops/s) | x (a) | min-max of runs | p50 (ms) | "
        "p99 (ms) | p99 x (a) | machine CPU busy (of 2) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (path, c), cell in cells.items():
        base = cells.get(("naive", c))
        ratio = f"{cell.throughput / base.throughput:.2f}" if base and base.throughput else "-"
        p99r = f"{cell.p99_ms / base.p99_ms:.2f}" if base and base.p99_ms else "-"
        notes = []
        if "mean_group_size" in cell.extra:
            notes.append(f"{cell.extra['mean_group_size']:.1f} ops/Kafka txn")
        if "pg_commit_throughput" in cell.extra:
            notes.append(f"PG commits {cell.extra['pg_commit_throughput']:.0f}/s, relay "
                         f"{cell.extra.get('relay_rows_per_txn', 0):.0f} rows/Kafka txn, "
                         f"backlog drained in {cell.extra.get('drain_s', 0):.1f} s")
        if cell.extra.get("lost"):
            notes.append(f"{cell.extra['lost']:.0f} not seen by consumer")
        if cell.errors:
            notes.append(f"{cell.errors} errors")
        lines.append(
            f"| {LABELS[path]} | {c} | {cell.throughput:.0f} | {ratio} | "
            f"{cell.tput_min:.0f}-{cell.tput_max:.0f} | {cell.p50_ms:.1f} | {cell.p99_ms:.1f} | "
            f"{p99r} | {cell.machine_cores_busy:.2f} | {'; '.join(notes)} |")
    return "\n".join(lines)


OWN_PROCESSES = ("bench process", "outbox relay", "outbox consumer", "kafka broker", "postgres")


def cpu_markdown(cells: dict[tuple[str, int], Cell], concurrency: int) -> str:
    """Cores used by each process during the runs at one concurrency (medians), and
    CPU milliseconds per operation for the processes of this benchmark."""
    lines = ["| path | " + " | ".join(OWN_PROCESSES) + " | all other processes "
             "(other tenants, kernel) |", "|---|" + "---:|" * (len(OWN_PROCESSES) + 1)]
    for (_, c), cell in cells.items():
        if c != concurrency:
            continue
        tp = max(cell.throughput, 1e-9)
        row = []
        for k in OWN_PROCESSES:
            cores = cell.cores_by_process.get(k, 0.0)
            row.append(f"{cores:.2f} ({cores / tp * 1e3:.2f} ms/op)" if cores >= 0.005 else "-")
        other = sum(v for k, v in cell.cores_by_process.items() if k not in OWN_PROCESSES)
        lines.append(f"| {LABELS[cell.path]} | " + " | ".join(row) + f" | {other:.2f} |")
    return "\n".join(lines)


def final_ratios(cells: dict[tuple[str, int], Cell]) -> tuple[int, dict[str, float]]:
    concs = sorted({c for _, c in cells})
    c = 32 if 32 in concs else concs[-1]

    def r(other: str) -> float:
        g, o = cells.get(("group", c)), cells.get((other, c))
        return g.throughput / o.throughput if g and o and o.throughput else float("nan")

    return c, {"naive": r("naive"), "outbox": r("outbox"), "per_op": r("per_op")}


def plot(cells: dict[tuple[str, int], Cell], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib missing (.venv/bin/pip install matplotlib): no plot")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in ALL_PATHS:
        pts = sorted((c, cell) for (p, c), cell in cells.items() if p == path)
        if not pts:
            continue
        xs = [c for c, _ in pts]
        ax1.errorbar(xs, [x.throughput for _, x in pts],
                     yerr=[[x.throughput - x.tput_min for _, x in pts],
                           [x.tput_max - x.throughput for _, x in pts]],
                     marker="o", capsize=3, label=LABELS[path])
        ax2.plot(xs, [x.p99_ms for _, x in pts], marker="o", label=LABELS[path])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c for _, c in cells}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrency (threads)")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("throughput (ops/s, median; bars: min-max)")
    ax1.set_title("Throughput: 1 INSERT + one 1 KB message")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("p99 latency")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# -- the main benchmark ------------------------------------------------------------


def main_bench(args: argparse.Namespace) -> int:
    dsn, brokers = env_services()
    out_dir = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    concs = [int(x) for x in args.concurrency.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in ALL_PATHS:
            sys.exit(f"unknown path {p!r}; choose from {', '.join(ALL_PATHS)}")
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(dsn, suffix)
    topics = {p: f"pk2pc-bench.{p}.{suffix}" for p in paths}
    instances = {"per_op": f"bench{os.getpid()}-c", "group": f"bench{os.getpid()}-d"}
    group = GroupCommit(max_wait=args.max_wait, max_batch=args.max_batch)
    pool_size = max(concs) + 4
    started = time.monotonic()
    notes = {**machine_notes(), **server_notes(dsn)}
    say(f"bench: paths {paths}, concurrency {concs}, {args.runs} runs of "
        f"{args.warmup}+{args.duration} s, producers={args.producers}, {group}")
    tables.create()
    create_topics(brokers, list(topics.values()), args.partitions)
    impls: dict[str, Path_] = {}
    counter = KafkaTxnCounter()
    results: list[RunResult] = []
    try:
        if "outbox" in paths:  # spawn the child processes before any thread starts
            impls["outbox"] = Outbox(dsn, brokers, tables, topics["outbox"], args.partitions,
                                     pool_size, args.relay_batch, args.relay_poll_ms / 1e3)
        if "naive" in paths:
            impls["naive"] = Naive(dsn, brokers, tables, topics["naive"], pool_size,
                                   {"linger.ms": 1})
        for p in REFERENCE_PATHS:
            if p in paths:
                impls[p] = PgOnly(p, dsn, tables, pool_size)
        for p, gc in (("per_op", None), ("group", group)):
            if p in paths:
                cfg = CoordinatorConfig(producers=args.producers, group_commit=gc)
                impls[p] = TwoPC(p, dsn, brokers, tables, topics[p], pool_size + 1,
                                 instances[p], cfg)
        ordered = [impls[p] for p in ALL_PATHS if p in impls]
        say(f"bench: set up in {time.monotonic() - started:.1f} s; warming up")
        for impl in ordered:  # one untimed pass at the highest concurrency
            measure(impl, max(concs), -1, 0.0, args.first_warmup, counter)
        for run in range(args.runs):
            for c in concs:
                rot = run % len(ordered)
                for impl in ordered[rot:] + ordered[:rot]:
                    r = measure(impl, c, run, args.warmup, args.duration, counter)
                    results.append(r)
                    say(f"  run {run + 1}/{args.runs} c={c:<3} {impl.name:<7} "
                        f"{r.throughput:7.0f} ops/s  p50 {r.p50_ms:6.1f} ms  p99 "
                        f"{r.p99_ms:6.1f} ms  cpu {r.machine_cores_busy:.2f}"
                        + "".join(f"  {k}={v:.1f}" for k, v in r.extra.items()))
                    time.sleep(args.pause)
    finally:
        for impl in impls.values():
            with contextlib.suppress(Exception):
                impl.close()
        counter.restore()
        left = rollback_own_prepared(dsn, list(instances.values()))
        if left:
            say(f"bench: rolled back {left} prepared transaction(s) left after errors")
        if not args.keep:
            tables.drop()
            delete_topics(brokers, list(topics.values()))
    elapsed = time.monotonic() - started
    cells = aggregate(results)
    table = table_markdown(cells)
    c32, ratios = final_ratios(cells)
    cpu_table = cpu_markdown(cells, c32)
    command = "scripts/bench " + " ".join(sys.argv[1:])
    settings = {
        "command": command.strip(), "runs": args.runs, "warmup_s": args.warmup,
        "duration_s": args.duration, "concurrency": concs, "producers": args.producers,
        "group_commit": asdict(group), "topic_partitions": args.partitions,
        "relay_batch": args.relay_batch, "relay_poll_ms": args.relay_poll_ms,
        "elapsed_s": round(elapsed, 1),
        "coordinator": coordinator.__file__,
    }
    (out_dir / "bench-results.json").write_text(json.dumps({
        "settings": settings, "machine": notes,
        "cells": [asdict(c) for c in cells.values()],
        "runs": [asdict(r) for r in results],
        "ratios_at": c32, "ratios": ratios,
    }, indent=1, default=str) + "\n")
    png = out_dir / "bench-throughput.png"
    has_plot = plot(cells, png)
    md = [
        "# Benchmark results",
        "",
        f"Generated by `{settings['command']}` on {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"in {elapsed:.0f} s. Each figure is the median of {args.runs} interleaved runs of "
        f"{args.duration} s after {args.warmup} s of warm-up; "
        f"producers={args.producers}, group commit max_wait={group.max_wait * 1e3:g} ms, "
        f"max_batch={group.max_batch}; topics with {args.partitions} partitions; outbox relay "
        f"batch {args.relay_batch}, idle poll {args.relay_poll_ms:g} ms. "
        "Outbox latency and throughput are end to end (until a read_committed consumer "
        "receives the message).",
        "",
        table,
        "",
        f"At concurrency {c32}: group vs naive {ratios['naive']:.2f}, vs outbox "
        f"{ratios['outbox']:.2f}, vs per-op {ratios['per_op']:.2f}.",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in notes.items()) + ".",
        "",
        f"CPU cores used by each process during the runs at concurrency {c32} (median; the "
        "machine has " + str(os.cpu_count()) + " cores; other processes on the shared machine "
        "count in machine busy):",
        "",
        cpu_table,
    ]
    if has_plot:
        md += ["", f"![throughput vs concurrency]({png.name})"]
    (out_dir / "bench-results.md").write_text("\n".join(md) + "\n")
    print(table)
    print(f"\nCPU cores by process at concurrency {c32}:\n{cpu_table}")
    print(f"\nwritten: {out_dir / 'bench-results.md'}, {out_dir / 'bench-results.json'}"
          + (f", {png}" if has_plot else ""))
    print(f"twopc_group_vs_naive={ratios['naive']:.2f} "
          f"twopc_group_vs_outbox={ratios['outbox']:.2f} "
          f"twopc_group_vs_per_op={ratios['per_op']:.2f}")
    return 0


def write_extra(args: argparse.Namespace, name: str, data: Any, md: str) -> None:
    out_dir = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / f"bench-{name}.md").write_text(
        f"# bench --{name}\n\nGenerated by `scripts/bench {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.\n\n{md}\n")
    say(f"written: {out_dir / f'bench-{name}.md'}")


# -- (iv) memory over a long run -----------------------------------------------------


def main_memory(args: argparse.Namespace) -> int:
    import gc

    dsn, brokers = env_services()
    total = args.memory
    c = int(args.concurrency.split(",")[-1])
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(dsn, suffix)
    topic = f"pk2pc-bench.mem.{suffix}"
    tables.create()
    create_topics(brokers, [topic], args.partitions)
    instance = f"bench{os.getpid()}-m"
    step = max(total // 100, 1000)
    samples: list[tuple[int, float, int, int]] = []  # ops, seconds, rss kB, gc objects
    lock = threading.Lock()
    done = 0
    errors = 0
    cfg = CoordinatorConfig(producers=args.producers,
                            group_commit=GroupCommit(args.max_wait, args.max_batch))
    impl = TwoPC("group", dsn, brokers, tables, topic, c + 5, instance, cfg)
    t_start = time.monotonic()
    samples.append((0, 0.0, rss_kb(), len(gc.get_objects())))
    say(f"memory: {total} operations at concurrency {c}, RSS every {step}")

    def worker(i: int) -> None:
        nonlocal done, errors
        n = 0
        while True:
            with lock:
                if done >= total:
                    return
                done += 1
                mine = done
            try:
                impl.op(f"m{i}-{n}")
            except Exception as exc:
                with lock:
                    errors += 1
                if errors < 5:
                    say(f"  ! {exc!r}")
            n += 1
            if mine % step == 0:
                s = (mine, time.monotonic() - t_start, rss_kb(), len(gc.get_objects()))
                with lock:
                    samples.append(s)
                if mine % (step * 10) == 0:
                    say(f"  {mine:>9} ops  {s[1]:6.0f} s  RSS {s[2] / 1024:6.1f} MB  "
                        f"objects {s[3]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        impl.close()
        rollback_own_prepared(dsn, [instance])
        tables.drop()
        delete_topics(brokers, [topic])
    elapsed = time.monotonic() - t_start
    samples.sort()
    # growth over the second half (after warm-up), by least squares, per 100k operations
    def rss_slope(since: int) -> float:
        """Least-squares RSS growth (kB per operation) over the samples from ``since``."""
        part = [s for s in samples if s[0] >= since]
        if len(part) < 2:
            return 0.0
        xs = [s[0] for s in part]
        ys = [s[2] for s in part]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0

    slope = rss_slope(total // 2)
    slope_last = rss_slope(total * 3 // 4)
    first_after_warm = next((s for s in samples if s[0] >= step * 5), samples[0])
    last = samples[-1]
    summary = {
        "operations": total, "concurrency": c, "errors": errors,
        "elapsed_s": round(elapsed, 1), "ops_per_s": round(total / elapsed, 1),
        "rss_start_mb": round(samples[0][2] / 1024, 1),
        "rss_after_warmup_mb": round(first_after_warm[2] / 1024, 1),
        "rss_end_mb": round(last[2] / 1024, 1),
        "rss_max_mb": round(max(s[2] for s in samples) / 1024, 1),
        "slope_second_half_kb_per_100k_ops": round(slope * 100_000, 1),
        "slope_last_quarter_kb_per_100k_ops": round(slope_last * 100_000, 1),
        "extrapolated_growth_to_1M_ops_mb": round(slope * max(0, 1_000_000 - total) / 1024, 1),
        "extrapolated_growth_to_1M_ops_mb_last_quarter_slope": round(
            slope_last * max(0, 1_000_000 - total) / 1024, 1),
        "gc_objects_after_warmup": first_after_warm[3], "gc_objects_end": last[3],
    }
    md = "\n".join(f"- {k}: {v}" for k, v in summary.items())
    print(md)
    write_extra(args, "memory", {"summary": summary, "samples": samples}, md)
    out_dir = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s[0] for s in samples], [s[2] / 1024 for s in samples], marker=".")
        ax.set_xlabel(f"operations (group commit, concurrency {c})")
        ax.set_ylabel("RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "bench-memory.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return 0


# -- command line --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = CoordinatorConfig()
    g = GroupCommit()
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short runs (under two minutes); output to bench-results/")
    ap.add_argument("--runs", type=int, default=None, help="runs per figure (median)")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds excluded at the start of every run")
    ap.add_argument("--concurrency", default="1,8,32", help="thread counts, comma-separated")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="subset of " + ",".join(PATHS) + "; also the references "
                    + ",".join(REFERENCE_PATHS) + " (PostgreSQL alone, no Kafka)")
    ap.add_argument("--producers", type=int, default=2,
                    help="producer pool size of (c) and (d) (default 2, the best for group "
                    "commit at concurrency 32 in docs/bench-tune.md; the library default is "
                    f"{d.producers})")
    ap.add_argument("--max-wait", type=float, default=g.max_wait,
                    help="GroupCommit.max_wait (s) of (d)")
    ap.add_argument("--max-batch", type=int, default=g.max_batch,
                    help="GroupCommit.max_batch of (d)")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of the bench topics")
    ap.add_argument("--relay-batch", type=int, default=500, help="outbox relay LIMIT")
    ap.add_argument("--relay-poll-ms", type=float, default=5.0,
                    help="outbox relay sleep when the outbox is empty")
    ap.add_argument("--out", default=None,
                    help="output directory (default docs/, or bench-results/ with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the bench tables and topics")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between measurements")
    ap.add_argument("--memory", type=int, metavar="N",
                    help="RSS of the group-commit path over N operations")
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.duration is None:
        args.duration = 1.5 if args.quick else 6.0
    if args.warmup is None:
        args.warmup = 0.4 if args.quick else 1.5
    args.first_warmup = 1.0 if args.quick else 3.0
    if args.quick:
        args.pause = min(args.pause, 0.1)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.memory:
        return main_memory(args)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
