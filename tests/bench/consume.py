"""The ``--consume`` mode: messages/s of a consume-process-produce stage, three ways
(``consume_paths.py``), at each batch size, side by side in one process.

The stage consumes input messages (1 KB each, pre-filled once into one topic), writes
one row per message to PostgreSQL and produces one 1 KB output message per message.
Every measurement uses a new consumer group (so it reads the input topic from its
start: the input only needs to hold what one measurement consumes), joined before the
clock starts; the rows and dedup tables are emptied between measurements. The runs
are interleaved as in the main mode (run 1 of every path and batch size, then run 2,
...; the order of the paths rotates), after one untimed pass of each path at the
largest batch size. The last line printed is::

    consume_exactly_once_vs_at_least_once=R consume_exactly_once_vs_idempotent=R

((e)'s messages/s over (f)'s and (g)'s, at the largest batch size measured).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from psycopg import sql

from .consume_paths import (
    ALL_CONSUME_PATHS,
    AtLeastOnce,
    ExactlyOnce,
    Stage,
    StageConsumer,
    open_consumer,
)
from .consume_report import consume_ratios, markdown, ratio_line
from .cpu import CpuMeter, ProcessCpu, cpu_delta
from .env import (
    PAYLOAD,
    Services,
    Tables,
    create_topics,
    delete_topics,
    rollback_own_prepared,
    say,
)
from .loop import RunResult, percentile
from .report import aggregate, machine_notes, server_notes, write_mode_report

__all__ = ["main", "run_mode"]


def prefill(brokers: str, topic: str, n: int, partitions: int) -> float:
    """Write ``n`` input messages (keys ``i-0`` ...), round robin over the partitions;
    the seconds it took."""
    t0 = time.monotonic()
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "acks": "all",
                         "batch.size": 1_000_000, "enable.idempotence": True})
    for i in range(n):
        while True:
            try:
                producer.produce(topic, value=PAYLOAD, key=f"i-{i}", partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("the input topic was not filled")
    return time.monotonic() - t0


class _Db:
    """The stage's tables: ``rows`` (one row per input message) and the dedup table
    of (g)."""

    def __init__(self, dsn: str, suffix: str) -> None:
        self.dsn = dsn
        self.tables = Tables(dsn, suffix)
        self.dedup = f"pk2pc_bench_dedup_{suffix}"
        rows = sql.Identifier(self.tables.rows)
        self.insert = sql.SQL("INSERT INTO {} (op_id, amount) VALUES (%s, 1)").format(rows)
        self.insert_once = sql.SQL(
            "WITH d AS (INSERT INTO {} (msg_id) VALUES (%s) ON CONFLICT DO NOTHING "
            "RETURNING msg_id) INSERT INTO {} (op_id, amount) SELECT msg_id, 1 FROM d"
        ).format(sql.Identifier(self.dedup), rows)

    def create(self) -> None:
        self.tables.create()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (msg_id text PRIMARY KEY)")
                         .format(sql.Identifier(self.dedup)))

    def truncate(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {}, {}").format(
                sql.Identifier(self.tables.rows), sql.Identifier(self.dedup)))

    def count(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(self.tables.rows))).fetchone()
            return int(row[0]) if row else -1

    def drop(self) -> None:
        self.tables.drop()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.dedup)))


def _check(stage: Stage, consumer: StageConsumer, db: _Db) -> bool:
    """Every message the stage finished has its row and its committed offset: rows ==
    finished == the group's committed offsets (each measurement starts at offset 0)."""
    finished = sum(n for n, _, _ in consumer.done) + consumer.pending
    committed = consumer.committed(consumer.assignment(), 30)
    offsets = sum(tp.offset for tp in committed if tp.offset >= 0)
    rows = db.count()
    if rows == finished == offsets:
        return True
    say(f"  ! {stage.name}: {finished} messages finished, {rows} rows, committed offsets "
        f"add up to {offsets}")
    return False


