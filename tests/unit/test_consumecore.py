"""The consume loop's decisions, without a broker or a database: ``ConsumeLoop`` is a
generator of effects, so a test performs them itself (a scripted consumer, scripted
transaction outcomes) and reads what the loop asked for -- which sub-batches it ran,
when it slept, where it rewound, how it waited for recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)

from coordinator import (
    CommittedPendingRecovery,
    OutcomeUnknown,
    PoisonMessage,
    ServiceUnavailable,
)
from coordinator._consumecore import (
    ConsumeEffect,
    ConsumeLoop,
    ConsumerStats,
    ConsumeSettings,
    DeadLetter,
    HandlerFailed,
    Transact,
    handler_failures,
)
from coordinator._effects import Blocking, Execute, Result, Sleep, drive, run_now
from tests.fakes import FakeConsumer


def msgs(*offsets: int, partition: int = 0) -> list[Message]:
    return [Message(topic="in", partition=partition, offset=o, key=f"k{o}".encode(),
                    value=f"v{o}".encode(), headers=None, error=None) for o in offsets]


@dataclass
class World:
    """Performs the loop's effects: ``outcome(messages)`` is what the handler does
    (raise to fail); ``commit_errors``, what the next transactions raise after it."""

    consumer: FakeConsumer
    outcome: Callable[[Sequence[Message]], None]
    prepared: list[bool | Exception] = field(default_factory=list)
    """The answers to "is the gid still prepared?" (an exception: raised)."""
    commit_errors: list[Exception] = field(default_factory=list)
    unknown_committed: bool = False
    """An OutcomeUnknown of ``commit_errors`` is a transaction that did commit."""
    ran: list[list[int]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)

    def run(self, **settings: Any) -> ConsumerStats:
        loop = ConsumeLoop(cast(Consumer, self.consumer), ConsumeSettings(**settings),
                           lambda: self.consumer.done, kafka_timeout=1.0)
        return run_now(drive(loop.run(), self.perform))

    async def perform(self, effect: ConsumeEffect) -> Any:
        match effect:
            case Blocking(call):
                return call()
            case Sleep(seconds):
                self.slept.append(seconds)
            case Execute():
                answer = self.prepared.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return [Result("SELECT", [(1,)] if answer else [])]
            case Transact(messages, DeadLetter() as letter):
                self.letters.append(letter)
            case Transact(messages):
                self.ran.append([int(m.offset() or 0) for m in messages])
                with handler_failures():
                    self.outcome(messages)
                error = self.commit_errors.pop(0) if self.commit_errors else None
                if error is None or (isinstance(error, OutcomeUnknown)
                                     and self.unknown_committed):
                    for m in messages:  # the offsets commit with the transaction
                        p = int(m.partition() or 0)
                        self.consumer.group[p] = max(self.consumer.group.get(p, 0),
                                                     int(m.offset() or 0) + 1)
                if error is not None:
                    raise error
        return None


def poison_at(offset: int) -> Callable[[Sequence[Message]], None]:
    def outcome(messages: Sequence[Message]) -> None:
        if any(m.offset() == offset for m in messages):
            raise ValueError("poison")
    return outcome


def test_a_failing_batch_is_split_retried_and_dead_lettered() -> None:
    w = World(FakeConsumer([msgs(0, 1, 2, 3)]), poison_at(2))
    stats = w.run(max_attempts=2, dead_letter_topic="dlq")
    assert w.ran == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [2], [3]]
    assert [(d.topic, d.key) for d in w.letters] == [("dlq", b"k2")]
    headers = dict(w.letters[0].headers)
    assert headers["pk2pc.dlq.offset"] == b"2" and b"poison" in headers["pk2pc.dlq.error"]
    assert (stats.batches, stats.messages, stats.dead_lettered) == (3, 4, 1)
    assert stats.handler_failures == 4
    assert w.consumer.seeks == [(0, 4)]  # past everything committed or dead-lettered


def test_without_a_dead_letter_topic_the_loop_stops_at_the_poison_message() -> None:
    w = World(FakeConsumer([msgs(0, 1, 2, 3)]), poison_at(1))
    with pytest.raises(PoisonMessage) as info:
        w.run(max_attempts=1)
    assert (info.value.partition, info.value.offset) == (0, 1)
    assert w.ran == [[0, 1, 2, 3], [0, 1], [0], [1]]
    assert w.consumer.seeks == [(0, 1)]


def test_an_outage_is_not_the_handlers_failure() -> None:
    """A lost PostgreSQL connection in the handler: pause, rewind, consume again."""
    lost = [psycopg.OperationalError("server closed the connection unexpectedly")]

    def outcome(messages: Sequence[Message]) -> None:
        if lost:
            raise lost.pop()

    w = World(FakeConsumer([msgs(0, 1), msgs(0, 1)]), outcome)
    stats = w.run(dead_letter_topic="dlq")
    assert w.ran == [[0, 1], [0, 1]]
    assert w.slept == [0.2] and w.consumer.seeks == [(0, 0)]
    assert (stats.retries, stats.handler_failures, stats.dead_lettered) == (1, 0, 0)


def test_an_unknown_outcome_holds_the_consumer_until_recovery_decides() -> None:
    w = World(FakeConsumer([msgs(0, 1, 2)]), lambda messages: None,
              prepared=[True, True, False],
              commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")])
    stats = w.run()
    assert w.consumer.calls == ["pause", "poll", "poll", "resume"]
    assert stats.in_doubt == ["g-1"] and stats.batches == 0
    assert w.consumer.seeks == [(0, 0)]  # the committed offsets say which way it went


def test_messages_polled_while_waiting_are_consumed_again() -> None:
    """A rebalance during the wait assigns a partition that is not paused: what the
    polls return from it is rewound with the batch, never skipped."""
    consumer = FakeConsumer([msgs(0, 1)], polled=msgs(3, 4, partition=1))
    w = World(consumer, lambda messages: None, prepared=[True, True, True, False],
              commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")])
    w.run()
    assert consumer.calls == ["pause", "poll", "poll", "poll", "resume"]
    assert sorted(consumer.seeks) == [(0, 0), (1, 3)]


def test_the_wait_goes_on_through_a_postgres_outage() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    w = World(FakeConsumer([msgs(0, 1)]), lambda messages: None,
              prepared=[True, lost, lost, False],
              commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")])
    stats = w.run()
    assert w.consumer.calls == ["pause", "poll", "poll", "poll", "resume"]
    assert stats.in_doubt == ["g-1"] and w.consumer.seeks == [(0, 0)]


def test_what_ends_the_loop_leaves_the_consumer_at_the_committed_offsets() -> None:
    """An error the loop raises (here: the question to PostgreSQL failed for another
    reason than a lost connection) rewinds first: a new ``run_consumer`` on the same
    consumer skips nothing it read."""
    consumer = FakeConsumer([msgs(0, 1)], polled=msgs(3, partition=1))
    denied = psycopg.errors.InsufficientPrivilege("permission denied for pg_prepared_xacts")
    w = World(consumer, lambda messages: None, prepared=[True, denied],
              commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")])
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        w.run()
    assert consumer.calls == ["pause", "poll", "resume"]
    assert sorted(consumer.seeks) == [(0, 0), (1, 3)]


def test_committed_pending_recovery_counts_as_committed() -> None:
    w = World(FakeConsumer([msgs(0, 1)]), lambda messages: None,
              commit_errors=[CommittedPendingRecovery("COMMIT PREPARED failed", gid="g-2")])
    stats = w.run()
    assert (stats.batches, stats.messages, stats.retries) == (1, 2, 0)
    assert w.consumer.seeks == []  # nothing to go back to


def test_messages_of_partitions_no_longer_assigned_are_left_to_their_new_owner() -> None:
    w = World(FakeConsumer([msgs(0, 1) + msgs(5, partition=7)]), lambda messages: None)
    stats = w.run()
    assert w.ran == [[0, 1]] and stats.messages == 2


def test_messages_delivered_again_below_the_committed_offset_are_not_handled_again() -> None:
    """The consumer's position reset to the start of the partition (as librdkafka does
    when an offset lookup crosses a rebalance): what the loop committed is dropped."""
    consumer = FakeConsumer([msgs(0, 1, 2, 3), msgs(0, 1, 2, 3, 4, 5)])
    w = World(consumer, lambda messages: None)
    stats = w.run()
    assert w.ran == [[0, 1, 2, 3], [4, 5]]
    assert stats.messages == 6


def test_a_partition_new_to_the_loop_is_checked_against_the_group() -> None:
    """Another member committed up to 3 before this one got the partition and (its
    offset lookup gone wrong) reads it from 0."""
    consumer = FakeConsumer([msgs(0, 1, 2, 3, 4)], group={0: 3})
    w = World(consumer, lambda messages: None)
    w.run()
    assert w.ran == [[3, 4]]


def test_a_batch_wholly_below_the_committed_offset_moves_the_consumer_up() -> None:
    consumer = FakeConsumer([msgs(0, 1, 2), msgs(10, 11), msgs(12)], group={0: 10})
    w = World(consumer, lambda messages: None)
    w.run()
    assert w.ran == [[10, 11], [12]]
    assert consumer.seeks == [(0, 10)]
    assert consumer.committed_calls == 1  # reading on from where it was: nothing to ask


def test_committed_offsets_kafka_cannot_tell_are_asked_again() -> None:
    consumer = FakeConsumer([msgs(0, 1), msgs(0, 1)], group={0: 1}, committed_fails={1, 2})
    w = World(consumer, lambda messages: None)
    stats = w.run()
    assert w.ran == [[1]]
    assert consumer.seeks == [(0, 0)]  # the rewind's own question failed too: first offsets
    assert w.slept == [0.2] and stats.retries == 1


def test_an_unknown_outcome_that_committed_is_not_consumed_twice() -> None:
    """The rewind after the wait cannot read the committed offsets and goes back to
    the batch's first offsets; the batch comes again, and is found committed."""
    consumer = FakeConsumer([msgs(0, 1), msgs(0, 1), msgs(2)], committed_fails={2})
    w = World(consumer, lambda messages: None, prepared=[False], unknown_committed=True,
              commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")])
    w.run()
    assert w.ran == [[0, 1], [2]]
    assert consumer.seeks == [(0, 0), (0, 2)]  # the fallback, then up to the committed offset


def test_an_interrupt_inside_consume_rewinds_every_assigned_partition() -> None:
    """Ctrl-C (or a cancelled task) while consume() runs: it may have taken messages
    from the consumer that the loop never sees; a later run skips none of them."""
    consumer = FakeConsumer([msgs(5, 6)], group={0: 5, 1: 7},
                            consume_raises=KeyboardInterrupt())
    w = World(consumer, lambda messages: None)
    with pytest.raises(KeyboardInterrupt):
        w.run()
    assert w.ran == [[5, 6]]
    assert sorted(consumer.seeks) == [(0, 7), (1, 7)]


def test_a_poison_message_rewinds_the_batchs_other_partitions_too() -> None:
    consumer = FakeConsumer([msgs(0) + msgs(5, 6, partition=1)])
    w = World(consumer, poison_at(0))
    with pytest.raises(PoisonMessage):
        w.run(max_attempts=1)
    assert w.ran == [[0, 5, 6], [0]]
    assert sorted(consumer.seeks) == [(0, 0), (1, 5)]


def test_a_partition_without_a_committed_offset_goes_back_to_its_start() -> None:
    """Ctrl-C inside consume(): the call may have moved a partition the loop saw nothing
    of past messages it then dropped; with no committed offset in the group, nothing
    of it is committed, so it goes back to its start."""
    consumer = FakeConsumer([msgs(5, 6)], group={0: 5}, consume_raises=KeyboardInterrupt())
    w = World(consumer, lambda messages: None)
    with pytest.raises(KeyboardInterrupt):
        w.run()
    assert sorted(consumer.seeks) == [(0, 7), (1, OFFSET_BEGINNING)]


@dataclass
class Reassigning(FakeConsumer):
    """Before the second batch, partition 0 went to another member (which committed up
    to 21) and came back, its offset lookup gone wrong (it reads from 16)."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if len(self.batches) == 1:
            self.group[0] = 21
            self.generation += 2
        return super().consume(num_messages, timeout)


def test_a_partition_assigned_back_is_checked_against_the_group_again() -> None:
    consumer = Reassigning([msgs(*range(11)), msgs(*range(16, 21))])
    w = World(consumer, lambda messages: None)
    w.run()
    assert w.ran == [list(range(11))]
    assert consumer.seeks == [(0, 21)]


@dataclass
class Recreated(FakeConsumer):
    """Before the second batch, the topic was deleted and created again: the group has
    no offset of it any more."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if len(self.batches) == 1:
            self.group.pop(0, None)
        return super().consume(num_messages, timeout)


def test_a_topic_created_again_is_consumed_from_its_start() -> None:
    consumer = Recreated([msgs(*range(10)), msgs(0, 1, 2)])
    w = World(consumer, lambda messages: None)
    w.run()
    assert w.ran == [list(range(10)), [0, 1, 2]]


@dataclass
class HeldWorld(World):
    """Performs effects as the asyncio driver does when its task is cancelled during
    a consumer call: the call's result is handed over, the cancellation thrown in at
    the next effect instead of performing it. ``cancel_during``: the calls during which
    the task is cancelled, in order."""

    cancel_during: list[str] = field(default_factory=list)
    held: list[BaseException] = field(default_factory=list)

    async def perform(self, effect: ConsumeEffect) -> Any:
        if self.held:
            raise self.held.pop()
        result = await super().perform(effect)
        if isinstance(effect, Blocking):
            name = getattr(getattr(effect.call, "func", effect.call), "__name__", "")
            if self.cancel_during and name == self.cancel_during[0]:
                self.cancel_during.pop(0)
                self.held.append(asyncio.CancelledError())
        return result


def test_a_cancellation_at_the_end_of_the_wait_for_recovery_still_rewinds() -> None:
    consumer = FakeConsumer([msgs(0, 1)])
    w = HeldWorld(consumer, lambda messages: None, prepared=[True, False],
                  commit_errors=[OutcomeUnknown("the Kafka commit timed out", gid="g-1")],
                  cancel_during=["resume"])
    with pytest.raises(asyncio.CancelledError):
        w.run()
    assert consumer.seeks == [(0, 0)]


@dataclass
class PartitionError(FakeConsumer):
    """The check's question is answered with an error for the partition."""

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.committed_calls == 0:
            self.committed_calls += 1
            return [cast(TopicPartition, SimpleNamespace(
                topic=tp.topic, partition=tp.partition, offset=-1001,
                error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))) for tp in tps]
        return super().committed(tps, timeout)


