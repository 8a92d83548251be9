"""Where an operation of (h) goes, next to the synchronous coordinator's (d): one
path, one task (or thread) count, a few seconds, through the library's public seams
only (``CoordinatorConfig(observers=...)`` for the phases, ``producer_factory`` for
the Kafka transaction as its worker thread sees it).

Usage (the services from ``PG_DSN`` / ``KAFKA_BOOTSTRAP_SERVERS``)::

    .venv/bin/python -m tests.bench.aio_profile --tasks 256          # AsyncCoordinator
    .venv/bin/python -m tests.bench.aio_profile --sync --tasks 32    # Coordinator, threads
    .venv/bin/python -m tests.bench.aio_profile --tasks 256 --cprofile   # + the loop's hot spots

Prints operations/s, CPU per operation (the process, and for asyncio the event-loop
thread alone), the mean and median of each phase (``begin`` includes the wait for a
pooled connection; ``kafka_commit`` is the wait for the group's Kafka transaction;
``kafka_txn`` that transaction in its worker thread, from ``begin_transaction`` to the
end of ``commit_transaction``) and the mean group size.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer

from coordinator import (
    AsyncCoordinator,
    Coordinator,
    CoordinatorConfig,
    GroupCommit,
    Phase,
    Status,
)
from coordinator.observe import TransactionInfo, TransactionObserver

from .aio_paths import make_async_pool
from .env import (
    COORD_NAME,
    PAYLOAD,
    Services,
    Tables,
    create_topics,
    delete_topics,
    make_pool,
    rollback_own_prepared,
)

__all__ = ["main"]


class _Laps:
    """Seconds by name, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name].append(value)


class _TxObserver:
    def __init__(self, laps: _Laps) -> None:
        self.laps = laps

    def headers(self) -> Sequence[tuple[str, bytes]]:
        return ()

    def phase(self, phase: Phase, seconds: float) -> None:
        self.laps.add(phase.value, seconds)

    def prepared(self, gid: str) -> None:
        pass

    def group(self, members: int) -> None:
        self.laps.add("group size", members)

    def end(self, status: Status, phase: Phase | None, error: BaseException | None,
            seconds: float) -> None:
        self.laps.add("whole transaction", seconds)


class _Observer:
    def __init__(self, laps: _Laps) -> None:
        self.laps = laps

    def transaction(self, info: TransactionInfo) -> TransactionObserver:
        return _TxObserver(self.laps)

    def producer_started(self, name: str, instance: str, slot: int, generation: int) -> None:
        pass

    def idempotency_hit(self, name: str, instance: str) -> None:
        pass


def _timing_factory(laps: _Laps) -> Any:
    class TimedProducer(Producer):
        _t0 = 0.0

        def begin_transaction(self) -> None:
            self._t0 = time.perf_counter()
            super().begin_transaction()

        def commit_transaction(self, timeout: float = -1) -> None:
            super().commit_transaction(timeout)
            laps.add("kafka_txn", time.perf_counter() - self._t0)

    return TimedProducer


def _report(label: str, ops: int, seconds: float, cpu: float, loop_cpu: float | None,
            laps: _Laps) -> None:
    print(f"{label}: {ops / seconds:.0f} ops/s, process CPU {cpu / max(ops, 1) * 1e3:.2f} "
          "ms/op" + ("" if loop_cpu is None else
                     f", event-loop thread CPU {loop_cpu / max(ops, 1) * 1e3:.2f} ms/op"))
    for name, vs in sorted(laps.values.items()):
        vs.sort()
        scale, unit = (1.0, "") if name == "group size" else (1e3, " ms")
        print(f"  {name:18} n={len(vs):6}  mean {statistics.mean(vs) * scale:8.2f}{unit}  "
              f"p50 {vs[len(vs) // 2] * scale:8.2f}{unit}")


def _run_sync(env: Services, args: argparse.Namespace, cfg: CoordinatorConfig,
              tables: Tables, topic: str, instance: str, laps: _Laps) -> None:
    pool = make_pool(env.dsn, min(args.tasks, args.pool) + 4, "bench-profile")
    coord = Coordinator(pool, {"bootstrap.servers": env.brokers}, COORD_NAME,
                        instance=instance, config=cfg).open()
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def worker() -> None:
        while time.monotonic() < stop:
            with coord.transaction() as tx:
                tx.execute(tables.insert_row, (uuid.uuid4().hex, 1))
                tx.produce(topic, value=PAYLOAD, key=b"k")
            with lock:
                done[0] += 1

    try:
        c0, t0 = os.times(), time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(args.tasks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c1 = os.times()
        _report(f"Coordinator, {args.tasks} threads", done[0], time.monotonic() - t0,
                c1.user + c1.system - c0.user - c0.system, None, laps)
    finally:
        coord.close()
        pool.close()


async def _run_async(env: Services, args: argparse.Namespace, cfg: CoordinatorConfig,
                     tables: Tables, topic: str, instance: str, laps: _Laps) -> None:
    pool = await make_async_pool(env.dsn, min(args.tasks, args.pool) + 4, "bench-profile")
    coord = AsyncCoordinator(pool, {"bootstrap.servers": env.brokers}, COORD_NAME,
                             instance=instance, config=cfg)
    await coord.open()
    done = [0]
    stop = time.monotonic() + args.seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            async with coord.transaction() as tx:
                await tx.execute(tables.insert_row, (uuid.uuid4().hex, 1))
                tx.produce(topic, value=PAYLOAD, key=b"k")
            done[0] += 1

    prof = cProfile.Profile() if args.cprofile else None
    try:
        c0, t0, tt0 = os.times(), time.monotonic(), time.thread_time()
        if prof is not None:
            prof.enable()
        await asyncio.gather(*(worker() for _ in range(args.tasks)))
        if prof is not None:
            prof.disable()
        c1, loop_cpu = os.times(), time.thread_time() - tt0
        _report(f"AsyncCoordinator, {args.tasks} tasks", done[0], time.monotonic() - t0,
                c1.user + c1.system - c0.user - c0.system, loop_cpu, laps)
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
            print("the event-loop thread (cProfile, by own time; inflated by the profiler):")
            print(out.getvalue())
    finally:
        await coord.close()
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.aio_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sync", action="store_true", help="the synchronous Coordinator")
    ap.add_argument("--tasks", type=int, default=256, help="tasks (threads with --sync)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pool", type=int, default=64, help="connection pool size cap")
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=GroupCommit().max_wait)
    ap.add_argument("--cprofile", action="store_true",
                    help="cProfile the event-loop thread (asyncio only)")
    args = ap.parse_args(argv)
    env = Services.from_env()
    laps = _Laps()
    cfg = CoordinatorConfig(producers=args.producers,
                            group_commit=GroupCommit(max_wait=args.max_wait),
                            observers=(_Observer(laps),),
                            producer_factory=_timing_factory(laps))
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(env.dsn, suffix)
    topic = f"pk2pc-bench.profile.{suffix}"
    instance = f"bench{os.getpid()}-p"
    tables.create()
    create_topics(env.brokers, [topic], 6)
    try:
        if args.sync:
            _run_sync(env, args, cfg, tables, topic, instance, laps)
        else:
            asyncio.run(_run_async(env, args, cfg, tables, topic, instance, laps))
    finally:
        rollback_own_prepared(env.dsn, [instance])
        tables.drop()
        delete_topics(env.brokers, [topic])
    return 0


if __name__ == "__main__":
    sys.exit(main())