def measure(stage: Stage, env: Services, topic: str, group: str, batch: int, run: int,
            warmup: float, duration: float, input_n: int, procs: ProcessCpu,
            db: _Db) -> RunResult:
    """One measurement: a new consumer group, ``warmup`` + ``duration`` seconds of the
    stage; messages/s of the batches finished inside the measured window. Checked
    afterwards: one row and one committed offset per finished message."""
    consumer = open_consumer(env.brokers, group, topic, stage.phases, stage.finish)
    stage.phases.reset()
    stop = threading.Event()
    errors: list[int] = [0]
    first_error: list[BaseException] = []

    def body() -> None:
        try:
            errors[0] += stage.run(consumer, batch, stop)
        except Exception as exc:
            errors[0] += 1
            first_error.append(exc)

    procs0 = procs.snapshot()
    meter = CpuMeter()
    consumer.resume(consumer.assignment())
    thread = threading.Thread(target=body, name=f"stage-{stage.name}", daemon=True)
    start = time.monotonic()
    w0, w1 = start + warmup, start + warmup + duration
    thread.start()
    thread.join(max(0.0, w1 - time.monotonic()))
    stop.set()
    thread.join(120)
    cpu = meter.read()
    elapsed = time.monotonic() - meter.t0
    by_proc = {k: v / elapsed for k, v in cpu_delta(procs0, procs.snapshot())}
    consumed = consumer.consumed
    try:
        ok = _check(stage, consumer, db)
    finally:
        with contextlib.suppress(Exception):
            consumer.close()
    done = consumer.done
    inside = [(n, s, e) for n, s, e in done if w0 <= e <= w1]
    latencies = sorted(e - s for _, s, e in inside)
    batches = max(len(done), 1)
    extra: dict[str, float] = {
        "batches_per_s": len(inside) / duration,
        "mean_batch": sum(n for n, _, _ in inside) / max(len(inside), 1),
    }
    extra.update({f"phase:{k}": v / batches * 1e3 for k, v in stage.phases.totals.items()})
    if not ok:
        extra["check_failed"] = 1.0
    if consumed >= input_n:
        extra["input_exhausted"] = 1.0
        say(f"  ! {stage.name} b={batch}: the input topic ran out ({input_n} messages); "
            "raise --consume-input")
    if first_error:
        say(f"  ! {stage.name} b={batch}: {errors[0]} errors, first: {first_error[0]!r}")
    result = RunResult(
        path=stage.name, concurrency=batch, run=run,
        throughput=sum(n for n, _, _ in inside) / duration,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        completed=sum(n for n, _, _ in inside), errors=errors[0],
        machine_cores_busy=cpu[0], bench_process_cores=cpu[1], extra=extra)
    result.cores_by_process = by_proc
    return result


def _run_all(args: argparse.Namespace, env: Services, stages: list[Stage], topic: str,
             batches: list[int], db: _Db, suffix: str) -> list[RunResult]:
    procs = ProcessCpu(env.pg_port, env.kafka_port)
    n = 0

    def one(stage: Stage, batch: int, run: int, warmup: float, duration: float) -> RunResult:
        nonlocal n
        n += 1
        db.truncate()
        group = f"pk2pc-bench-consume-{suffix}-{n}"
        r = measure(stage, env, topic, group, batch, run, warmup, duration,
                    args.consume_input, procs, db)
        time.sleep(args.pause)
        return r

    for stage in stages:  # one untimed pass at the largest batch
        one(stage, max(batches), -1, 0.0, args.first_warmup)
    results: list[RunResult] = []
    for run in range(args.runs):
        for b in batches:
            rot = run % len(stages)
            for stage in stages[rot:] + stages[:rot]:
                r = one(stage, b, run, args.warmup, args.duration)
                results.append(r)
                say(f"  run {run + 1}/{args.runs} batch={b:<4} {stage.name:<13} "
                    f"{r.throughput:7.0f} msg/s  batch p50 {r.p50_ms:7.1f} ms  p99 "
                    f"{r.p99_ms:7.1f} ms  cpu {r.machine_cores_busy:.2f}")
    return results