def test_a_cancellation_while_the_check_fails_still_rewinds() -> None:
    consumer = PartitionError([msgs(0, 1)])
    w = HeldWorld(consumer, lambda messages: None, cancel_during=["committed"])
    with pytest.raises(asyncio.CancelledError):
        w.run()
    assert (0, 0) in consumer.seeks


@dataclass
class DeadLetterOutage(World):
    """The first dead-letter transaction fails: Kafka is down."""

    async def perform(self, effect: ConsumeEffect) -> Any:
        if isinstance(effect, Transact) and effect.dead_letter is not None and not self.letters:
            self.letters.append(effect.dead_letter)
            raise ServiceUnavailable("Kafka: broker down")
        return await super().perform(effect)


def test_an_outage_during_the_dead_letter_transaction_is_retried() -> None:
    w = DeadLetterOutage(FakeConsumer([msgs(0), msgs(0)]), poison_at(0))
    stats = w.run(max_attempts=1, dead_letter_topic="dlq")
    assert len(w.letters) == 2 and stats.dead_lettered == 1 and stats.retries == 1


def test_a_second_cancellation_during_the_guard_still_rewinds() -> None:
    consumer = FakeConsumer([msgs(5, 6)], group={0: 5, 1: 7})
    w = HeldWorld(consumer, lambda messages: None, cancel_during=["consume", "assignment"])
    with pytest.raises(asyncio.CancelledError):
        w.run()
    assert sorted(consumer.seeks) == [(0, 5), (1, 7)]


