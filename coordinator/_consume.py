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

Those decisions live in ``_consumecore.py``; this module is the synchronous
driver that performs the effects the loop asks for, on the spot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, Message

from ._consumecore import (
    ConsumeEffect,
    ConsumeLoop,
    ConsumerStats,
    ConsumeSettings,
    DeadLetter,
    Transact,
    handler_failures,
)
from ._effects import Blocking, Execute, Sleep, drive, execute_sync, run_now
from ._transaction import Transaction

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["ConsumerStats", "Handler", "run_consumer"]

Handler = Callable[[Transaction, Sequence[Message]], None]
"""``handle(tx, messages)``: the work of one batch inside one coordinated transaction.
It may only write through ``tx`` (SQL and ``tx.produce``): nothing else is undone
when the transaction rolls back and the batch is delivered again."""


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
    settings = ConsumeSettings(batch_size, batch_timeout, max_attempts, dead_letter_topic,
                               sleep, decision_poll)
    loop = ConsumeLoop(consumer, settings, (stop or threading.Event()).is_set,
                       coord.config.kafka_timeout, coord.name, coord.instance)

    async def perform(effect: ConsumeEffect) -> Any:  # never suspends: see run_now
        match effect:
            case Blocking(call):
                return call()
            case Sleep(seconds, pause):
                pause(seconds)
            case Execute():
                with coord.connection() as conn:
                    return execute_sync(conn, effect)
            case Transact(messages, None):
                with coord.transaction(consumer=consumer, consumed=messages) as tx, \
                        handler_failures():
                    handle(tx, messages)
            case Transact(messages, DeadLetter() as letter):
                with coord.transaction(consumer=consumer, consumed=messages) as tx:
                    letter.produce(tx)
        return None

    return run_now(drive(loop.run(), perform))
