"""The consume loop: Kafka in, PostgreSQL and Kafka out, exactly once.

:func:`run_consumer` consumes batches and runs ``handle(tx, messages)`` for each
in one coordinated transaction whose Kafka transaction also commits the batch's
offsets. A batch whose handler fails is split until the failing message is
alone; that message is retried up to ``max_attempts`` times and then written to
the dead-letter topic in a transaction that also commits its offset (or, with no
dead-letter topic, the loop stops with :class:`PoisonMessage`). Failures of the
coordinator itself (PostgreSQL or Kafka unavailable, a rebalance fencing the
batch) are not the handler's: after a pause the consumer goes back to its
committed offsets and consumes again (which also serves its group's events).
After an unknown outcome the loop waits until recovery has decided, then goes
on from the committed offsets, which say which way it went.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaException, Message

from ._consumed import rewind
from ._enums import Phase
from ._errmap import describe, is_connection_error
from ._transaction import Transaction
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
from .prepared import list_prepared

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["ConsumerStats", "Handler", "run_consumer"]

log = logging.getLogger("coordinator.consume")

Handler = Callable[[Transaction, Sequence[Message]], None]
"""``handle(tx, messages)``: the work of one batch inside one coordinated transaction.
It may only write through ``tx`` (SQL and ``tx.produce``): nothing else is undone
when the transaction rolls back and the batch is delivered again."""


@dataclass
class ConsumerStats:
    """What a :func:`run_consumer` run did."""

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


class _HandlerFailed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Loop:
    coord: Coordinator
    consumer: Consumer
    handle: Handler
    max_attempts: int
    dead_letter_topic: str | None
    stop: threading.Event
    sleep: Callable[[float], None]
    decision_poll: float
    stats: ConsumerStats = field(default_factory=ConsumerStats)
    attempts: dict[tuple[str, int, int], int] = field(default_factory=dict)
    failures_in_a_row: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    """Per partition, the offset this loop's own commits have reached."""

    def batch(self, messages: list[Message]) -> None:
        """Commit or dead-letter every message of a consumed batch, in order."""
        pending: list[list[Message]] = [messages]
        rewound = False
        while pending and not self.stop.is_set():
            whole = pending.pop(0)
            part = self._owned(whole)
            if len(part) < len(whole):
                rewound = True  # make sure nothing dropped here is skipped if it stays ours
            if not part:
                continue
            try:
                self._commit(part)
                self.failures_in_a_row = 0
                continue
            except _HandlerFailed as exc:
                rewound = True
                self.stats.handler_failures += 1
                pending[:0] = self._after_handler_failure(part, exc.cause)
            except OutcomeUnknown as exc:
                self._wait_decided(exc.gid)
                break  # the committed offsets say which way it went
            except (Diverged, PoisonMessage, UsageError, ConfigurationError):
                raise  # nothing to retry: a human (or the program) must act
            except Error as exc:
                # The coordinator's failure, not the handler's (a service down, a
                # rebalance fencing the batch): go back to the committed offsets and
                # consume again, which also serves the consumer's group events.
                self.failures_in_a_row += 1
                self.stats.retries += 1
                log.warning("batch of %d rolled back (%s); consuming it again", len(part), exc)
                self.sleep(min(5.0, 0.1 * 2 ** self.failures_in_a_row))
                break
        else:
            if not rewound and not self.stop.is_set():
                return
        # Failed transactions rewound the consumer; move it to the committed offsets
        # (past everything committed or dead-lettered, at anything that was not).
        self._rewind(messages)

    def _commit(self, part: list[Message]) -> None:
        try:
            with self.coord.transaction(consumer=self.consumer, consumed=part) as tx:
                try:
                    self.handle(tx, part)
                except Exception as exc:
                    if is_connection_error(exc):  # PostgreSQL went away: not the handler
                        raise ServiceUnavailable(f"PostgreSQL: {describe(exc)}",
                                                 phase=Phase.EXECUTE) from exc
                    raise _HandlerFailed(exc) from exc
        except CommittedPendingRecovery:
            pass  # committed: only COMMIT PREPARED is left to recovery
        self._committed(part)
        self.stats.batches += 1
        self.stats.messages += len(part)

    def _committed(self, part: Sequence[Message]) -> None:
        for m in part:
            key = (str(m.topic()), int(m.partition() or 0))
            self.committed[key] = max(self.committed.get(key, 0), int(m.offset() or 0) + 1)

    def _after_handler_failure(self, part: list[Message],
                               cause: BaseException) -> list[list[Message]]:
        """What to try next after the handler failed on ``part``."""
        if len(part) > 1:
            half = len(part) // 2
            log.info("handler failed on a batch of %d (%s): splitting it", len(part),
                     describe(cause))
            return [part[:half], part[half:]]
        msg = part[0]
        key = (str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0))
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] < self.max_attempts:
            return [part]
        if self.dead_letter_topic is None:
            self._rewind([msg])
            raise PoisonMessage(
                f"the handler failed {self.attempts[key]} times on {key[0]}[{key[1]}] offset "
                f"{key[2]} ({describe(cause)}) and there is no dead-letter topic; the "
                "consumer stays at that message", topic=key[0], partition=key[1],
                offset=key[2]) from cause
        self._dead_letter(msg, cause)
        return []

    def _dead_letter(self, msg: Message, cause: BaseException) -> None:
        assert self.dead_letter_topic is not None
        headers: list[tuple[str, bytes]] = []
        for item in msg.headers() or []:
            k, v = item[0], item[1]
            headers.append((str(k), v if isinstance(v, bytes) else str(v or "").encode()))
        headers += [("pk2pc.dlq.topic", str(msg.topic()).encode()),
                    ("pk2pc.dlq.partition", str(msg.partition()).encode()),
                    ("pk2pc.dlq.offset", str(msg.offset()).encode()),
                    ("pk2pc.dlq.error", describe(cause).encode())]
        with self.coord.transaction(consumer=self.consumer, consumed=[msg]) as tx:
            tx.produce(self.dead_letter_topic, value=msg.value(), key=msg.key(),
                       headers=headers)
        self._committed([msg])
        self.stats.batches += 1
        self.stats.messages += 1
        self.stats.dead_lettered += 1
        log.warning("%s[%s] offset %s written to the dead-letter topic %s after %d attempts "
                    "(%s)", msg.topic(), msg.partition(), msg.offset(), self.dead_letter_topic,
                    self.max_attempts, describe(cause))

    def _owned(self, part: list[Message]) -> list[Message]:
        """The messages of partitions still assigned to the consumer: a rebalance
        moved the others, whose new owner starts from the committed offsets."""
        try:
            assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        except KafkaException:
            return part
        return [m for m in part if (m.topic(), m.partition()) in assigned]

    def _rewind(self, messages: Sequence[Message]) -> None:
        # Where to go if the group's committed offsets cannot be read: the batch's
        # first offsets, but never back over what this loop committed itself.
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (str(m.topic()), int(m.partition() or 0))
            first[key] = min(first.get(key, int(m.offset() or 0)), int(m.offset() or 0))
        for key in first:
            first[key] = max(first[key], self.committed.get(key, 0))
        rewind(self.consumer, first, self.coord.config.kafka_timeout)

    def _wait_decided(self, gid: str | None) -> None:
        """Hold the consumer (its partitions paused, still polled so it stays in the
        group) until ``gid`` is no longer prepared: recovery has decided it."""
        if gid is None:
            return
        self.stats.in_doubt.append(gid)
        assignment = self.consumer.assignment()
        self.consumer.pause(assignment)
        started = time.monotonic()
        try:
            while not self.stop.is_set() and self._prepared(gid):
                self.consumer.poll(self.decision_poll)
                if time.monotonic() - started > 60:
                    log.warning("gid=%s still in doubt after %.0f s: is the recovery job "
                                "scheduled?", gid, time.monotonic() - started)
                    started = time.monotonic()
        finally:
            self.consumer.resume(assignment)

    def _prepared(self, gid: str) -> bool:
        with self.coord.connection() as conn:
            return any(t.text == gid for t in
                       list_prepared(conn, self.coord.name, self.coord.instance))


def run_consumer(
    coord: Coordinator,
    consumer: Consumer,
    handle: Handler,
    *,
    batch_size: int = 500,
    batch_timeout: float = 0.1,
    max_attempts: int = 5,
    dead_letter_topic: str | None = None,
    stop: threading.Event | None = None,
    sleep: Callable[[float], None] = time.sleep,
    decision_poll: float = 1.0,
) -> ConsumerStats:
    """Consume and handle batches until ``stop`` is set; see the module docstring."""
    if batch_size < 1 or max_attempts < 1 or batch_timeout < 0:
        raise ValueError("batch_size and max_attempts must be >= 1, batch_timeout >= 0")
    loop = _Loop(coord, consumer, handle, max_attempts, dead_letter_topic,
                 stop or threading.Event(), sleep, decision_poll)
    while not loop.stop.is_set():
        batch = []
        for m in consumer.consume(num_messages=batch_size, timeout=batch_timeout):
            err = m.error()
            if err is None:
                batch.append(m)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.debug("consumer event: %s", err.str())
        if batch:
            loop.batch(batch)
    return loop.stats
