"""Exactly once from Kafka to PostgreSQL and back, surviving ``kill -9``.

Run it with ``scripts/demo`` (its second part), or against any PostgreSQL
(max_prepared_transactions > 0) and Kafka::

    PG_DSN=... KAFKA_BOOTSTRAP_SERVERS=... .venv/bin/python -m examples.pipeline

A billing stage consumes ``orders``, writes one invoice row per order and publishes
one ``payments`` message per order, with ``Coordinator.run_consumer``: each batch's
consumed offsets commit in the same Kafka transaction as its payments and its
decision record, and the PostgreSQL transaction commits with them. The stage is
killed with SIGKILL in the middle of a batch (right after PREPARE), started again
(it resolves its own in-doubt transaction at start-up), and finishes the stream.
Then every order must have exactly one invoice and exactly one payment.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import psycopg
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import recovery
from coordinator import Coordinator, CoordinatorConfig, Step, Transaction

TABLE = "pipeline_invoices"
ORDERS = 300
PARTITIONS = 3


def say(text: str = "") -> None:
    print(text, flush=True)


def stage(args: argparse.Namespace) -> int:
    """The billing stage (a process of its own)."""
    kafka = {"bootstrap.servers": args.bootstrap}
    transactions = 0

    def on_step(step: Step, gid: str | None) -> None:
        nonlocal transactions
        if step is Step.AFTER_PREPARE:
            transactions += 1
            if transactions == args.die_after:
                say(f"dying {gid}")
                os.kill(os.getpid(), signal.SIGKILL)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = CoordinatorConfig(on_step=on_step, producers=1)
    with Coordinator(args.postgres, kafka, "billing", instance=args.instance,
                     config=config) as coord:
        own = recovery.recover_own(coord, kafka)  # what a kill left in doubt
        if own.committed or own.rolled_back:
            say(f"recovered committed={len(own.committed)} rolled_back={len(own.rolled_back)}")
        consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                             "enable.auto.commit": False, "isolation.level": "read_committed",
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([args.orders])

        def handle(tx: Transaction, messages: Sequence[Message]) -> None:
            for m in messages:
                order = (m.key() or b"").decode()
                tx.execute(f"INSERT INTO {TABLE} (run, order_key) VALUES (%s, %s)",
                           (args.run, order))
                tx.produce(args.payments, key=order, value=f"paid {order}")

        say("ready")
        try:
            coord.run_consumer(consumer, handle, batch_size=25, stop=stop)
        finally:
            consumer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--run", "--orders", "--payments", "--group", "--postgres", "--bootstrap"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--instance", default="pipeline",
                        help="the stage's instance id (default: pipeline)")
    parser.add_argument("--die-after", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return stage(args)
    dsn, bootstrap = os.environ.get("PG_DSN"), os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not dsn or not bootstrap:
        say("Set PG_DSN and KAFKA_BOOTSTRAP_SERVERS, or run scripts/demo.")
        return 2

    run = time.strftime("%H%M%S") + "-" + uuid.uuid4().hex[:4]
    orders, payments = f"pk2pc-demo.orders-in.{run}", f"pk2pc-demo.payments.{run}"
    group = f"billing-{run}"
    say(f"pg-kafka-2pc pipeline, run {run}: {orders} -> billing stage -> {TABLE} + {payments}")
    setup(dsn, bootstrap, [orders, payments])
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(ORDERS):
        producer.produce(orders, key=f"{run}-{i}", value=b"order", partition=i % PARTITIONS)
    producer.flush(30)
    say(f"\n1. {ORDERS} orders published; the billing stage starts, and is killed (kill -9) "
        "right after a PREPARE")
    common = ["--run", run, "--orders", orders, "--payments", payments, "--group", group,
              "--postgres", dsn, "--bootstrap", bootstrap, "--instance", args.instance]
    first = start_stage([*common, "--die-after", "4"])
    print_lines(first, "   stage: ")
    first.wait(60)
    say(f"   stage exit status {first.returncode} (SIGKILL is -9); invoices so far: "
        f"{len(invoices(dsn, run))}")

    say("\n2. The stage starts again: it resolves its own in-doubt transaction, then "
        "carries on from the committed offsets")
    second = start_stage(common)
    watcher = threading.Thread(target=print_lines, args=(second, "   stage: "), daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while len(invoices(dsn, run)) < ORDERS and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        second.terminate()
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait(30)

    say("\n3. What each side holds now")
    rows = Counter(invoices(dsn, run))
    paid = Counter(read_keys(bootstrap, payments))
    committed = committed_offsets(bootstrap, group, orders)
    dupes = sum(n - 1 for n in rows.values() if n > 1) + sum(n - 1 for n in paid.values() if n > 1)
    say(f"   orders: {ORDERS}   invoices: {sum(rows.values())}   payments (read_committed): "
        f"{sum(paid.values())}   duplicates: {dupes}")
    say(f"   committed offsets of the stage's group: {committed} (each partition holds "
        f"{ORDERS // PARTITIONS})")
    ok = (set(rows) == set(paid) == {f"{run}-{i}" for i in range(ORDERS)} and dupes == 0
          and committed == [ORDERS // PARTITIONS] * PARTITIONS)
    say("Exactly once: every order has one invoice and one payment, nothing twice, nothing "
        "lost." if ok else "MISMATCH: see above")
    return 0 if ok else 1


def start_stage(extra: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "examples.pipeline", "--stage", *extra],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while (line := proc.stdout.readline().strip()) != "ready":
        if not line:
            proc.kill()
            raise SystemExit(f"the stage did not start (exit status {proc.wait(30)})")
        say("   stage: " + line)
    return proc


def print_lines(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        say(prefix + line.rstrip())
    proc.stdout.close()


def setup(dsn: str, bootstrap: str, topics: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (run text NOT NULL, "
                     "order_key text PRIMARY KEY, created_at timestamptz DEFAULT now())")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(t, num_partitions=PARTITIONS,
                                             replication_factor=-1) for t in topics]).values():
        fut.result(30)
    deadline = time.monotonic() + 30
    for t in topics:
        while True:
            md = admin.list_topics(t, timeout=10).topics.get(t)
            if md is not None and md.error is None and md.partitions and all(
                    p.leader >= 0 for p in md.partitions.values()):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"topic {t} did not become available")
            time.sleep(0.1)


def invoices(dsn: str, run: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute(
            f"SELECT order_key FROM {TABLE} WHERE run = %s", (run,)).fetchall()]


def read_keys(bootstrap: str, topic: str) -> list[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(PARTITIONS)]
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        keys: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    keys.append((m.key() or b"").decode())
            pos = consumer.position([TopicPartition(topic, p) for p in range(PARTITIONS)])
            if all(tp.offset >= end for tp, end in zip(pos, ends, strict=True)):
                break
        return keys
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], 30)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


if __name__ == "__main__":
    sys.exit(main())
