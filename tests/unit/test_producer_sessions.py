"""A gid's Kafka commit may use only the producer session taken before its PREPARE,
and a slot's producer is replaced after any failed, aborted or unknown transaction
before another transaction uses the slot. Fake producers (``tests/fakes.py``): the
cases depend on Kafka-internal timing that a real broker does not produce on demand."""

from __future__ import annotations

from typing import Any

import tenacity
from confluent_kafka import KafkaError

from coordinator._group import GroupCommitter
from coordinator._kafka import StagedMessage, run_transaction
from coordinator._producers import ProducerPool, ProducerSlot
from coordinator._protocol import KafkaOutcome
from coordinator.config import GroupCommit, RetryPolicy
from coordinator.decision_log import DecisionRecord
from tests.fakes import FakeKafka, kafka_error

NO_WAIT = RetryPolicy(stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_none(),
                      sleep=lambda s: None)


def slot_of(kafka: FakeKafka) -> ProducerSlot:
    return ProducerSlot(0, "pk2pc.t:i:0", 3, {}, 1.0, high_watermark=kafka.hw,
                        factory=kafka.factory)


def commit(slot: ProducerSlot, generation: int, gid: str = "g") -> Any:
    return run_transaction(slot, [StagedMessage("orders", b"v")], [DecisionRecord(gid)],
                           "decisions", NO_WAIT, 1.0, gid, generation=generation)


def test_session_is_started_when_taken_and_reused() -> None:
    kafka = FakeKafka()
    slot = slot_of(kafka)
    s1 = slot.session()
    s2 = slot.session()
    assert s1.generation == s2.generation == 1
    assert len(kafka.producers) == 1 and kafka.producers[0].calls == ["init"]
    assert s1.floor == kafka.high_watermark  # observed when the session started


def test_a_session_replaced_after_prepare_cannot_commit() -> None:
    # The reproduced divergence: a transaction's producer was dropped and a new one
    # made after its PREPARE; recovery's fence came in between, so the new producer's
    # epoch is newer than the fence. It must not carry that transaction's commit.
    kafka = FakeKafka()
    slot = slot_of(kafka)
    before_prepare = slot.session()
    slot.discard()                  # e.g. another failure on the slot
    slot.session()                  # a new producer, initialised after PREPARE
    result = commit(slot, before_prepare.generation)
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert "replaced" in result.detail
    assert all("commit" not in p.calls and "begin" not in p.calls for p in kafka.producers)


def test_no_producer_is_created_at_commit_time() -> None:
    kafka = FakeKafka()
    slot = slot_of(kafka)
    session = slot.session()
    slot.discard()
    result = commit(slot, session.generation)
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert len(kafka.producers) == 1  # run_transaction never starts a session


def test_abortable_error_after_a_retried_commit_is_unknown() -> None:
    timed_out = kafka_error(KafkaError._TIMED_OUT, retriable=True)
    abortable = kafka_error(KafkaError.INVALID_TXN_STATE, txn_requires_abort=True)
    kafka = FakeKafka(script=[{"commit_errors": [timed_out, abortable]}])
    slot = slot_of(kafka)
    result = commit(slot, slot.session().generation)
    assert result.outcome is KafkaOutcome.UNKNOWN
    assert kafka.producers[0].calls.count("commit") == 2
    assert "abort" not in kafka.producers[0].calls
    assert not slot.alive


def test_abortable_error_on_the_first_commit_attempt_is_unknown_too() -> None:
    # librdkafka may re-send EndTxn within one commit_transaction() call: an abortable
    # answer to the re-send says nothing about the first one, which may have committed.
    abortable = kafka_error(KafkaError.INVALID_PRODUCER_ID_MAPPING, txn_requires_abort=True)
    kafka = FakeKafka(script=[{"commit_errors": [abortable]}])
    slot = slot_of(kafka)
    result = commit(slot, slot.session().generation)
    assert result.outcome is KafkaOutcome.UNKNOWN
    assert "abort" not in kafka.producers[0].calls
    assert not slot.alive


def test_the_slot_gets_a_fresh_producer_after_every_failure() -> None:
    # librdkafka has no KIP-890 protection: a late request of a failed transaction
    # could land in the next transaction of the same epoch. A new producer (new
    # epoch) must be initialised before the slot is used again.
    timed_out = kafka_error(KafkaError._TIMED_OUT, retriable=True)
    abortable = kafka_error(KafkaError.INVALID_TXN_STATE, txn_requires_abort=True)
    fenced = kafka_error(KafkaError._FENCED, fatal=True)
    scripts: list[dict[str, Any]] = [
        {"commit_errors": [timed_out] * 5},            # retries spent: unknown
        {"commit_errors": [abortable]},                # unknown
        {"commit_errors": [fenced]},                   # fatal: unknown
        {"flush_error": kafka_error(KafkaError.MSG_SIZE_TOO_LARGE)},  # before commit
        {},
    ]
    kafka = FakeKafka(script=list(scripts))
    slot = slot_of(kafka)
    outcomes = []
    for i in range(len(scripts)):
        session = slot.session()
        assert session.generation == i + 1
        assert kafka.producers[-1].calls[0] == "init"
        outcomes.append(commit(slot, session.generation, f"g{i}").outcome)
        if i < len(scripts) - 1:
            assert not slot.alive
    assert outcomes == [KafkaOutcome.UNKNOWN, KafkaOutcome.UNKNOWN, KafkaOutcome.UNKNOWN,
                        KafkaOutcome.FAILED_BEFORE_COMMIT, KafkaOutcome.COMMITTED]
    assert len(kafka.producers) == len(scripts)
    for p in kafka.producers[:-1]:
        assert "close" in p.calls


def test_floor_moves_past_each_delivered_decision() -> None:
    kafka = FakeKafka(high_watermark=40)
    slot = slot_of(kafka)
    assert slot.session().floor == 40
    kafka.producers[0].next_offset = 100  # message at 100, decision at 101
    assert commit(slot, slot.session().generation).outcome is KafkaOutcome.COMMITTED
    assert slot.session().floor == 102


def test_group_commit_rolls_back_members_of_a_replaced_session() -> None:
    kafka = FakeKafka()
    slot = slot_of(kafka)
    committer = GroupCommitter(ProducerPool([slot]), "decisions", NO_WAIT, 1.0,
                               GroupCommit(max_wait=0.0))
    stale = committer.join(1.0)             # took session 1 before its PREPARE
    slot.discard()                          # a batch before it failed
    fresh = committer.join(1.0)             # session 2
    assert (stale.session.generation, fresh.session.generation) == (1, 2)
    r_stale = stale.commit([StagedMessage("orders", b"a")], DecisionRecord("stale"))
    r_fresh = fresh.commit([StagedMessage("orders", b"b")], DecisionRecord("fresh"))
    assert r_stale.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert r_fresh.outcome is KafkaOutcome.COMMITTED
    assert "begin" not in kafka.producers[0].calls and "close" in kafka.producers[0].calls
    assert kafka.producers[1].calls.count("commit") == 1
