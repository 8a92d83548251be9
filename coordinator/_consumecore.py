"""The consume loop's decisions, free of I/O: one copy for both drivers.

:class:`ConsumeLoop` is what ``run_consumer`` does, written as a generator of
effects (``_effects.py``): it yields "make this blocking consumer call"
(:class:`Blocking`: consume a batch, read the assignment, rewind, pause,
resume), "sleep" (:class:`Sleep`), "ask PostgreSQL" (:class:`Execute` on a
pooled connection), and "run these messages in one coordinated transaction"
(:class:`Transact`: with the handler, or producing a dead letter), and it
receives each result or has its exception thrown in. What to do after a
batch's outcome -- commit, split, retry, dead-letter, wait for recovery,
rewind and consume again -- is decided here only.

The synchronous driver (``_consume.py``) and the asyncio one (``_aconsume.py``)
only perform the effects; both go through :func:`drive`, one loop written as a
coroutine: the synchronous driver's ``perform`` never suspends, so
:func:`run_now` finishes that coroutine in a single step, without an event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from ._consumed import rewind
from ._effects import Blocking, Execute, Result, Sleep
from ._enums import Phase
from ._errmap import describe, is_connection_error
from ._logging import log_extra
from ._txcore import TransactionCore
from .errors import (
    CommittedPendingRecovery,
    ConfigurationError,
    Diverged,
    Error,
    OutcomeUnknown,
    PoisonMessage,
    ServiceUnavailable,
    UsageError,
)
from .gid import GID_PREFIX

__all__ = [
    "ConsumeEffect",
    "ConsumeLoop",
    "ConsumeSettings",
    "ConsumerStats",
    "DeadLetter",
    "HandlerFailed",
    "Transact",
    "handler_failures",
]

log = logging.getLogger("coordinator.consume")

T = TypeVar("T")
E = TypeVar("E")


@dataclass
class ConsumerStats:
    """What a ``run_consumer`` run did."""

    batches: int = 0
    """Transactions committed (batches, sub-batches and dead-letter transactions)."""
    messages: int = 0
    """Messages whose offsets were committed (dead-lettered ones included)."""
    dead_lettered: int = 0
    handler_failures: int = 0
    retries: int = 0
    """Batches retried after a failure that was not the handler's."""
    in_doubt: list[str] = field(default_factory=list)
    """gids the loop waited for recovery to decide."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A consumed message as it goes to the dead-letter topic."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]

    def produce(self, tx: TransactionCore) -> None:
        tx.produce(self.topic, value=self.value, key=self.key, headers=self.headers)


@dataclass(frozen=True, slots=True)
class Transact:
    """Run one coordinated transaction that consumes ``messages`` (its Kafka
    transaction commits their offsets): without ``dead_letter``, the handler
    does the work, inside :func:`handler_failures`; with it, the transaction
    only produces the dead letter. Returns nothing; raises what the
    transaction raised."""

    messages: list[Message]
    dead_letter: DeadLetter | None = None


ConsumeEffect = Blocking | Sleep | Execute | Transact
_Flow = Generator[ConsumeEffect, Any, T]


def _partition(m: Message) -> tuple[str, int]:
    return str(m.topic()), int(m.partition() or 0)


def _offset_range(messages: Sequence[Message]) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition, the lowest and the highest offset of ``messages``."""
    found: dict[tuple[str, int], tuple[int, int]] = {}
    for m in messages:
        key, offset = _partition(m), int(m.offset() or 0)
        low, high = found.get(key, (offset, offset))
        found[key] = (min(low, offset), max(high, offset))
    return found


