"""The guarantee, shown: PostgreSQL rows and Kafka messages commit together.

Run it with ``scripts/demo`` (starts the local stack first), or against any
PostgreSQL (max_prepared_transactions > 0) and Kafka::

    PG_DSN=postgresql://postgres@127.0.0.1:5432/postgres \\
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python -m examples.demo

It places a batch of orders (each one a row in PostgreSQL *and* an event in
Kafka, committed together by the coordinator), one order whose business logic
fails inside the block, and one retried with the same idempotency key. Then it
prints side by side what PostgreSQL holds and what a ``read_committed`` Kafka
consumer sees. Every run uses its own run id and topic, so it can run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from decimal import Decimal

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from coordinator import AlreadyCommitted, Coordinator, DecisionRecord, Status, Transaction

TABLE = "demo_orders"
DECISION_TOPIC = "pk2pc.decisions"  # the coordinator's default decision log

ORDERS = [
    ("alice", Decimal("19.90")),
    ("bob", Decimal("5.00")),
    ("carol", Decimal("42.50")),
    ("dave", Decimal("7.25")),
    ("erin", Decimal("99.99")),
]


class PaymentDeclined(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instance", default="demo",
                        help="the coordinator's instance id (default: demo); two demos "
                             "running at once need two ids")
    args = parser.parse_args(argv)
    dsn = os.environ.get("PG_DSN")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not dsn or not bootstrap:
        say("Set PG_DSN and KAFKA_BOOTSTRAP_SERVERS, or run scripts/demo (it starts the "
            "local stack and sets them).")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    run = time.strftime("%H%M%S") + "-" + uuid.uuid4().hex[:4]
    topic = f"pk2pc-demo.orders.{run}"
    say(f"pg-kafka-2pc demo, run {run}")
    say(f"  PostgreSQL table {TABLE} (rows of this run), Kafka topic {topic}")
    setup(dsn, bootstrap, topic)

    committed: dict[str, str] = {}  # order id -> gid
    with Coordinator(
        postgres=dsn,
        kafka={"bootstrap.servers": bootstrap},
        name="demo",
        # Stable across runs, as an instance id should be: a restart fences its own
        # leftover producers. Two demos at once would need two ids.
        instance=args.instance,
    ) as coord:
        say("\n1. A batch of orders: each one a row and an event, committed together")
        for n, (customer, total) in enumerate(ORDERS, start=1):
            order_id = f"{run}-{n}"
            with coord.transaction(idempotency_key=f"order-{order_id}") as tx:
                place_order(tx, topic, order_id, customer, total)
            assert tx.status is Status.COMMITTED and tx.gid is not None
            committed[order_id] = tx.gid
            say(f"   order {order_id} {customer:<6} {total:>7}  committed  gid {tx.gid}")

        say("\n2. An order whose business logic fails inside the block")
        failed_id = f"{run}-6"
        tx = coord.transaction(idempotency_key=f"order-{failed_id}")
        try:
            with tx:
                place_order(tx, topic, failed_id, "mallory", Decimal("1000.00"))
                raise PaymentDeclined("card declined")  # after the INSERT and the produce
        except PaymentDeclined as exc:
            say(f"   order {failed_id} mallory 1000.00  {tx.status.value}: "
                f"{type(exc).__name__}: {exc} (the row and the event are both discarded)")

        say("\n3. A client retries order 3 with the same idempotency key")
        retried_id = f"{run}-3"
        try:
            with coord.transaction(idempotency_key=f"order-{retried_id}") as tx:
                place_order(tx, topic, retried_id, "carol", Decimal("42.50"))
        except AlreadyCommitted as exc:
            say(f"   order {retried_id} carol    42.50  AlreadyCommitted: first committed by "
                f"{exc.previous_gid}; nothing applied or published again")

    say("\n4. What each side holds now")
    rows = pg_rows(dsn, run)
    events = kafka_events(bootstrap, topic)
    decisions = decision_records(bootstrap, set(committed.values()))
    return report(run, rows, events, decisions, committed, failed_id)


def setup(dsn: str, bootstrap: str, topic: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " id text PRIMARY KEY, run text NOT NULL, customer text NOT NULL,"
            " total numeric(10, 2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=-1)])[
        topic
    ].result(30)
    deadline = time.monotonic() + 30
    while True:  # wait until every partition has a leader
        t = admin.list_topics(topic, timeout=10).topics.get(topic)
        if t is not None and t.error is None and t.partitions and all(
            p.leader >= 0 for p in t.partitions.values()
        ):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"topic {topic} did not become available")
        time.sleep(0.1)


def place_order(
    tx: Transaction, topic: str, order_id: str, customer: str, total: Decimal
) -> None:
    """The business operation: a row in PostgreSQL and an event in Kafka."""
    run = order_id.rsplit("-", 1)[0]
    tx.execute(
        f"INSERT INTO {TABLE} (id, run, customer, total) VALUES (%s, %s, %s, %s)",
        (order_id, run, customer, total),
    )
    tx.produce(
        topic,
        key=order_id,
        value=json.dumps({"id": order_id, "customer": customer, "total": str(total)}),
        headers={"type": "order-created"},
    )


def pg_rows(dsn: str, run: str) -> dict[str, tuple[str, Decimal]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT id, customer, total FROM {TABLE} WHERE run = %s ORDER BY id", (run,)
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def read_committed(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[
        bytes | None, bytes | None]]:
    """(key, value) of every message a read_committed consumer sees in ``topic``."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"pk2pc-demo-{uuid.uuid4().hex}",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    out: list[tuple[bytes | None, bytes | None]] = []
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            ends[p] = (low, high)
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items()])
        done = {p: low >= high for p, (low, high) in ends.items()}
        deadline = time.monotonic() + timeout
        while not all(done.values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"could not read {topic} to its end within {timeout}s")
            msg = consumer.poll(0.2)
            if msg is not None:
                err = msg.error()
                if err is None:
                    out.append((msg.key(), msg.value()))
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(err)
            # The position moves past commit markers too: stop at the watermark taken above.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition][1]:
                    done[tp.partition] = True
    finally:
        consumer.close()
    return out