def _open_stages(env: Services, db: _Db, outs: dict[str, str], instance: str,
                 stages: list[Stage]) -> None:
    """Open the paths of ``outs`` into ``stages`` (partly filled when one fails)."""
    for p, out in outs.items():
        if p == "exactly_once":
            stages.append(ExactlyOnce(env.dsn, env.brokers, db.insert, out, instance))
        elif p == "idempotent":
            stages.append(AtLeastOnce(p, env.dsn, env.brokers, db.insert_once, out,
                                      "dedup INSERT + COMMIT"))
        else:
            stages.append(AtLeastOnce(p, env.dsn, env.brokers, db.insert, out,
                                      "INSERT + COMMIT", wait_commit=p == "at_least_once"))
    stages.sort(key=lambda s: ALL_CONSUME_PATHS.index(s.name))


def default_input(args: argparse.Namespace) -> int:
    """Enough input for one measurement at 60,000 messages/s (here (e), (f) and (g)
    did up to ~31,000, the reference at_least_once_async more than 39,000), at least
    50,000."""
    seconds = max(args.warmup + args.duration, args.first_warmup)
    return max(50_000, int(60_000 * seconds))


def run_mode(args: argparse.Namespace, batches: list[int],
             out_dir: Path) -> tuple[str, dict[str, float]]:
    """Measure, write ``bench-consume.md/.json``; the report and the ratios."""
    env = Services.from_env()
    if args.consume_input is None:
        args.consume_input = default_input(args)
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    db = _Db(env.dsn, suffix)
    topic = f"pk2pc-bench.consume-in.{suffix}"
    paths = [p for p in args.consume_paths.split(",") if p]
    for p in paths:
        if p not in ALL_CONSUME_PATHS:
            sys.exit(f"unknown path {p!r}; choose from {', '.join(ALL_CONSUME_PATHS)}")
    outs = {p: f"pk2pc-bench.consume-{p}.{suffix}" for p in paths}
    instance = f"bench{os.getpid()}-e"
    started = time.monotonic()
    notes: dict[str, Any] = {**machine_notes(), **server_notes(env.dsn)}
    say(f"bench --consume: batch sizes {batches}, {args.runs} runs of {args.warmup}+"
        f"{args.duration} s, {args.partitions} partitions, {args.consume_input} input "
        "messages")
    db.create()
    create_topics(env.brokers, [topic, *outs.values()], args.partitions)
    stages: list[Stage] = []
    try:
        fill_s = prefill(env.brokers, topic, args.consume_input, args.partitions)
        say(f"bench --consume: input written in {fill_s:.1f} s")
        _open_stages(env, db, outs, instance, stages)
        results = _run_all(args, env, stages, topic, batches, db, suffix)
    finally:
        for stage in stages:
            with contextlib.suppress(Exception):
                stage.close()
        left = rollback_own_prepared(env.dsn, [instance])
        if left:
            say(f"bench: rolled back {left} prepared transaction(s) left after errors")
        if not args.keep:
            db.drop()
            delete_topics(env.brokers, [topic, *outs.values()])
    elapsed = time.monotonic() - started
    cells = aggregate(results, ALL_CONSUME_PATHS)
    at, ratios = consume_ratios(cells)
    settings = {
        "command": ("scripts/bench " + " ".join(sys.argv[1:])).strip(),
        "runs": args.runs, "warmup_s": args.warmup, "duration_s": args.duration,
        "paths": paths, "batch_sizes": batches, "topic_partitions": args.partitions,
        "input_messages": args.consume_input, "elapsed_s": round(elapsed, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    md = markdown(cells, results, settings, notes, at, ratios, os.cpu_count() or 0)
    write_mode_report(out_dir, "consume", {
        "settings": settings, "machine": notes,
        "cells": [vars(c) for c in cells.values()],
        "runs": [vars(r) for r in results], "ratios_at_batch": at, "ratios": ratios,
        "median_machine_cores_busy": statistics.median(
            r.machine_cores_busy for r in results),
    }, md)
    return md, ratios


def main(args: argparse.Namespace, out_dir: Path) -> int:
    md, ratios = run_mode(args, [int(x) for x in args.batch_sizes.split(",")], out_dir)
    print(md)
    print(ratio_line(ratios))
    return 0
