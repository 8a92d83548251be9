"""The ``--aio-producer`` mode: a Kafka transaction's produce + commit from asyncio, two
ways, side by side in one process on one event loop.

``threads``  the blocking ``confluent_kafka.Producer`` in a ``ThreadPoolExecutor``, one
             worker-thread call per transaction (``begin_transaction``, M x ``produce``,
             ``flush``, ``commit_transaction``): what ``AsyncCoordinator`` does
             (``_kafka.run_transaction`` in one of its worker threads).
``aio``      ``confluent_kafka.aio.AIOProducer`` (confluent-kafka >= 2.12): ``await
             begin_transaction()``, M x ``await produce()`` (each returns a delivery
             future), ``await commit_transaction()``, then the M delivery futures.

Each way runs ``--producers`` lanes (an asyncio task with its own transactional
producer, as the coordinator's producer pool), each committing transactions of M 1 KB
messages (``--aio-messages``) back to back to its own topic; the same counts for both.
Runs are interleaved as in the other modes (at most 3 runs of at most 3 s after at most
0.5 s of warm-up per figure, to stay short); after all runs a ``read_committed``
consumer counts each topic's messages against the transactions committed.

Then a check of AIOProducer's transactional API against the real broker: commit,
abort, ``send_offsets_to_transaction``, a fenced producer's error, headers, and what
happens to delivery futures awaited while the producer flushes (their callbacks run in
a worker thread).

Writes ``bench-aio-producer.md/.json``; the last line printed is
``aio_producer_vs_threads=R`` (transactions/s of ``aio`` over ``threads`` at the
largest M).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.aio import AIOProducer

from .cpu import CpuMeter, ProcessCpu, cpu_delta
from .env import PAYLOAD, Services, create_topics, delete_topics, say
from .loop import RunResult, percentile
from .report import aggregate, machine_notes, write_mode_report

__all__ = ["VARIANTS", "api_check", "main"]

VARIANTS = ("threads", "aio")
LABELS = {
    "threads": "Producer in a ThreadPoolExecutor (as AsyncCoordinator)",
    "aio": "confluent_kafka.aio.AIOProducer",
}
TIMEOUT = 10.0
_PROCS = ("bench process", "kafka broker")


def _txn_conf(brokers: str, txn_id: str) -> dict[str, Any]:
    """As the coordinator's producers (``_producers.py``), less its overrides."""
    return {"bootstrap.servers": brokers, "transactional.id": txn_id,
            "enable.idempotence": True, "acks": "all", "linger.ms": 1,
            "transaction.timeout.ms": 10_000}


