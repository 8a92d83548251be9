"""Producer slots: the coordinator's transactional producers and their sessions.

A :class:`ProducerPool` holds a fixed set of :class:`ProducerSlot` objects, each
with its own stable ``transactional.id``. A slot's producer is started
(``init_transactions()``) when a transaction takes the slot's :class:`Session`
before its PREPARE, and replaced after any failure. :func:`fence` is the same
start-up, used by recovery to fence a producer without keeping it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaException, Producer

from ._errmap import is_transient, kafka_error_of, kafka_startup_error
from ._logging import log_extra

__all__ = [
    "ProducerFactory",
    "ProducerPool",
    "ProducerSlot",
    "Session",
    "close_quietly",
    "fence",
]

log = logging.getLogger("coordinator.kafka")

ProducerFactory = Callable[[dict[str, Any]], Producer]
"""Makes a transactional producer from its configuration (``confluent_kafka.Producer``)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One producer session of a slot: what ``init_transactions()`` started.

    A transaction takes the slot's session *before* PREPARE and may commit in
    Kafka only with that very session (same ``generation``). A session started
    after PREPARE has an epoch newer than any fence recovery may have run in
    between, so it must never carry that transaction's commit.
    """

    generation: int
    floor: int
    """An offset of the slot's decision partition observed now: every decision
    record produced later lands at this offset or beyond."""


@dataclass(frozen=True, slots=True)
class _Live:
    producer: Producer
    generation: int


class ProducerSlot:
    """One transactional producer with a stable ``transactional.id``.

    The producer is created (and ``init_transactions()``-ed) by :meth:`session`,
    which a transaction calls before PREPARE; it is replaced after any failure
    (:meth:`discard`). ``lock`` serialises a Kafka transaction on the slot and
    the creation of its next producer, so a new session never starts while a
    transaction of the old one is in flight.
    """

    def __init__(
        self, index: int, transactional_id: str, decision_partition: int,
        conf: dict[str, Any], timeout: float, *,
        high_watermark: Callable[[int], int],
        factory: ProducerFactory = Producer,
        on_start: Callable[[int, int], None] | None = None,
    ) -> None:
        self.index = index
        self.transactional_id = transactional_id
        self.decision_partition = decision_partition
        self._conf = {**conf, "transactional.id": transactional_id}
        self._timeout = timeout
        self._high_watermark = high_watermark
        self._factory = factory
        self._on_start = on_start
        """Told ``(slot index, generation)`` when a session starts (observers)."""
        self.lock = threading.Lock()
        self._live: _Live | None = None
        self._generations = 0
        self._floor = 0

    def session(self, deadline: float | None = None) -> Session:
        """The current session, started now when the slot has no producer.

        ``init_transactions()`` fences any older producer with this
        transactional.id (aborting its open transaction, or waiting for a
        commit it already started). Raises ``KafkaException`` when Kafka cannot
        start a session.
        """
        live = self._live
        if live is None:
            with self.lock:  # waits for a transaction in flight on the old producer
                if self._live is None:
                    self._start(deadline)
                live = self._live
                assert live is not None
        return Session(live.generation, self._floor)

    def current_session(self) -> Session | None:
        """The current session if the slot has a producer, else ``None``: never
        waits (what :meth:`session` returns without blocking)."""
        live = self._live
        return None if live is None else Session(live.generation, self._floor)

    def _start(self, deadline: float | None) -> None:
        producer = self._factory(self._conf)
        end = deadline if deadline is not None else time.monotonic() + 3 * self._timeout
        try:
            _until_done(lambda: producer.init_transactions(self._timeout), end)
            # The floor of this session's transactions: any decision produced from now
            # on lands at this offset or later.
            self.advance_floor(_until_done(
                lambda: self._high_watermark(self.decision_partition), end))
        except BaseException:
            close_quietly(producer, self.transactional_id)
            raise
        self._generations += 1
        self._live = _Live(producer, self._generations)
        if self._on_start is not None:
            self._on_start(self.index, self._generations)

    def producer_of(self, generation: int) -> Producer | None:
        """The producer of session ``generation`` if it is still the slot's
        current one (call with ``lock`` held), else ``None``."""
        live = self._live
        return live.producer if live is not None and live.generation == generation else None

    @property
    def generation(self) -> int | None:
        """The current session's generation (``None``: no producer)."""
        live = self._live
        return None if live is None else live.generation

    def advance_floor(self, offset: int) -> None:
        """Record that the decision partition has reached ``offset``."""
        if offset > self._floor:
            self._floor = offset

    def discard(self) -> None:
        """Drop the producer after a failure; the next :meth:`session` makes a new one."""
        live, self._live = self._live, None
        if live is not None:
            close_quietly(live.producer, self.transactional_id)

    def close(self) -> None:
        """Close the producer when the coordinator closes. A Kafka transaction in
        flight on it (in another thread) is waited for up to the Kafka timeout;
        if it is still running then, the producer is only dropped: that thread
        holds its own reference, and the producer is destroyed when it is done,
        never under it."""
        if self.lock.acquire(timeout=self._timeout):
            try:
                self.discard()
            finally:
                self.lock.release()
        else:
            self._live = None

    @property
    def alive(self) -> bool:
        return self._live is not None


