"""The group committer's batching logic, on fake producers (``tests/fakes.py``; no
services): what is tested is who ends up in which Kafka transaction, who waits, and
that every member gets its batch's result. A batch is read back from the producers as
the decision records one transaction carried."""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import KafkaError

from coordinator import _group
from coordinator._kafka import KafkaResult
from coordinator._producers import ProducerPool, ProducerSlot
from coordinator._protocol import KafkaOutcome
from coordinator.config import GroupCommit, RetryPolicy
from coordinator.decision_log import DecisionRecord
from tests.fakes import FakeKafka, kafka_error

DECISIONS = "decisions"


def make(slots: int, group: GroupCommit, **producer: Any) -> tuple[_group.GroupCommitter,
                                                                   FakeKafka]:
    """A group committer over ``slots`` fake producers (``producer``: their attributes,
    e.g. ``commit_delay``)."""
    kafka = FakeKafka(defaults=producer)
    pool = ProducerPool([ProducerSlot(i, f"tid-{i}", 0, {}, 1.0, high_watermark=kafka.hw,
                                      factory=kafka.factory) for i in range(slots)])
    return _group.GroupCommitter(pool, DECISIONS, RetryPolicy(), 1.0, group), kafka


def batches(kafka: FakeKafka, outcome: str = "committed") -> list[list[str]]:
    """The gids of each Kafka transaction that ended with ``outcome``, in order."""
    return [t.keys(DECISIONS) for t in kafka.transactions if t.outcome == outcome]


def test_a_lone_transaction_does_not_wait() -> None:
    committer, kafka = make(1, GroupCommit(max_wait=5.0))
    ticket = committer.join(1.0)
    started = time.monotonic()
    result = ticket.commit([], DecisionRecord("g1"))
    assert time.monotonic() - started < 1.0  # max_wait is 5 s: it did not wait
    assert result.outcome is KafkaOutcome.COMMITTED
    assert batches(kafka) == [["g1"]]


def test_members_joined_together_share_one_transaction() -> None:
    committer, kafka = make(1, GroupCommit(max_wait=5.0, max_batch=64))
    tickets = [committer.join(1.0) for _ in range(5)]
    results: dict[int, KafkaResult] = {}

    def member(i: int) -> None:
        time.sleep(0.01 * i)  # they "prepare" at different speeds
        results[i] = tickets[i].commit([], DecisionRecord(f"g{i}"))

    threads = [threading.Thread(target=member, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(batches(kafka)) == 1
    assert sorted(batches(kafka)[0]) == [f"g{i}" for i in range(5)]
    assert all(r.outcome is KafkaOutcome.COMMITTED for r in results.values())


def test_a_member_that_withdraws_does_not_hold_the_batch() -> None:
    committer, kafka = make(1, GroupCommit(max_wait=30.0))
    ok = committer.join(1.0)
    failing = committer.join(1.0)
    done = threading.Event()

    def commit_ok() -> None:
        ok.commit([], DecisionRecord("ok"))
        done.set()

    t = threading.Thread(target=commit_ok)
    t.start()
    time.sleep(0.05)
    assert not done.is_set()  # waits for the other member, which is still "preparing"
    failing.cancel()  # its PREPARE failed
    assert done.wait(5.0), "the batch was held back by a member that withdrew"
    t.join(5)
    assert batches(kafka) == [["ok"]]


def test_every_member_gets_the_failure_of_the_shared_transaction() -> None:
    # The shared transaction fails before its commit (flush() raises): it is aborted.
    committer, kafka = make(1, GroupCommit(max_wait=5.0),
                            flush_error=kafka_error(KafkaError._MSG_TIMED_OUT))
    tickets = [committer.join(1.0) for _ in range(3)]
    results: list[KafkaResult] = []
    lock = threading.Lock()

    def member(i: int) -> None:
        r = tickets[i].commit([], DecisionRecord(f"g{i}"))
        with lock:
            results.append(r)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert batches(kafka) == []
    assert [sorted(b) for b in batches(kafka, "aborted")] == [["g0", "g1", "g2"]]
    assert len(results) == 3
    assert all(r.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT for r in results)


def test_max_batch_splits_batches() -> None:
    committer, kafka = make(1, GroupCommit(max_wait=1.0, max_batch=3), commit_delay=0.02)
    tickets = [committer.join(1.0) for _ in range(7)]
    threads = [threading.Thread(target=tickets[i].commit, args=([], DecisionRecord(f"g{i}")))
               for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(g for b in batches(kafka) for g in b) == sorted(f"g{i}" for i in range(7))
    assert all(len(b) <= 3 for b in batches(kafka))


def test_transactions_spread_over_producer_slots() -> None:
    committer, _ = make(4, GroupCommit())
    tickets = [committer.join(1.0) for _ in range(8)]
    assert sorted(t.slot.index for t in tickets) == [0, 0, 1, 1, 2, 2, 3, 3]
    for t in tickets:
        t.cancel()