class _Lane:
    """One transactional producer committing transactions of ``m`` messages."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.committed_messages = 0
        self.n = 0

    def keys(self, m: int) -> list[bytes]:
        self.n += 1
        return [f"{self.n}-{i}".encode() for i in range(m)]

    async def transaction(self, m: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _ThreadsLane(_Lane):
    def __init__(self, topic: str, producer: Producer, executor: ThreadPoolExecutor) -> None:
        super().__init__(topic)
        self.producer = producer
        self.executor = executor

    @classmethod
    async def open(cls, brokers: str, txn_id: str, topic: str) -> _ThreadsLane:
        executor = ThreadPoolExecutor(1, f"lane-{txn_id}")
        producer = Producer(_txn_conf(brokers, txn_id))
        await asyncio.get_running_loop().run_in_executor(
            executor, producer.init_transactions, TIMEOUT)
        return cls(topic, producer, executor)

    def _run(self, keys: list[bytes]) -> None:
        p = self.producer
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        p.begin_transaction()
        for key in keys:
            p.produce(self.topic, value=PAYLOAD, key=key, on_delivery=on_delivery)
        if p.flush(TIMEOUT) or errors:
            p.abort_transaction(TIMEOUT)
            raise RuntimeError(f"not delivered: {errors[:1]}")
        p.commit_transaction(TIMEOUT)

    async def transaction(self, m: int) -> None:
        keys = self.keys(m)
        await asyncio.get_running_loop().run_in_executor(self.executor, self._run, keys)
        self.committed_messages += m

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self.producer.flush,
                                                         TIMEOUT)
        self.executor.shutdown()


class _AioLane(_Lane):
    def __init__(self, topic: str, producer: AIOProducer) -> None:
        super().__init__(topic)
        self.producer = producer

    @classmethod
    async def open(cls, brokers: str, txn_id: str, topic: str) -> _AioLane:
        producer = AIOProducer(_txn_conf(brokers, txn_id))
        await producer.init_transactions(TIMEOUT)
        return cls(topic, producer)

    async def transaction(self, m: int) -> None:
        p = self.producer
        await p.begin_transaction()
        futures = [await p.produce(self.topic, value=PAYLOAD, key=k) for k in self.keys(m)]
        await p.commit_transaction(TIMEOUT)
        await asyncio.gather(*futures)  # every delivery report (raises on an error)
        self.committed_messages += m

    async def close(self) -> None:
        await self.producer.close()


async def _open_lanes(variant: str, brokers: str, topic: str, n: int,
                      suffix: str) -> list[_Lane]:
    lanes: list[_Lane] = []
    for i in range(n):
        txn_id = f"pk2pc-bench-aio-{variant}-{suffix}-{i}"
        if variant == "aio":
            lanes.append(await _AioLane.open(brokers, txn_id, topic))
        else:
            lanes.append(await _ThreadsLane.open(brokers, txn_id, topic))
    return lanes


async def _measure(variant: str, lanes: list[_Lane], m: int, run: int, warmup: float,
                   duration: float, procs: ProcessCpu) -> RunResult:
    """Every lane commits transactions of ``m`` messages back to back; transactions/s
    of those finished inside the window."""
    done: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    procs0 = procs.snapshot()
    meter = CpuMeter()
    start = time.monotonic()
    w0, w1 = start + warmup, start + warmup + duration

    async def lane_loop(lane: _Lane) -> None:
        while (t0 := time.monotonic()) < w1:
            try:
                await lane.transaction(m)
            except Exception as exc:
                errors.append(exc)
                await asyncio.sleep(0.05)
                continue
            done.append((t0, time.monotonic()))

    await asyncio.gather(*(lane_loop(lane) for lane in lanes))
    cpu = meter.read()
    elapsed = time.monotonic() - meter.t0
    by_proc = {k: v / elapsed for k, v in cpu_delta(procs0, procs.snapshot())}
    inside = sorted(e - s for s, e in done if w0 <= e <= w1)
    if errors:
        say(f"  ! {variant} m={m}: {len(errors)} errors, first: {errors[0]!r}")
    result = RunResult(
        path=variant, concurrency=m, run=run, throughput=len(inside) / duration,
        p50_ms=percentile(inside, 0.5) * 1e3, p99_ms=percentile(inside, 0.99) * 1e3,
        completed=len(inside), errors=len(errors), machine_cores_busy=cpu[0],
        bench_process_cores=cpu[1])
    result.cores_by_process = by_proc
    return result


def _count_committed(brokers: str, topic: str, partitions: int) -> int:
    """Messages a read_committed consumer reads from ``topic`` (to its end)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"pk2pc-bench-count-{topic}",
                  "isolation.level": "read_committed", "enable.auto.commit": False,
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        n, idle = 0, 0
        eof: set[int] = set()
        while len(eof) < partitions and idle < 50:
            msgs = c.consume(10_000, 0.2)
            idle = 0 if msgs else idle + 1
            for msg in msgs:
                err = msg.error()
                if err is None:
                    n += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add(msg.partition() or 0)
        return n
    finally:
        c.close()


# -- the API check -----------------------------------------------------------


@dataclass
class _Check:
    name: str
    result: str = ""
    ok: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _describe(exc: BaseException) -> dict[str, Any]:
    """The exception, and the KafkaError it carries or was raised from."""
    out: dict[str, Any] = {"type": type(exc).__name__, "str": str(exc)[:200]}
    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            break
        err = seen.args[0] if seen.args and isinstance(seen.args[0], KafkaError) else None
        if err is not None:
            out.update(code=err.name(), fatal=err.fatal(), retriable=err.retriable(),
                       txn_requires_abort=err.txn_requires_abort())
            if seen is not exc:
                out["raised_from"] = type(seen).__name__
            break
        seen = seen.__cause__ or seen.__context__
    return out


def _future_state(f: asyncio.Future[Any]) -> str:
    if not f.done():
        return "pending"
    if f.cancelled():
        return "cancelled"
    exc = f.exception()
    return "delivered" if exc is None else str(_describe(exc).get("code", repr(exc)))


async def _guard(check: _Check, body: Callable[[], Awaitable[None]]) -> _Check:
    try:
        await asyncio.wait_for(body(), 60)
    except Exception as exc:
        check.ok = False
        check.result = f"unexpected {_describe(exc)}"
    return check


