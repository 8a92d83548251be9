"""One coordinator shared by 16 threads, 100 operations each; every outcome is
checked on both sides."""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from coordinator import Error, GroupCommit, Status
from coordinator.gid import parse

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

THREADS = 16
OPS = 100


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


class Refused(Exception):
    """Raised inside the block on purpose: the operation must leave no trace."""


@pytest.mark.parametrize("group_commit", [None, GroupCommit()], ids=["per-operation", "group"])
def test_16_threads_x_100_operations(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> None:
    topic = env.topic(partitions=4)
    coord = env.coordinator(pool_max_size=24, producers=4, connection_timeout=60.0,
                            group_commit=group_commit)
    barrier = threading.Barrier(THREADS)
    unexpected: list[BaseException] = []

    def worker(thread: int) -> dict[int, tuple[Status, str | None]]:
        outcomes: dict[int, tuple[Status, str | None]] = {}
        barrier.wait()
        for n in range(OPS):
            op = thread * OPS + n
            tx = coord.transaction(idempotency_key=f"op-{op}")
            try:
                with tx:
                    tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (op, n))
                    tx.produce(topic, key=str(op), value=json.dumps({"op": op}),
                               headers={"thread": str(thread)})
                    if op % 10 == 7:
                        raise Refused(op)
            except Refused:
                pass
            except Error as exc:  # recorded and reported below
                unexpected.append(exc)
            outcomes[op] = (tx.status, tx.gid)
        return outcomes

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes: dict[int, tuple[Status, str | None]] = {}
        for part in pool.map(worker, range(THREADS)):
            outcomes.update(part)

    assert not unexpected, unexpected[:5]
    everything = set(range(THREADS * OPS))
    refused = {op for op in everything if op % 10 == 7}
    committed = everything - refused
    assert set(outcomes) == everything
    assert {op for op, (s, _) in outcomes.items() if s is Status.COMMITTED} == committed
    assert {op for op, (s, _) in outcomes.items() if s is Status.ROLLED_BACK} == refused

    # PostgreSQL: exactly the committed operations, once each; their keys with their gids.
    pg_ids = env.ids()
    assert len(pg_ids) == len(set(pg_ids))
    assert set(pg_ids) == committed
    keys = env.idempotency_rows()
    assert keys == {f"op-{op}": outcomes[op][1] for op in committed}
    assert env.prepared() == []

    # Kafka: exactly the committed operations, once each.
    records = env.read(topic, timeout=120)
    kafka_ops = Counter(json.loads(r.value or b"")["op"] for r in records)
    duplicates = {op: n for op, n in kafka_ops.items() if n > 1}
    assert not duplicates
    assert set(kafka_ops) == committed == set(pg_ids)
    for r in records:
        op = json.loads(r.value or b"")["op"]
        assert r.key == str(op).encode()
        assert dict(r.headers) == {"thread": str(op // OPS).encode()}

    # The decision log: one record per committed gid, none for rolled-back operations.
    gids = {outcomes[op][1] for op in committed}
    assert None not in gids and len(gids) == len(committed)
    decisions = env.decisions()
    assert set(decisions) == gids
    for gid, rec in decisions.items():
        assert rec.partition == parse(gid).partition
    # Producers were reused, never created per operation.
    assert {parse(g).transactional_id for g in gids if g} <= set(coord.transactional_ids)