T = TypeVar("T")


def fence(transactional_id: str, conf: dict[str, Any], timeout: float,
          transaction_timeout_ms: int, factory: ProducerFactory = Producer) -> None:
    """Fence every older producer with ``transactional_id``.

    ``init_transactions()`` bumps the producer epoch: an open transaction of
    the old producer is aborted, a commit it already started is completed
    first; afterwards the old producer can neither produce nor commit.
    ``transaction_timeout_ms`` must be accepted by the brokers
    (``transaction.max.timeout.ms``): the coordinator's own value is.
    Retries transient errors for ``timeout`` seconds; raises ``KafkaException``.
    """
    producer = factory({"transaction.timeout.ms": transaction_timeout_ms, **conf,
                        "transactional.id": transactional_id})
    try:
        end = time.monotonic() + timeout
        _until_done(lambda: producer.init_transactions(max(1.0, end - time.monotonic())), end)
    finally:
        close_quietly(producer, transactional_id)


def _until_done(call: Callable[[], T], end: float) -> T:
    """``call()``, again on retriable Kafka errors (a leader moving, a broker
    restarting) until ``end`` (monotonic)."""
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is None or not is_transient(err) or time.monotonic() >= end:
                raise
            time.sleep(0.05)


def close_quietly(producer: Producer, transactional_id: str | None = None) -> None:
    """Purge, flush and close a producer; a failing step must neither mask the real
    error nor skip the steps after it (``close()`` above all)."""
    steps: tuple[Callable[[], object], ...] = (
        lambda: producer.purge(in_queue=True, in_flight=True, blocking=False),
        lambda: producer.flush(0),
        producer.close,
    )
    for step in steps:
        try:
            step()
        except Exception:
            log.debug("closing a discarded producer: a step failed", exc_info=True,
                      extra=log_extra(transactional_id=transactional_id))


class ProducerPool:
    """A bounded pool of producer slots; a slot serves one transaction at a time."""

    def __init__(self, slots: Sequence[ProducerSlot]) -> None:
        self.slots = list(slots)
        self._free: queue.SimpleQueue[ProducerSlot] = queue.SimpleQueue()
        for slot in self.slots:
            self._free.put(slot)
        self._closed = threading.Event()

    def start(self, deadline: float) -> None:
        """Create every producer and fence the previous incarnation's ones."""
        for slot in self.slots:
            try:
                slot.session(deadline)
            except KafkaException as exc:
                raise kafka_startup_error(
                    exc, f"init_transactions({slot.transactional_id})"
                ) from None

    def acquire(self, timeout: float) -> ProducerSlot:
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no transactional producer free within {timeout}s") from None

    def try_acquire(self) -> ProducerSlot | None:
        """A free slot if one is free now, else ``None``."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def release(self, slot: ProducerSlot) -> None:
        self._free.put(slot)

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
