"""A live coordinator whose producer was fenced (found by the fault campaign).

Recovery fences the ``transactional.id`` of an in-doubt transaction older than its grace
period -- which is also the id a live coordinator instance goes on using (the documented
interplay in ``docs/operations.md``). The live coordinator's next transaction on that
producer then fails before its commit: confluent-kafka's ``flush()`` raised
``SystemError: <function _Deliveries.__call__ ...> returned a result with an exception
set`` (chained to the fatal ``_FENCED`` KafkaException), which escaped from the
coordinator: not a ``coordinator.Error``, PostgreSQL left prepared although nothing could
commit. Now it is ``RolledBack`` like every failure before the commit point, PostgreSQL is
rolled back at once, and the producer is re-created for the next transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from coordinator import GroupCommit, Phase, RolledBack, Status
from tests.plugins.kafka_helpers import transactional_producer

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def test_fenced_producer_rolls_back_and_recovers(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> None:
    coord = env.coordinator(producers=1, group_commit=group_commit)
    topic = env.topic()
    with coord.transaction() as tx1:
        tx1.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx1.produce(topic, value=b"order 1")
    assert tx1.status is Status.COMMITTED

    # What a recovery worker does to the transactional.id of an old in-doubt transaction.
    fencer = transactional_producer(env.bootstrap, coord.transactional_ids[0])

    tx2 = coord.transaction(idempotency_key="order-2")
    with pytest.raises(RolledBack) as info, tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (2, 1)")
        tx2.produce(topic, value=b"order 2")
    err = info.value
    assert err.gid == tx2.gid and err.phase is Phase.PRODUCE and err.complete
    assert tx2.status is Status.ROLLED_BACK
    assert env.prepared() == [] and env.ids() == [1] and env.idempotency_rows() == {}
    fencer.close()

    # A new producer (its init_transactions() fences the fencer in turn) commits again,
    # and the key is free.
    with coord.transaction(idempotency_key="order-2") as tx3:
        tx3.execute("INSERT INTO orders (id, total) VALUES (2, 1)")
        tx3.produce(topic, value=b"order 2")
    assert tx3.status is Status.COMMITTED
    assert env.ids() == [1, 2] and env.prepared() == []
    assert [m.value for m in env.read(topic)] == [b"order 1", b"order 2"]
    assert set(env.decisions()) == {tx1.gid, tx3.gid}