def kafka_events(bootstrap: str, topic: str) -> dict[str, list[dict[str, str]]]:
    events: dict[str, list[dict[str, str]]] = {}
    for _, value in read_committed(bootstrap, topic):
        event = json.loads(value or b"{}")
        events.setdefault(event["id"], []).append(event)
    return events


def decision_records(bootstrap: str, gids: set[str]) -> int:
    """How many decision records of this run's transactions the decision log holds."""
    found = 0
    for key, value in read_committed(bootstrap, DECISION_TOPIC):
        record = DecisionRecord.decode(key, value)
        if record is not None and record.gid in gids:
            found += 1
    return found


def report(
    run: str,
    rows: dict[str, tuple[str, Decimal]],
    events: dict[str, list[dict[str, str]]],
    decisions: int,
    committed: dict[str, str],
    failed_id: str,
) -> int:
    ids = sorted(set(rows) | set(events) | set(committed) | {failed_id},
                 key=lambda i: int(i.rsplit("-", 1)[1]))
    headers = ("order", "PostgreSQL row", "Kafka (read_committed consumer)", "both sides")
    table = []
    for order_id in ids:
        row = rows.get(order_id)
        evs = events.get(order_id, [])
        pg_text = f"{row[0]} {row[1]}" if row else "-"
        kafka_text = (", ".join(f"{e['customer']} {e['total']}" for e in evs)) if evs else "-"
        same = (row is None and not evs) or (
            row is not None and len(evs) == 1
            and (evs[0]["customer"], Decimal(evs[0]["total"])) == row
        )
        table.append((order_id, pg_text, kafka_text, "agree" if same else "DIFFER"))
    widths = [max(len(str(r[i])) for r in [headers, *table]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    say("   " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    say("   " + line)
    for r in table:
        say("   " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    say("   " + line)
    say(f"   PostgreSQL rows: {len(rows)}   Kafka events: {sum(map(len, events.values()))}   "
        f"decision records ({DECISION_TOPIC}): {decisions} for {len(committed)} "
        "committed transactions")

    agree = (
        all(r[3] == "agree" for r in table)
        and set(rows) == set(committed) == set(events)
        and decisions == len(committed)
    )
    say()
    if agree:
        say(f"Both sides agree: the {len(committed)} committed orders are in PostgreSQL and "
            "in Kafka exactly once; the failed order and the retried duplicate left no "
            "trace on either side.")
        return 0
    say("MISMATCH: PostgreSQL and Kafka disagree (see the table above).")
    return 1


if __name__ == "__main__":
    sys.exit(main())
