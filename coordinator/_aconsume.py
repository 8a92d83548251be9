"""The consume loop on an event loop: the asyncio driver of ``_consumecore.py``.

The decisions are the synchronous loop's (``_consume.py``), made once in
:class:`~coordinator._consumecore.ConsumeLoop`; this driver awaits the
effects. The consumer's calls block (a poll waits up to its timeout), so they
run in the coordinator's worker threads -- the pool apart from the Kafka
transactions' own threads, so that a long poll never holds up a commit; a
cancelled run first waits for the consumer call in progress. The handler is a
coroutine run inside an :class:`AsyncTransaction`. A pause between retries ends
early when ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, Message

from ._atransaction import AsyncTransaction, to_the_end
from ._consumecore import (
    ConsumeEffect,
    ConsumeLoop,
    DeadLetter,
    Transact,
    handler_failures,
)
from ._effects import Blocking, Execute, Sleep, drive, execute_async

if TYPE_CHECKING:
    from ._acoordinator import AsyncCoordinator
    from ._consumecore import ConsumerStats, ConsumeSettings

__all__ = ["AsyncHandler", "arun_consumer"]

AsyncHandler = Callable[[AsyncTransaction, Sequence[Message]], Awaitable[None]]
"""``async def handle(tx, messages)``: the work of one batch inside one coordinated
transaction; as for the synchronous ``Handler``, it may only write through ``tx``."""


async def arun_consumer(coord: AsyncCoordinator, consumer: Consumer, handle: AsyncHandler,
                        settings: ConsumeSettings, stop: asyncio.Event | None) -> ConsumerStats:
    """``run_consumer`` (``_consume.py``) as a coroutine."""
    stopping = stop or asyncio.Event()
    loop = ConsumeLoop(consumer, settings, stopping.is_set, coord.config.kafka_timeout,
                       coord.name, coord.instance)

    held: list[asyncio.CancelledError] = []
    """A cancellation held back while a consumer call finished."""

    async def perform(effect: ConsumeEffect) -> Any:
        if held:
            raise held.pop()  # the loop rewinds what it read, then ends
        match effect:
            case Blocking(call):
                # Waited for even when the task is cancelled (a consumer call is
                # short: a poll's timeout): once run_consumer has ended, nothing of
                # it uses the consumer, which may be closed at once. What the call
                # returned goes to the loop, so that what it read is rewound.
                running = asyncio.ensure_future(coord._in_thread(call, waits_for_others=True))
                try:
                    return await to_the_end(running)
                except asyncio.CancelledError as stop:
                    if running.cancelled() or running.exception() is not None:
                        raise
                    held.append(stop)
                    return running.result()
            case Sleep(seconds, pause) if pause is time.sleep:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), seconds)
            case Sleep(seconds, pause):
                pause(seconds)  # a test's own sleep
            case Execute():
                async with coord.connection() as conn:
                    return await execute_async(conn, effect)
            case Transact(messages, DeadLetter() as letter):
                async with coord.transaction(consumer=consumer, consumed=messages) as atx:
                    letter.produce(atx)
            case Transact(messages):
                async with coord.transaction(consumer=consumer, consumed=messages) as atx:
                    with handler_failures():
                        await handle(atx, messages)
        return None

    stats = await drive(loop.run(), perform)
    if held:
        raise held.pop()
    return stats