async def api_check(brokers: str, topic: str, partitions: int, suffix: str) -> list[_Check]:
    """AIOProducer's transactional API against the real broker."""
    checks: list[_Check] = []

    def count() -> Awaitable[int]:
        return asyncio.to_thread(_count_committed, brokers, topic, partitions)

    async def commit_abort(c: _Check) -> None:
        p = AIOProducer(_txn_conf(brokers, f"pk2pc-bench-aio-check-{suffix}-1"))
        await p.init_transactions(TIMEOUT)
        before = await count()
        await p.begin_transaction()
        f1 = [await p.produce(topic, value=b"commit", key=str(i).encode()) for i in range(5)]
        await p.commit_transaction(TIMEOUT)
        offsets = [m.offset() for m in await asyncio.gather(*f1)]
        after_commit = await count()
        await p.begin_transaction()
        f2 = [await p.produce(topic, value=b"abort", key=str(i).encode()) for i in range(5)]
        t0 = time.monotonic()
        await p.abort_transaction(TIMEOUT)
        abort_ms = (time.monotonic() - t0) * 1e3
        f2_states = [_future_state(f) for f in f2]
        after_abort = await count()
        await p.close()
        c.details = {"committed_visible": after_commit - before, "offsets": offsets,
                     "aborted_visible": after_abort - after_commit,
                     "aborted_futures": f2_states, "abort_ms": round(abort_ms, 1)}
        c.ok = after_commit - before == 5 and after_abort == after_commit
        c.result = (f"5 committed messages visible to read_committed: "
                    f"{after_commit - before}; 5 aborted visible: {after_abort - after_commit}; "
                    f"the aborted messages' futures: {sorted(set(map(str, f2_states)))} "
                    "(abort_transaction() first awaits flush(): the doomed messages are "
                    f"delivered before the abort; {abort_ms:.0f} ms)")

    async def offsets(c: _Check) -> None:
        group = f"pk2pc-bench-aio-check-{suffix}"
        consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                             "enable.auto.commit": False})
        p = AIOProducer(_txn_conf(brokers, f"pk2pc-bench-aio-check-{suffix}-2"))
        try:
            await p.init_transactions(TIMEOUT)
            await p.begin_transaction()
            await p.produce(topic, value=b"with offsets", key=b"o")
            tps = [TopicPartition(topic, 0, 3)]
            await p.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(),
                                                TIMEOUT)
            await p.commit_transaction(TIMEOUT)
            got = await asyncio.to_thread(consumer.committed, [TopicPartition(topic, 0)],
                                          TIMEOUT)
            c.details = {"committed_offset": got[0].offset}
            c.ok = got[0].offset == 3
            c.result = (f"offset 3 sent in the transaction; the group's committed offset "
                        f"after commit: {got[0].offset}")
        finally:
            await p.close()
            await asyncio.to_thread(consumer.close)

    async def fenced(c: _Check) -> None:
        txn_id = f"pk2pc-bench-aio-check-{suffix}-3"
        p = AIOProducer(_txn_conf(brokers, txn_id))
        await p.init_transactions(TIMEOUT)
        other = Producer(_txn_conf(brokers, txn_id))
        await asyncio.to_thread(other.init_transactions, TIMEOUT)  # fences p
        steps: dict[str, Any] = {}
        fut = None
        for step in ("begin_transaction", "produce", "commit_transaction"):
            try:
                if step == "begin_transaction":
                    await p.begin_transaction()
                elif step == "produce":
                    fut = await p.produce(topic, value=b"fenced", key=b"f")
                else:
                    await p.commit_transaction(TIMEOUT)
                steps[step] = "ok"
            except Exception as exc:
                steps[step] = _describe(exc)
        if fut is not None:
            steps["delivery future"] = _future_state(fut)
        try:
            await p.abort_transaction(TIMEOUT)
            steps["abort_transaction"] = "ok"
        except Exception as exc:
            steps["abort_transaction"] = _describe(exc)
        with contextlib.suppress(Exception):
            await p.close()
        other.flush(1)
        c.details = steps
        commit = steps.get("commit_transaction")
        c.ok = (isinstance(commit, dict) and commit.get("type") == "KafkaException"
                and bool(commit.get("fatal")) and steps.get("delivery future") != "pending")

        def show(v: Any) -> str:
            if isinstance(v, str):
                return v
            s = f"{v['type']}"
            if "code" in v:
                s += (f" from {v['code']}" if v["type"] != "KafkaException" else f" {v['code']}")
                s += " (fatal)" if v.get("fatal") else ""
            return s

        c.result = "; ".join(f"{k}: {show(v)}" for k, v in steps.items())

    async def headers(c: _Check) -> None:
        p = AIOProducer({"bootstrap.servers": brokers})
        try:
            await p.produce(topic, value=b"h", headers=[("k", b"v")])
            c.ok, c.result = True, "accepted"
        except NotImplementedError as exc:
            c.ok, c.result = False, f"NotImplementedError: {exc}"
        finally:
            await p.close()

    async def futures_from_thread(c: _Check) -> None:
        """A delivery future awaited by a task while flush() runs in a worker thread: the
        callback sets it from that thread (not through call_soon_threadsafe); asyncio's
        debug mode reports such calls."""
        loop = asyncio.get_running_loop()
        was = loop.get_debug()
        p = AIOProducer({"bootstrap.servers": brokers, "linger.ms": 1})
        try:
            for debug in (False, True):
                loop.set_debug(debug)
                fut = await p.produce(topic, value=b"x", key=b"x")
                waiter = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(fut), 10))
                await asyncio.sleep(0)
                try:
                    await p.flush()
                    flush = "ok"
                except Exception as exc:
                    flush = repr(exc)[:200]
                try:
                    await waiter
                    awaited = "resolved"
                except Exception as exc:
                    awaited = repr(exc)[:200]
                mode = "debug mode" if debug else "default mode"
                c.details[mode] = {"flush": flush, "awaited_future": awaited}
            c.ok = all(d == {"flush": "ok", "awaited_future": "resolved"}
                       for d in c.details.values())
            c.result = "; ".join(f"{m}: flush() {d['flush']}, the awaited future "
                                 f"{d['awaited_future']}" for m, d in c.details.items())
        finally:
            loop.set_debug(was)
            with contextlib.suppress(Exception):
                await p.close()

    for name, body in (
        ("commit, abort", commit_abort),
        ("send_offsets_to_transaction", offsets),
        ("fenced producer (another init_transactions with its transactional.id)", fenced),
        ("headers", headers),
        ("a delivery future awaited while flush() runs (its callback runs in the worker "
         "thread)", futures_from_thread),
    ):
        c = _Check(name)
        checks.append(await _guard(c, lambda b=body, c=c: b(c)))  # type: ignore[misc]
        say(f"  check {name}: {'ok' if c.ok else 'NOT ok'}: {c.result}")
    return checks


