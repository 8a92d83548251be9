"""The group committer's batching logic, with the Kafka transaction replaced by a
recorder (no services: what is tested is who ends up in which batch, who waits,
and that every member gets its batch's result)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from coordinator import _group
from coordinator._kafka import KafkaResult
from coordinator._producers import ProducerPool, ProducerSlot
from coordinator._protocol import KafkaOutcome
from coordinator.config import GroupCommit, RetryPolicy
from coordinator.decision_log import DecisionRecord
from tests.fakes import FakeKafka


class Recorder:
    def __init__(self, outcome: KafkaOutcome = KafkaOutcome.COMMITTED, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.outcome = outcome
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, slot: ProducerSlot, messages: Sequence[Any],
                 decisions: Sequence[DecisionRecord], *args: Any, **kwargs: Any) -> KafkaResult:
        time.sleep(self.delay)
        with self.lock:
            self.batches.append([d.gid for d in decisions])
        return KafkaResult(self.outcome, detail=f"batch of {len(decisions)}")


def make(slots: int, monkeypatch: pytest.MonkeyPatch, recorder: Recorder,
         group: GroupCommit) -> _group.GroupCommitter:
    monkeypatch.setattr(_group, "run_transaction", recorder)
    kafka = FakeKafka()
    pool = ProducerPool([ProducerSlot(i, f"tid-{i}", 0, {}, 1.0, high_watermark=kafka.hw,
                                      factory=kafka.factory) for i in range(slots)])
    return _group.GroupCommitter(pool, "decisions", RetryPolicy(), 1.0, group)


def test_a_lone_transaction_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    committer = make(1, monkeypatch, rec, GroupCommit(max_wait=5.0))
    ticket = committer.join(1.0)
    started = time.monotonic()
    result = ticket.commit([], DecisionRecord("g1"))
    assert time.monotonic() - started < 1.0  # max_wait is 5 s: it did not wait
    assert result.outcome is KafkaOutcome.COMMITTED
    assert rec.batches == [["g1"]]


def test_members_joined_together_share_one_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    committer = make(1, monkeypatch, rec, GroupCommit(max_wait=5.0, max_batch=64))
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
    assert len(rec.batches) == 1
    assert sorted(rec.batches[0]) == [f"g{i}" for i in range(5)]
    assert all(r.outcome is KafkaOutcome.COMMITTED for r in results.values())


def test_a_member_that_withdraws_does_not_hold_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    committer = make(1, monkeypatch, rec, GroupCommit(max_wait=30.0))
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
    assert rec.batches == [["ok"]]


def test_every_member_gets_the_failure_of_the_shared_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(outcome=KafkaOutcome.FAILED_BEFORE_COMMIT)
    committer = make(1, monkeypatch, rec, GroupCommit(max_wait=5.0))
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
    assert len(rec.batches) == 1 and len(results) == 3
    assert all(r.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT for r in results)


def test_max_batch_splits_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(delay=0.02)
    committer = make(1, monkeypatch, rec, GroupCommit(max_wait=1.0, max_batch=3))
    tickets = [committer.join(1.0) for _ in range(7)]
    threads = [threading.Thread(target=tickets[i].commit, args=([], DecisionRecord(f"g{i}")))
               for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(g for b in rec.batches for g in b) == sorted(f"g{i}" for i in range(7))
    assert all(len(b) <= 3 for b in rec.batches)


def test_transactions_spread_over_producer_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    committer = make(4, monkeypatch, Recorder(), GroupCommit())
    tickets = [committer.join(1.0) for _ in range(8)]
    assert sorted(t.slot.index for t in tickets) == [0, 0, 1, 1, 2, 2, 3, 3]
    for t in tickets:
        t.cancel()
