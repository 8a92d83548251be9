"""Idempotency keys: a retry of a committed operation neither re-applies its SQL
nor re-publishes; two concurrent attempts with one key commit exactly once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from coordinator import (
    AlreadyCommitted,
    Coordinator,
    Error,
    IdempotencyKeyBusy,
    Status,
    Transaction,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def place_order(coord: Coordinator, topic: str, order_id: int, key: str,
                hold: float = 0.0, fail: bool = False) -> Transaction:
    with coord.transaction(idempotency_key=key) as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (order_id, 10))
        tx.produce(topic, value=f"order {order_id}", key=key)
        if hold:
            time.sleep(hold)  # keep the key claimed while the other attempt arrives
        if fail:
            raise RuntimeError("the first attempt fails")
    return tx


def test_retry_with_same_key_is_already_committed(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    first = place_order(coord, topic, 1, "order-1")
    assert first.status is Status.COMMITTED and first.gid is not None

    ran = False
    tx = coord.transaction(idempotency_key="order-1")
    with pytest.raises(AlreadyCommitted) as info, tx:
        ran = True  # never reached: the key is checked when the block starts
        tx.execute("INSERT INTO orders (id, total) VALUES (2, 10)")
        tx.produce(topic, value=b"order 1 again")
    assert not ran
    err = info.value
    assert err.previous_gid == first.gid and err.gid == first.gid
    assert err.idempotency_key == "order-1"
    assert "already committed" in str(err)
    assert tx.status is Status.ROLLED_BACK
    # One row, one message, one decision.
    assert env.ids() == [1]
    assert env.idempotency_rows() == {"order-1": first.gid}
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    assert set(env.decisions()) == {first.gid}
    assert env.prepared() == []


def test_key_survives_a_coordinator_restart(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    first = place_order(coord, topic, 1, "order-1")
    coord.close()
    again = env.coordinator()  # same name and instance: a restart
    with pytest.raises(AlreadyCommitted) as info:
        place_order(again, topic, 1, "order-1")
    assert info.value.previous_gid == first.gid
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"order 1"]


def test_concurrent_duplicate_keys_commit_exactly_once(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator(idempotency_wait_ms=30_000)
    barrier = threading.Barrier(2)

    def attempt(i: int) -> Transaction | Error:
        barrier.wait()
        try:
            # Each attempt holds the block a while, so they certainly overlap.
            return place_order(coord, topic, 100 + i, "order-dup", hold=0.5)
        except Error as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, range(2)))

    committed = [r for r in results if not isinstance(r, Error)]
    refused = [r for r in results if isinstance(r, Error)]
    assert len(committed) == 1 and len(refused) == 1, results
    winner, loser = committed[0], refused[0]
    assert winner.status is Status.COMMITTED and winner.gid is not None
    assert isinstance(loser, AlreadyCommitted), loser
    assert loser.previous_gid == winner.gid
    # Exactly one row and one message, from the winner.
    [row] = env.ids()
    assert row in (100, 101)
    assert [m.value for m in env.read(topic)] == [f"order {row}".encode()]
    assert set(env.decisions()) == {winner.gid}
    assert env.idempotency_rows() == {"order-dup": winner.gid}
    assert env.prepared() == []


def test_key_held_too_long_is_busy(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator(idempotency_wait_ms=200)
    claimed = threading.Event()
    release = threading.Event()

    def slow() -> Transaction:
        with coord.transaction(idempotency_key="order-busy") as tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 10)")
            tx.produce(topic, value=b"slow")
            claimed.set()
            assert release.wait(30)
        return tx

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(slow)
        assert claimed.wait(30)
        started = time.monotonic()
        tx = coord.transaction(idempotency_key="order-busy")
        with pytest.raises(IdempotencyKeyBusy) as info, tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 10)")
            tx.produce(topic, value=b"busy")
        waited = time.monotonic() - started
        release.set()
        slow_tx = fut.result(30)

    assert info.value.idempotency_key == "order-busy"
    assert 0.15 < waited < 10
    assert tx.status is Status.ROLLED_BACK
    assert slow_tx.status is Status.COMMITTED
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"slow"]
    assert slow_tx.gid is not None and set(env.decisions()) == {slow_tx.gid}
    assert env.prepared() == []


def test_waiter_proceeds_when_holder_rolls_back(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator(idempotency_wait_ms=30_000)
    claimed = threading.Event()

    def failing() -> None:
        with pytest.raises(RuntimeError):
            place_order(coord, topic, 1, "order-x", hold=0.5, fail=True)

    with ThreadPoolExecutor(1) as pool:
        def claim_then_fail() -> None:
            claimed.set()
            failing()

        fut = pool.submit(claim_then_fail)
        assert claimed.wait(30)
        time.sleep(0.2)
        second = place_order(coord, topic, 2, "order-x")
        fut.result(30)

    assert second.status is Status.COMMITTED and second.gid is not None
    assert env.ids() == [2]
    assert [m.value for m in env.read(topic)] == [b"order 2"]
    assert set(env.decisions()) == {second.gid}
    assert env.idempotency_rows() == {"order-x": second.gid}


def test_custom_idempotency_table_is_quoted(env: Env, orders: str) -> None:
    env.execute('CREATE SCHEMA "Shop Data"')
    topic = env.topic()
    table = 'keys"; DROP TABLE orders; --'
    coord = env.coordinator(idempotency_table=table, idempotency_schema="Shop Data")
    first = place_order(coord, topic, 1, "k")
    with pytest.raises(AlreadyCommitted):
        place_order(coord, topic, 1, "k")
    assert env.ids() == [1]
    rows = env.execute(
        'SELECT idempotency_key, gid FROM "Shop Data"."keys""; DROP TABLE orders; --"'
    )
    assert rows == [("k", first.gid)]
    assert [m.value for m in env.read(topic)] == [b"order 1"]