class HandlerFailed(Exception):
    """The handler raised ``cause``: the batch's own failure."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@contextlib.contextmanager
def handler_failures() -> Iterator[None]:
    """Around the handler's call: what it raises is the batch's failure
    (:class:`HandlerFailed`), except a lost PostgreSQL connection, which is an
    outage (:class:`ServiceUnavailable`: consume again, no dead-lettering)."""
    try:
        yield
    except Exception as exc:
        if is_connection_error(exc):
            raise ServiceUnavailable(f"PostgreSQL: {describe(exc)}",
                                     phase=Phase.EXECUTE) from exc
        raise HandlerFailed(exc) from exc


@dataclass(frozen=True, slots=True)
class ConsumeSettings:
    """``run_consumer``'s parameters (see ``Coordinator.run_consumer``)."""

    batch_size: int = 500
    batch_timeout: float = 0.1
    max_attempts: int = 5
    dead_letter_topic: str | None = None
    sleep: Callable[[float], None] = time.sleep
    """The pause between retries (a test seam)."""
    decision_poll: float = 1.0
    """How long each poll of the consumer lasts while waiting for recovery."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_attempts < 1 or self.batch_timeout < 0:
            raise ValueError("batch_size and max_attempts must be >= 1, batch_timeout >= 0")


@dataclass
class ConsumeLoop:
    """The state and the decisions of one ``run_consumer`` run (see ``_consume.py``)."""

    consumer: Consumer
    settings: ConsumeSettings
    stopped: Callable[[], bool]
    kafka_timeout: float
    name: str | None = None
    """The coordinator's name and instance (for the log records' fields)."""
    instance: str | None = None
    stats: ConsumerStats = field(default_factory=ConsumerStats)
    attempts: dict[tuple[str, int, int], int] = field(default_factory=dict)
    failures_in_a_row: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    """Per partition, an offset the group's committed offset is known to have reached
    (by this loop's own commits, or as Kafka answered)."""
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    """Per partition, the offset after the last message the loop read, as long as
    nothing is known to have moved the consumer elsewhere (a rewind or a rebalance
    forgets it)."""
    group_metadata: object = None
    """The consumer's group metadata when last looked at (it changes with the group's
    generation, at every rebalance)."""

    def run(self) -> _Flow[ConsumerStats]:
        """Consume and handle batches until stopped."""
        consume = functools.partial(self.consumer.consume,
                                    num_messages=self.settings.batch_size,
                                    timeout=self.settings.batch_timeout)
        while not self.stopped():
            read: list[Message] = []
            try:
                for m in (yield Blocking(consume)):
                    err = m.error()
                    if err is None:
                        read.append(m)
                    elif err.fatal():
                        raise KafkaException(err)
                    elif m.partition() is not None and m.partition() >= 0:
                        # e.g. _AUTO_OFFSET_RESET: that partition may have stopped
                        log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(),
                                    err.str(), extra=self._extra())
                    else:
                        log.debug("consumer event: %s", err.str(), extra=self._extra())
                yield from self._follow_rebalances()
                batch = yield from self._not_committed(read)
                if batch is None:  # Kafka did not say what is committed: try again later
                    yield from self._rewind(read)
            except GeneratorExit:
                raise
            except BaseException:
                # Ctrl-C or a cancelled task inside consume(), a fatal consumer error:
                # the consumer may have handed over messages this loop never saw, so
                # every assigned partition goes back to its committed offset.
                yield from self._shielded(functools.partial(self._rewind_assigned, read))
                raise
            if batch is None:
                yield from self._back_off()
            elif batch:
                yield from self.batch(batch)
        return self.stats

    def _follow_rebalances(self) -> _Flow[None]:
        """Forget every partition's position when the group's generation changed (the
        consumer's group metadata, read locally, carries it): a partition revoked and
        assigned back, even within one consume() call, starts from an offset lookup,
        so its next batch is checked against the group's committed offset."""
        try:
            metadata = yield Blocking(self.consumer.consumer_group_metadata)
        except (KafkaException, RuntimeError):  # RuntimeError: librdkafka returned none
            metadata = None
        if metadata is None or metadata != self.group_metadata:
            self.position.clear()
        self.group_metadata = metadata

    def _not_committed(self, read: list[Message]) -> _Flow[list[Message] | None]:
        """``read`` without the messages that are already committed; None when Kafka
        could not say which those are.

        A consumer can hand over committed messages again: its position is set from
        the group's committed offsets at each assignment, and when that goes wrong
        (an offset answer that crosses a rebalance; a seek that crosses the offset
        lookup) it starts from ``auto.offset.reset`` -- with ``earliest``, the start of
        the partition -- and a second transaction would consume what the first one
        did. An active group's committed offsets only grow, so a message below one is
        done: it is dropped here, and the consumer moved up to the committed offset.
        Where this loop's own commits reached is known at no cost; the group's
        committed offset is asked from Kafka for a partition the loop is not reading
        on from where it was: new to it, rewound, read from below its last position,
        or after a rebalance (:meth:`_follow_rebalances`)."""
        if not read:
            return read
        spans = _offset_range(read)
        first = {key: low for key, (low, _) in spans.items()}
        last = {key: high for key, (_, high) in spans.items()}
        ask = [key for key, offset in first.items()
               if key not in self.position or offset < self.position[key]]
        if ask:
            try:
                answer = yield Blocking(functools.partial(
                    self.consumer.committed, [TopicPartition(t, p) for t, p in ask],
                    self.kafka_timeout))
                for tp in answer:
                    if tp.error is not None:
                        raise KafkaException(tp.error)
            except KafkaException as exc:
                log.warning("cannot read the committed offsets of %s (%s); consuming "
                            "again", ask, describe(exc), extra=self._extra())
                return None
            for tp in answer:
                if tp.offset >= 0:
                    self._known_committed((tp.topic, tp.partition), tp.offset)
                else:  # none at all: the group's offsets of it were deleted (the topic
                    # deleted and created again), so what the loop committed is gone too
                    self.committed.pop((tp.topic, tp.partition), None)
        # Asked, and answered: a partition that starts above the group's committed
        # offset may have been moved there by auto.offset.reset=latest (or an answer
        # gone wrong). Send it back once and trust what it hands over from there: a gap
        # of control records or aborted transactions comes again, a skip does not.
        ahead = {key: self.committed[key] for key in ask
                 if key in self.committed and self.committed[key] < first[key]}
        for key, offset in ahead.items():
            log.debug("%s[%d] starts at %d, above the group's committed offset %d: "
                      "reading it again from there", key[0], key[1], first[key], offset,
                      extra=self._extra())
            try:
                yield Blocking(functools.partial(
                    self.consumer.seek, TopicPartition(key[0], key[1], offset)))
            except KafkaException:
                ahead[key] = -1  # no longer assigned
        batch = [m for m in read if (key := _partition(m)) not in ahead
                 and int(m.offset() or 0) >= self.committed.get(key, 0)]
        self.position.update((key, offset + 1) for key, offset in last.items())
        for key, offset in ahead.items():
            if offset >= 0:
                self.position[key] = offset  # what it hands over from there is trusted
            else:
                self.position.pop(key, None)
        if len(batch) == len(read):
            return batch
        for key, floor in ((k, self.committed.get(k, 0)) for k in first):
            if first[key] >= floor:
                continue
            log.warning("%s[%d]: offsets %d to %d delivered again although the group's "
                        "committed offset is %d (the consumer's position was reset); "
                        "not handling them again", key[0], key[1], first[key],
                        min(last[key], floor - 1), floor, extra=self._extra())
            if last[key] < floor:  # nothing of it left in the batch: jump ahead
                try:
                    yield Blocking(functools.partial(
                        self.consumer.seek, TopicPartition(key[0], key[1], floor)))
                    self.position[key] = floor
                except KafkaException:
                    self.position.pop(key, None)  # no longer assigned
        return batch

    def _known_committed(self, key: tuple[str, int], offset: int) -> None:
        self.committed[key] = max(self.committed.get(key, 0), offset)

    def _shielded(self, flow: Callable[[], _Flow[None]]) -> _Flow[None]:
        """A guard's rewind: an error in it is dropped (the guard re-raises its own), and a
        cancellation thrown in at one of its effects (the asyncio driver raises a
        cancellation it held instead of performing the next effect) runs it once more."""
        try:
            yield from flow()
        except Exception:
            pass
        except GeneratorExit:
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                yield from flow()
            raise

    def _back_off(self) -> _Flow[None]:
        self.failures_in_a_row += 1
        self.stats.retries += 1
        yield Sleep(min(5.0, 0.1 * 2 ** min(self.failures_in_a_row, 6)), self.settings.sleep)

    def _rewind_assigned(self, read: Sequence[Message]) -> _Flow[None]:
        """Every assigned partition back to the group's committed offset; where that
        cannot be read, to the first offset of ``read`` (what the loop saw of it), and
        a partition of which the loop saw nothing stays put (no offset is guessed)."""
        assignment = yield Blocking(self.consumer.assignment)
        fallback: dict[tuple[str, int], int | None] = {
            (tp.topic, tp.partition): None for tp in assignment}
        fallback.update((key, low) for key, (low, _) in _offset_range(read).items())
        self.position.clear()
        yield Blocking(functools.partial(rewind, self.consumer, fallback, self.kafka_timeout,
                                         self._extra()))

    def batch(self, messages: list[Message]) -> _Flow[None]:
        """Commit or dead-letter every message of a consumed batch, in order.

        Whatever ends it early (an error, a cancelled task, Ctrl-C), the consumer
        is first moved back to the committed offsets, as far as Kafka answers: a
        message the loop read but did not commit is not skipped by a later
        ``run_consumer`` on the same consumer."""
        read = list(messages)
        """Every message the consumer returned while handling the batch."""
        try:
            if (yield from self._settle(messages, read)):
                return
            # Failed transactions rewound the consumer; move it to the committed offsets
            # (past everything committed or dead-lettered, at anything that was not).
            yield from self._rewind(read)
        except GeneratorExit:
            raise  # the flow is closed: no more effects
        except BaseException:  # an error, a poison message, a cancelled task, Ctrl-C
            # (a poison message's partition goes back to it: it is the first message
            # of its partition that did not commit)
            yield from self._shielded(functools.partial(self._rewind, read))
            raise

    def _settle(self, messages: list[Message], read: list[Message]) -> _Flow[bool]:
        """:meth:`batch`'s work; whether the consumer is where it should be (every
        message committed in order, nothing to rewind)."""
        pending: list[list[Message]] = [messages]
        rewound = False
        while pending and not self.stopped():
            whole = pending.pop(0)
            part = yield from self._owned(whole)
            if len(part) < len(whole):
                rewound = True  # make sure nothing dropped here is skipped if it stays ours
            if not part:
                continue
            try:
                try:
                    yield from self._commit(part)
                    self.failures_in_a_row = 0
                    continue
                except HandlerFailed as exc:
                    cause = exc.cause
                # Outside the except clause: what the dead-letter transaction raises
                # is handled below like any transaction's failure.
                rewound = True
                self.stats.handler_failures += 1
                pending[:0] = yield from self._after_handler_failure(part, cause)
            except OutcomeUnknown as exc:
                yield from self._wait_decided(exc.gid, read)
                return False  # the committed offsets say which way it went
            except (Diverged, PoisonMessage, UsageError, ConfigurationError):
                raise  # nothing to retry: a human (or the program) must act
            except Error as exc:
                # The coordinator's failure, not the handler's (a service down, a
                # rebalance fencing the batch): go back to the committed offsets and
                # consume again, which also serves the consumer's group events.
                log.warning("batch of %d rolled back (%s); consuming it again", len(part), exc,
                            extra=self._extra(exc.gid))
                yield from self._back_off()
                return False
        return not rewound and not self.stopped()

    def _commit(self, part: list[Message]) -> _Flow[None]:
        # CommittedPendingRecovery: committed; only COMMIT PREPARED is left to recovery
        with contextlib.suppress(CommittedPendingRecovery):
            yield Transact(part)
        self._committed(part)
        self.stats.batches += 1
        self.stats.messages += len(part)

    def _committed(self, part: Sequence[Message]) -> None:
        for m in part:
            self._known_committed(_partition(m), int(m.offset() or 0) + 1)

    def _after_handler_failure(self, part: list[Message],
                               cause: BaseException) -> _Flow[list[list[Message]]]:
        """What to try next after the handler failed on ``part``."""
        if len(part) > 1:
            half = len(part) // 2
            log.info("handler failed on a batch of %d (%s): splitting it", len(part),
                     describe(cause), extra=self._extra())
            return [part[:half], part[half:]]
        msg = part[0]
        key = (str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0))
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] < self.settings.max_attempts:
            return [part]
        if self.settings.dead_letter_topic is None:
            raise PoisonMessage(
                f"the handler failed {self.attempts[key]} times on {key[0]}[{key[1]}] offset "
                f"{key[2]} ({describe(cause)}) and there is no dead-letter topic; the "
                "consumer stays at that message", topic=key[0], partition=key[1],
                offset=key[2]) from cause
        yield from self._dead_letter(msg, cause, self.settings.dead_letter_topic)
        return []

    def _dead_letter(self, msg: Message, cause: BaseException, topic: str) -> _Flow[None]:
        headers: list[tuple[str, bytes]] = []
        for item in msg.headers() or []:
            k, v = item[0], item[1]
            headers.append((str(k), v if isinstance(v, bytes) else str(v or "").encode()))
        headers += [("pk2pc.dlq.topic", str(msg.topic()).encode()),
                    ("pk2pc.dlq.partition", str(msg.partition()).encode()),
                    ("pk2pc.dlq.offset", str(msg.offset()).encode()),
                    ("pk2pc.dlq.error", describe(cause).encode())]
        with contextlib.suppress(CommittedPendingRecovery):  # committed; recovery ends it
            yield Transact([msg], DeadLetter(topic, msg.value(), msg.key(), headers))
        self._committed([msg])
        self.stats.batches += 1
        self.stats.messages += 1
        self.stats.dead_lettered += 1
        log.warning("%s[%s] offset %s written to the dead-letter topic %s after %d attempts "
                    "(%s)", msg.topic(), msg.partition(), msg.offset(), topic,
                    self.settings.max_attempts, describe(cause), extra=self._extra())

    def _owned(self, part: list[Message]) -> _Flow[list[Message]]:
        """The messages of partitions still assigned to the consumer: a rebalance
        moved the others, whose new owner starts from the committed offsets."""
        try:
            assignment = yield Blocking(self.consumer.assignment)
        except KafkaException:
            return part
        assigned = {(tp.topic, tp.partition) for tp in assignment}
        return [m for m in part if (m.topic(), m.partition()) in assigned]

    def _rewind(self, messages: Sequence[Message]) -> _Flow[None]:
        # Where to go when the group's committed offsets cannot be read: the batch's
        # first offsets (what of them is committed, the next batch's check drops).
        first = {key: low for key, (low, _) in _offset_range(messages).items()}
        for key in first:
            self.position.pop(key, None)
        yield Blocking(functools.partial(rewind, self.consumer, first, self.kafka_timeout,
                                         self._extra()))

    def _extra(self, gid: str | None = None) -> dict[str, object]:
        """Log fields: the consume loop's own records have the phase ``consume``."""
        if gid is not None and not gid.startswith(GID_PREFIX + ":"):
            gid = None  # "(txid ...)": no gid was chosen
        return log_extra(gid=gid, phase="consume", name=self.name, instance=self.instance)

    def _wait_decided(self, gid: str | None, read: list[Message]) -> _Flow[None]:
        """Hold the consumer (its partitions paused, still polled so it stays in the
        group) until ``gid`` is no longer prepared: recovery has decided it. A
        rebalance meanwhile may give the consumer partitions that are not paused:
        the messages the polls return go to ``read``, to be rewound with the batch."""
        if gid is None:
            return
        self.stats.in_doubt.append(gid)
        consumer = self.consumer
        assignment = yield Blocking(consumer.assignment)
        yield Blocking(functools.partial(consumer.pause, assignment))
        started = time.monotonic()
        try:
            while not self.stopped() and (yield from self._prepared(gid)):
                m = yield Blocking(functools.partial(consumer.poll, self.settings.decision_poll))
                if m is not None and m.error() is None:
                    read.append(m)
                elif m is not None and m.error().fatal():
                    raise KafkaException(m.error())
                if time.monotonic() - started > 60:
                    log.warning("gid=%s still in doubt after %.0f s: is the recovery job "
                                "scheduled?", gid, time.monotonic() - started,
                                extra=self._extra(gid))
                    started = time.monotonic()
        finally:
            yield Blocking(functools.partial(consumer.resume, assignment))

    def _prepared(self, gid: str) -> _Flow[bool]:
        """Whether ``gid`` is still prepared; yes while PostgreSQL cannot be asked
        (the wait goes on through an outage)."""
        try:
            results: list[Result] = yield Execute(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s AND database = "
                "current_database()", (gid,), on_pool=True)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            log.warning("gid=%s: cannot ask PostgreSQL whether it is still in doubt (%s); "
                        "waiting on", gid, describe(exc), extra=self._extra(gid))
            return True
        return bool(results[0].rows)