# -- the mode ---------------------------------------------------------------


async def _all(args: argparse.Namespace, env: Services, ms: list[int], topics: dict[str, str],
               check_topic: str, suffix: str, warmup: float,
               duration: float) -> tuple[list[RunResult], dict[str, int], list[_Check]]:
    procs = ProcessCpu(env.pg_port, env.kafka_port)
    lanes: dict[str, list[_Lane]] = {}
    try:
        for v in VARIANTS:
            lanes[v] = await _open_lanes(v, env.brokers, topics[v], args.producers, suffix)
        for v in VARIANTS:  # untimed pass
            await _measure(v, lanes[v], max(ms), -1, 0.0, args.first_warmup / 2, procs)
        results: list[RunResult] = []
        for run in range(args.runs):
            for m in ms:
                rot = run % len(VARIANTS)
                for v in VARIANTS[rot:] + VARIANTS[:rot]:
                    r = await _measure(v, lanes[v], m, run, warmup, duration, procs)
                    results.append(r)
                    bench = r.cores_by_process.get("bench process", 0.0)
                    say(f"  run {run + 1}/{args.runs} m={m:<4} {v:<8} {r.throughput:6.0f} "
                        f"txn/s  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  bench CPU "
                        f"{bench / max(r.throughput, 1e-9) * 1e3:.2f} ms/txn")
                    await asyncio.sleep(args.pause)
    finally:
        for ls in lanes.values():
            for lane in ls:
                with contextlib.suppress(Exception):
                    await lane.close()
    committed = {v: sum(lane.committed_messages for lane in ls) for v, ls in lanes.items()}
    checks = await api_check(env.brokers, check_topic, args.partitions, suffix)
    return results, committed, checks


