"""The faults: random kills of client processes, Kafka broker kill -9 and restart,
PostgreSQL immediate stop and restart, network cuts and latency through Toxiproxy, random
SIGSTOPs of client processes (``pause``), latency above the recovery storm's grace period
on the clients' broker connections (``slow-kafka``).

Each fault kind runs in cycles (wait a random moment, inject, wait, heal) until the
phase's workers are done; every injection is recorded with :meth:`Lab.event`. Most
injections are *aimed*: they wait for a client to begin an attempt, so that they land
inside an operation. Services are stopped with a signal to the pid in their pid file
(``kill -9`` of the broker; SIGQUIT to the postmaster, which is what ``pg_ctl stop -m
immediate`` sends) -- at once, which ``scripts/stack``'s commands are not -- and started
again with ``scripts/stack`` (``tests/plugins/stack.py``), on the campaign's own stack
instance; network faults go through Toxiproxy's API (``tests/faults/toxiproxy.py``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tests.plugins import stack as stack_ops

from .toxiproxy import Toxiproxy, ToxiproxyError

__all__ = ["CUT_MODES", "CYCLES", "ENV_KINDS", "Injector", "Lab"]

ENV_KINDS = ("kill-random", "kafka-restart", "pg-restart", "net-cut", "net-latency")
CYCLES = (*ENV_KINDS, "pause", "slow-kafka")
"""Fault kinds with an injector loop (``mixed`` picks among them)."""
UNDO_SECONDS = 120.0
"""How long undoing a network fault retries, by default, before it resets Toxiproxy (see
:meth:`Injector.undo`)."""
CUT_MODES = ("down", "blackhole", "lost-replies", "close", "reset")
"""``down``: the proxy is disabled (connections closed, new ones refused); ``blackhole``:
no byte passes either way until healed (then the held data flows: a partition that heals);
``lost-replies``: requests pass but replies are dropped, and the connections are closed at
the end (a COMMIT PREPARED or a Kafka commit happens, the client never hears of it);
``close``: no byte passes either way and the connections are closed at the end; ``reset``:
every connection that sends anything is reset (TCP RST)."""


class Lab(Protocol):
    """What the injectors need from the campaign."""

    brokers: int
    toxiproxy: Toxiproxy
    storm_grace: float

    def event(self, fault: str, **detail: object) -> None: ...

    def alive_workers(self, ready_only: bool = True) -> list[tuple[str, int]]: ...

    def in_attempt(self, instance: str) -> bool: ...

    def kill_worker(self, instance: str, pid: int) -> bool: ...

    def pause_worker(self, instance: str, pid: int, seconds: float) -> bool: ...

    def kill_broker_now(self, broker: int) -> None: ...

    def stop_postgres_now(self) -> None: ...


_toxic_ids = itertools.count(1)


class Injector:
    """Injects one fault kind (or, for ``mixed``, any of them) in cycles."""

    def __init__(self, lab: Lab, rng: random.Random, stop: threading.Event,
                 calm: float = 1.0, undo_seconds: float = UNDO_SECONDS,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.lab = lab
        self.undo_seconds = undo_seconds
        self.sleep = sleep
        self.rng = rng
        self.stop = stop
        self.calm = calm
        """Factor on the random wait before each fault (the pipeline's stages need a few
        seconds to rejoin their group after each one)."""
        self.kafka_lock = threading.Lock()
        self.pg_lock = threading.Lock()
        self.net_lock = threading.Lock()

    # -- loops ---------------------------------------------------------------------

    def loop(self, kind: str) -> None:
        """Cycles of ``kind`` until stopped; ``mixed`` picks a kind at random each time."""
        cycles: dict[str, Callable[[], None]] = {
            "kill-random": self.kill_random,
            "kafka-restart": self.kafka_restart,
            "pg-restart": self.pg_restart,
            "net-cut": self.net_cut,
            "net-latency": self.net_latency,
            "pause": self.pause_random,
            "slow-kafka": self.slow_kafka,
        }
        while not self.stop.is_set():
            if kind == "mixed":
                pick = self.rng.choices(list(cycles), weights=[4, 1, 1, 3, 2, 3, 1])[0]
            else:
                pick = kind
            try:
                cycles[pick]()
            except Exception as exc:  # the harness's own failure: say so, heal, go on
                self.lab.event("injector-error", kind=pick, error=repr(exc)[:300],
                               counts=False)
                # If even this fails, the phase's end heals the stack or fails the run.
                with contextlib.suppress(ToxiproxyError):
                    self.reset_network()

    def _pause(self, low: float, high: float) -> bool:
        """Wait a random moment; False when the phase is over meanwhile."""
        return not self.stop.wait(self.calm * self.rng.uniform(low, high))

    def _aim(self) -> bool:
        """Three times in four, wait (up to 5 s) for a client to begin an attempt and
        then 0-25 ms more, so that the fault lands inside an operation -- in PREPARE,
        the Kafka transaction or COMMIT PREPARED -- rather than between two of them.
        Returns whether it did."""
        if self.rng.random() >= 0.75:
            return False
        delay = self.rng.uniform(0.0, 0.025)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not self.stop.is_set():
            if any(self.lab.in_attempt(inst) for inst, _ in self.lab.alive_workers()):
                time.sleep(delay)
                return True
            time.sleep(0.002)
        return False

    # -- the faults -----------------------------------------------------------------

    def kill_random(self) -> None:
        """SIGKILL a client process at a random moment. Mostly one that is running
        operations, and then mostly 0-50 ms after it began an attempt (so that the kills
        spread over the protocol); sometimes one still starting (opening its coordinator,
        recovering its own transactions)."""
        if not self._pause(0.3, 2.0):
            return
        alive = self.lab.alive_workers(ready_only=self.rng.random() > 0.1)
        if not alive:
            return
        instance, pid = self.rng.choice(alive)
        in_op = False
        if self.rng.random() < 0.75:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not self.stop.is_set():
                if self.lab.in_attempt(instance):
                    in_op = True
                    break
                time.sleep(0.002)
            time.sleep(self.rng.uniform(0.0, 0.05))
        if self.lab.kill_worker(instance, pid):
            self.lab.event("kill-random", worker=instance, pid=pid, after_attempt_began=in_op)

    def pause_random(self) -> None:
        """SIGSTOP a client process at a random moment -- mostly 0-50 ms after it began an
        attempt, so that it freezes inside the protocol (with group commit: while other
        threads of it wait in the group-commit queue) -- for 0.4 s to the recovery storm's
        grace period + 3 s, then SIGCONT."""
        if not self._pause(0.3, 2.0):
            return
        alive = self.lab.alive_workers()
        if not alive:
            return
        instance, pid = self.rng.choice(alive)
        in_op = False
        if self.rng.random() < 0.85:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not self.stop.is_set():
                if self.lab.in_attempt(instance):
                    in_op = True
                    break
                time.sleep(0.002)
            time.sleep(self.rng.uniform(0.0, 0.05))
        seconds = self.rng.uniform(0.4, self.lab.storm_grace + 3.0)
        self.lab.event("pause-random", worker=instance, pid=pid, seconds=round(seconds, 3),
                       after_attempt_began=in_op)
        self.lab.pause_worker(instance, pid, seconds)

    def slow_kafka(self) -> None:
        """Latency on every broker proxy (the clients' connections to Kafka; recovery
        connects directly) above the recovery storm's grace period: 1-4 s more than it per
        round trip, for 3-8 s, so that the storm fences and decides while commits crawl."""
        if not self._pause(0.5, 2.0) or not self.net_lock.acquire(blocking=False):
            return
        tp = self.lab.toxiproxy
        added: list[tuple[str, str]] = []
        try:
            proxies = [n for n in tp.names() if n.startswith("kafka-")]
            latency = int((self.lab.storm_grace + self.rng.uniform(1.0, 4.0)) * 1000)
            seconds = self.rng.uniform(3.0, 8.0)
            aimed = self._aim()
            for proxy in proxies:
                for stream in ("upstream", "downstream"):
                    name = f"slow{next(_toxic_ids)}"
                    tp.add_toxic(proxy, name, "latency", {"latency": latency // 2,
                                                          "jitter": latency // 10}, stream)
                    added.append((proxy, name))
            self.lab.event("slow-kafka", proxies=proxies, latency_ms=latency,
                           seconds=round(seconds, 2), aimed=aimed)
            time.sleep(seconds)
        finally:
            try:
                self.undo(added)
            finally:
                self.net_lock.release()

    def undo(self, added: Sequence[tuple[str, str]], disabled: Sequence[str] = ()) -> None:
        """Remove the toxics and re-enable the proxies a network fault put in place,
        whatever it takes. Removing a toxic blocks in Toxiproxy while a client of that
        proxy does not read (a SIGSTOPped process: a latency toxic flushes the data it holds
        before it goes, and every API call waits behind that), so a call that times out is
        tried again for up to ``undo_seconds``; what is still in place then is cleared
        by a reset. A fault left in place would slow or cut every client for the rest of
        the phase."""
        tp = self.lab.toxiproxy
        deadline = time.monotonic() + self.undo_seconds
        steps = [functools.partial(tp.remove_toxic, proxy, name) for proxy, name in added]
        steps += [functools.partial(tp.set_enabled, proxy, True) for proxy in disabled]
        retried = 0
        for step in steps:
            while True:
                try:
                    step()
                    break
                except ToxiproxyError as exc:
                    retried += 1
                    if time.monotonic() > deadline:
                        self.lab.event("undo-failed", error=str(exc)[:300], counts=False)
                        self.reset_network()
                        return
                    self.sleep(1.0)
        if retried:
            self.lab.event("undo-retried", calls=retried, counts=False)

    def reset_network(self) -> None:
        """Toxiproxy back to no toxic and every proxy enabled (retried the same way)."""
        deadline = time.monotonic() + self.undo_seconds
        while True:
            try:
                self.lab.toxiproxy.reset()
                return
            except ToxiproxyError:
                if time.monotonic() > deadline:
                    raise
                self.sleep(1.0)

    def kafka_restart(self) -> None:
        if not self._pause(1.0, 4.0) or not self.kafka_lock.acquire(blocking=False):
            return
        try:
            broker = self.rng.randint(1, self.lab.brokers)
            aimed = self._aim()
            self.lab.kill_broker_now(broker)
            self.lab.event("kafka-restart", broker=broker, action="kill -9", aimed=aimed)
            self.stop.wait(self.rng.uniform(1.0, 5.0))
            _retry(lambda: stack_ops.start_kafka(broker))
            self.lab.event("kafka-restart", broker=broker, action="started", counts=False)
        finally:
            self.kafka_lock.release()

    def pg_restart(self) -> None:
        if not self._pause(1.0, 4.0) or not self.pg_lock.acquire(blocking=False):
            return
        try:
            aimed = self._aim()
            self.lab.stop_postgres_now()
            self.lab.event("pg-restart", action="stop -m immediate", aimed=aimed)
            self.stop.wait(self.rng.uniform(0.5, 3.0))
            _retry(stack_ops.pg_start)
            self.lab.event("pg-restart", action="started", counts=False)
        finally:
            self.pg_lock.release()

    def _targets(self) -> list[str]:
        names = self.lab.toxiproxy.names()
        kafka = [n for n in names if n.startswith("kafka-")]
        choice = self.rng.choice(("kafka", "postgres", "both"))
        return {"kafka": kafka, "postgres": ["postgres"], "both": [*kafka, "postgres"]}[choice]

    def net_cut(self) -> None:
        if not self._pause(0.5, 3.0) or not self.net_lock.acquire(blocking=False):
            return
        tp = self.lab.toxiproxy
        added: list[tuple[str, str]] = []
        disabled: list[str] = []
        try:
            targets = self._targets()
            mode = self.rng.choice(CUT_MODES)
            seconds = self.rng.uniform(1.0, 6.0)
            aimed = self._aim()
            for proxy in targets:
                if mode == "down":
                    tp.set_enabled(proxy, False)
                    disabled.append(proxy)
                    continue
                streams = (("downstream",) if mode == "lost-replies"
                           else ("upstream", "downstream"))
                for stream in streams:
                    name = f"cut{next(_toxic_ids)}"
                    if mode == "reset":
                        tp.add_toxic(proxy, name, "reset_peer", {"timeout": 0}, stream)
                    else:
                        timeout_ms = 0 if mode == "blackhole" else int(seconds * 1000)
                        tp.add_toxic(proxy, name, "timeout", {"timeout": timeout_ms}, stream)
                    added.append((proxy, name))
            self.lab.event("net-cut", mode=mode, proxies=targets, seconds=round(seconds, 2),
                           aimed=aimed)
            time.sleep(seconds)
        finally:
            try:
                self.undo(added, disabled)
            finally:
                self.net_lock.release()

    def net_latency(self) -> None:
        if not self._pause(0.5, 2.0) or not self.net_lock.acquire(blocking=False):
            return
        tp = self.lab.toxiproxy
        added: list[tuple[str, str]] = []
        try:
            targets = self._targets()
            latency = self.rng.randint(50, 1000)
            jitter = self.rng.randint(0, min(200, latency))
            seconds = self.rng.uniform(2.0, 10.0)
            for proxy in targets:
                for stream in ("upstream", "downstream"):
                    name = f"lat{next(_toxic_ids)}"
                    tp.add_toxic(proxy, name, "latency",
                                 {"latency": latency // 2, "jitter": jitter // 2}, stream)
                    added.append((proxy, name))
            self.lab.event("net-latency", proxies=targets, latency_ms=latency,
                           jitter_ms=jitter, seconds=round(seconds, 2))
            time.sleep(seconds)
        finally:
            try:
                self.undo(added)
            finally:
                self.net_lock.release()


def _retry(action: Callable[[], None], attempts: int = 5) -> None:
    """Restarting a service right after a kill can fail once (a port still held...)."""
    for i in range(attempts):
        try:
            action()
            return
        except AssertionError:
            if i + 1 == attempts:
                raise
            time.sleep(2.0)