def test_a_long_outage_does_not_end_the_loop() -> None:
    """1100 back-offs in a row (about 90 minutes of an outage at 5 s each)."""
    lost = psycopg.OperationalError("server closed the connection unexpectedly")

    def outcome(messages: Sequence[Message]) -> None:
        raise lost

    w = World(FakeConsumer([msgs(0) for _ in range(1100)]), outcome)
    stats = w.run()
    assert stats.retries == 1100 and max(w.slept) == 5.0


@dataclass
class JumpsAhead(FakeConsumer):
    """A rebalance before the second batch, and partition 0's offset lookup fell back to
    ``auto.offset.reset=latest``: it reads from 15 although the group committed 10. Sent
    back to 10, it hands over 15 again (10-14 were control records or aborted ones)."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if len(self.batches) == 2:
            self.generation += 1
        return super().consume(num_messages, timeout)


def test_a_partition_that_starts_above_the_committed_offset_is_sent_back_once() -> None:
    consumer = JumpsAhead([msgs(*range(10)), msgs(15, 16), msgs(15, 16)])
    w = World(consumer, lambda messages: None)
    w.run()
    assert consumer.seeks == [(0, 10)]
    assert w.ran == [list(range(10)), [15, 16]]  # a true gap costs one fetch more


@dataclass
class RecreatedSlowly(FakeConsumer):
    """Before the second batch the topic was deleted and created again (the group has no
    offset of it) and the check's question to Kafka times out."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if len(self.batches) == 1:
            self.group.pop(0, None)
            self.generation += 1
        return super().consume(num_messages, timeout)


def test_a_topic_created_again_is_not_rewound_past_its_start() -> None:
    consumer = RecreatedSlowly([msgs(*range(10)), msgs(0, 1, 2)], committed_fails={2})
    w = World(consumer, lambda messages: None)
    w.run()
    assert consumer.seeks == [(0, 0)]


def test_handler_failures_tell_an_outage_from_the_handlers_own_failure() -> None:
    with pytest.raises(ServiceUnavailable), handler_failures():
        raise psycopg.OperationalError("connection lost")
    with pytest.raises(HandlerFailed) as info, handler_failures():
        raise psycopg.errors.UniqueViolation("duplicate key")
    assert isinstance(info.value.cause, psycopg.errors.UniqueViolation)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ConsumeSettings(batch_size=0)