def _markdown(results: list[RunResult], settings: dict[str, Any], counted: dict[str, int],
              committed: dict[str, int], checks: list[_Check], ratio: float) -> str:
    cells = aggregate(results, VARIANTS)
    lines = [
        f"In {settings['elapsed_s']:.0f} s. {settings['lanes']} lanes per way (a task with "
        "its own transactional producer, as the coordinator's producer pool), each "
        "committing transactions of M 1 KB messages back to back; each figure the median "
        f"of {settings['runs']} interleaved runs of {settings['duration_s']} s after "
        f"{settings['warmup_s']} s of warm-up. CPU per transaction: the process's CPU "
        "seconds during the measurement over the transactions completed in the window.",
        "",
        "| way | messages per txn | txns/s | messages/s | x threads | min-max of runs | "
        "txn p50 (ms) | txn p99 (ms) | CPU ms/txn: bench process | Kafka broker | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (v, m), c in cells.items():
        base = cells.get(("threads", m))
        x = f"{c.throughput / base.throughput:.2f}" if base and base.throughput else "-"
        cpu = [c.cores_by_process.get(k, 0.0) / max(c.throughput, 1e-9) * 1e3 for k in _PROCS]
        lines.append(f"| {LABELS[v]} | {m} | {c.throughput:.0f} | {c.throughput * m:.0f} | "
                     f"{x} | {c.tput_min:.0f}-{c.tput_max:.0f} | {c.p50_ms:.1f} | "
                     f"{c.p99_ms:.1f} | {cpu[0]:.2f} | {cpu[1]:.2f} | {c.errors} |")
    lines += [
        "",
        "Messages committed (counted by the lanes) vs read by a read_committed consumer: "
        + ", ".join(f"{v} {committed[v]} vs {counted[v]}" for v in VARIANTS) + ".",
        "",
        f"aio / threads at M = {settings['messages_per_txn'][-1]}: {ratio:.2f}.",
        "",
        "AIOProducer's transactional API, checked against the broker:",
        "",
        "| check | as expected | what happened |",
        "|---|---|---|",
        *(f"| {c.name} | {'yes' if c.ok else 'no'} | {c.result.replace('|', '/')} |"
          for c in checks),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace, out_dir: Path) -> int:
    env = Services.from_env()
    ms = sorted(int(x) for x in args.aio_messages.split(","))
    warmup, duration = min(args.warmup, 0.5), min(args.duration, 3.0)
    args.runs = min(args.runs, 3)
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    topics = {v: f"pk2pc-bench.aio-{v}.{suffix}" for v in VARIANTS}
    check_topic = f"pk2pc-bench.aio-check.{suffix}"
    started = time.monotonic()
    say(f"bench --aio-producer: M {ms}, {args.producers} lanes, {args.runs} runs of "
        f"{warmup}+{duration} s")
    create_topics(env.brokers, [*topics.values(), check_topic], args.partitions)
    try:
        results, committed, checks = asyncio.run(
            _all(args, env, ms, topics, check_topic, suffix, warmup, duration))
        counted = {v: _count_committed(env.brokers, topics[v], args.partitions)
                   for v in VARIANTS}
    finally:
        if not args.keep:
            delete_topics(env.brokers, [*topics.values(), check_topic])
    elapsed = time.monotonic() - started
    cells = aggregate(results, VARIANTS)
    top = max(ms)
    a, t = cells.get(("aio", top)), cells.get(("threads", top))
    ratio = a.throughput / t.throughput if a and t and t.throughput else float("nan")
    settings = {
        "command": ("scripts/bench " + " ".join(sys.argv[1:])).strip(),
        "runs": args.runs, "warmup_s": warmup, "duration_s": duration,
        "lanes": args.producers, "messages_per_txn": ms,
        "topic_partitions": args.partitions, "elapsed_s": round(elapsed, 1),
    }
    md = _markdown(results, settings, counted, committed, checks, ratio)
    write_mode_report(out_dir, "aio-producer", {
        "settings": settings, "machine": machine_notes(),
        "cells": [vars(c) for c in cells.values()], "runs": [vars(r) for r in results],
        "committed_messages": committed, "read_committed_messages": counted,
        "checks": [vars(c) for c in checks], "aio_producer_vs_threads": ratio,
        "median_machine_cores_busy": statistics.median(r.machine_cores_busy
                                                       for r in results),
    }, md)
    print(md)
    print(f"aio_producer_vs_threads={ratio:.2f}")
    return 0
