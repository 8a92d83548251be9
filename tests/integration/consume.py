"""Helpers of the consume-path tests: input messages, a consumer, the pipeline's tables,
and the exactly-once check (each input message -> exactly one row and one output)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from coordinator import Transaction

if TYPE_CHECKING:
    from tests.integration.conftest import Env


@dataclass
class Pipeline:
    env: Env
    source: str
    sink: str
    group: str
    partitions: int

    def feed(self, n: int, prefix: str = "m") -> list[str]:
        """Produce ``n`` input messages (keys ``prefix-i``), spread over the partitions."""
        keys = [f"{prefix}-{i}" for i in range(n)]
        producer = Producer({"bootstrap.servers": self.env.bootstrap, "linger.ms": 5})
        for i, key in enumerate(keys):
            producer.produce(self.source, key=key, value=key.encode(),
                             partition=i % self.partitions)
        assert producer.flush(30) == 0
        return keys

    def consumer(self, **overrides: object) -> Consumer:
        conf: dict[str, object] = {
            "bootstrap.servers": self.env.bootstrap, "group.id": self.group,
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500, **overrides}
        c = Consumer(conf)
        c.subscribe([self.source])
        return c

    def handle(self, tx: Transaction, messages: Sequence[Message]) -> None:
        """The stage under test: one row and one output message per input message."""
        for m in messages:
            key = (m.key() or b"").decode()
            tx.execute("INSERT INTO invoices (msg_key, src) VALUES (%s, %s)",
                       (key, f"{m.partition()}:{m.offset()}"))
            tx.produce(self.sink, key=key, value=b"paid " + key.encode())

    def rows(self) -> Counter[str]:
        return Counter(r[0] for r in self.env.execute("SELECT msg_key FROM invoices"))

    def outputs(self) -> Counter[str]:
        return Counter((r.key or b"").decode() for r in self.env.read(self.sink))

    def committed(self) -> dict[int, int]:
        c = Consumer({"bootstrap.servers": self.env.bootstrap, "group.id": self.group,
                      "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(self.source, p) for p in range(self.partitions)],
                              timeout=30)
            return {tp.partition: tp.offset for tp in tps}
        finally:
            c.close()

    def assert_exactly_once(self, keys: Sequence[str]) -> None:
        rows, outputs = self.rows(), self.outputs()
        assert set(rows) == set(keys), (set(keys) - set(rows), set(rows) - set(keys))
        assert all(n == 1 for n in rows.values()), [k for k, n in rows.items() if n > 1]
        assert outputs == rows, "rows and output messages differ"


def pipeline(env: Env, partitions: int = 3) -> Pipeline:
    env.execute("CREATE TABLE invoices (msg_key text PRIMARY KEY, src text NOT NULL)")
    return Pipeline(env, env.topic(partitions=partitions), env.topic(),
                    f"g-{uuid.uuid4().hex[:10]}", partitions)
