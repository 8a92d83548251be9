"""The ``--asyncio`` mode: (h) the asyncio coordinator with group commit against (i)
async naive dual-write (``aio_paths.py``), at each ``--tasks`` count, side by side on
one event loop in one process.

Each figure is the median of ``--runs`` runs, interleaved as in the main mode (run 1
of both paths at every task count, then run 2, ...; the order of the paths rotates),
after one untimed pass of each path at the highest task count. Reported per path and
task count: operations/s, latency, and CPU per operation (CPU seconds of the bench
process, the Kafka broker and PostgreSQL over the measurement, divided by the
operations; ``cpu.py``). Writes ``bench-asyncio.md/.json``; the last line printed is::

    async_group_vs_async_naive=R

((h)'s throughput over (i)'s at 256 tasks, or the highest task count measured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coordinator import CoordinatorConfig, GroupCommit

from .aio_loop import ameasure
from .aio_paths import ASYNC_LABELS, ASYNC_PATHS, AsyncGroup, AsyncNaive, AsyncWorkload
from .cpu import ProcessCpu
from .env import Services, Tables, create_topics, delete_topics, rollback_own_prepared, say
from .loop import RunResult
from .report import Cells, aggregate, machine_notes, server_notes, write_mode_report

__all__ = ["TARGET", "async_ratio", "main", "markdown", "ratio_line"]

TARGET = 0.5
"""(h) >= 0.5x (i) at 256 tasks."""
_PROCS = ("bench process", "kafka broker", "postgres")


def async_ratio(cells: Cells) -> tuple[int, float]:
    """The task count of the ratio line (256, or the highest measured) and (h)'s
    throughput over (i)'s there (NaN when either is missing)."""
    counts = sorted({c for _, c in cells})
    at = 256 if 256 in counts else counts[-1]
    h, i = cells.get(("async_group", at)), cells.get(("async_naive", at))
    return at, (h.throughput / i.throughput if h and i and i.throughput else float("nan"))


def ratio_line(ratio: float) -> str:
    return f"async_group_vs_async_naive={ratio:.2f}"


def _paired(results: Sequence[RunResult], tasks: int) -> str:
    """(h) over (i) in the same run (measured next to each other): min / median / max."""
    by = {(r.path, r.run): r.throughput for r in results if r.concurrency == tasks}
    rs = sorted(by[("async_group", i)] / by[("async_naive", i)] for p, i in by
                if p == "async_group" and by.get(("async_naive", i)))
    if not rs:
        return "-"
    return f"{rs[0]:.2f} / {statistics.median(rs):.2f} / {rs[-1]:.2f}"


def _ms_per_op(cores: float, throughput: float) -> float:
    return cores / throughput * 1e3 if throughput else float("nan")


def _table(cells: Cells, results: Sequence[RunResult]) -> list[str]:
    lines = [
        "| path | tasks | throughput (ops/s) | x (i) | (h)/(i) run by run: min / median / "
        "max | min-max of runs | p50 (ms) | p99 (ms) | CPU ms/op: bench process | "
        "Kafka broker | PostgreSQL | the three | machine CPU busy (of "
        f"{os.cpu_count()}) | loop lag p99 (ms) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (path, c), cell in cells.items():
        base = cells.get(("async_naive", c))
        ratio = f"{cell.throughput / base.throughput:.2f}" if base and base.throughput else "-"
        paired = _paired(results, c) if path == "async_group" else ""
        cpu = [_ms_per_op(cell.cores_by_process.get(k, 0.0), cell.throughput)
               for k in _PROCS]
        notes = []
        if "mean_group_size" in cell.extra:
            notes.append(f"{cell.extra['mean_group_size']:.1f} ops/Kafka txn")
        if cell.errors:
            notes.append(f"{cell.errors} errors")
        lines.append(
            f"| {ASYNC_LABELS[path]} | {c} | {cell.throughput:.0f} | {ratio} | {paired} | "
            f"{cell.tput_min:.0f}-{cell.tput_max:.0f} | {cell.p50_ms:.1f} | "
            f"{cell.p99_ms:.1f} | " + " | ".join(f"{x:.2f}" for x in cpu)
            + f" | {sum(cpu):.2f} | {cell.machine_cores_busy:.2f} | "
            f"{cell.extra.get('loop_lag_p99_ms', math.nan):.1f} | {'; '.join(notes)} |")
    return lines


def markdown(cells: Cells, results: Sequence[RunResult], settings: dict[str, Any],
             notes: dict[str, Any], at: int, ratio: float) -> str:
    s = settings
    met = "met" if ratio >= TARGET else "**missed**"
    md = [
        f"In {s['elapsed_s']:.0f} s. One process, one event loop; each figure is the "
        f"median of {s['runs']} interleaved runs of {s['duration_s']} s after "
        f"{s['warmup_s']} s of warm-up. Each task issues operations back to back (one "
        "INSERT + one 1 KB message); an operation counts when it completes inside the "
        f"measured window. Both paths: a psycopg AsyncConnectionPool of {s['pool_size']} "
        f"connections; (h) producers={s['producers']}, group commit "
        f"max_wait={s['group_commit']['max_wait'] * 1e3:g} ms, "
        f"max_batch={s['group_commit']['max_batch']}; (i) one idempotent producer "
        "(acks=all, linger.ms=1), delivery reports served by a poller thread. Topics with "
        f"{s['topic_partitions']} partitions. CPU per operation: CPU seconds of each "
        "process during the measurement (warm-up included) over the operations completed "
        "in the measured window, medians; loop lag: how late a 5 ms `asyncio.sleep` woke "
        "up, p99 over the measurement.",
        "",
        *_table(cells, results),
        "",
        f"At {at} tasks: (h) / (i) = {ratio:.2f} (target >= {TARGET}: {met}).",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in notes.items())
        + f"; load average at the end {tuple(round(x, 2) for x in s['loadavg_at_end'])}.",
    ]
    return "\n".join(md)


async def _open_paths(args: argparse.Namespace, env: Services, tables: Tables,
                      topics: dict[str, str], instance: str, pool_size: int,
                      opened: list[AsyncWorkload]) -> None:
    """Open the paths into ``opened`` (partly filled when one fails)."""
    group = GroupCommit(max_wait=args.max_wait, max_batch=args.max_batch)
    cfg = CoordinatorConfig(producers=args.producers, group_commit=group)
    opened.append(await AsyncGroup.open(env.dsn, env.brokers, tables, topics["async_group"],
                                        pool_size, instance, cfg))
    opened.append(await AsyncNaive.open(env.dsn, env.brokers, tables, topics["async_naive"],
                                        pool_size, {"linger.ms": 1}))


async def _run_all(args: argparse.Namespace, ordered: list[AsyncWorkload], counts: list[int],
                   procs: ProcessCpu) -> list[RunResult]:
    for impl in ordered:  # one untimed pass at the highest task count
        await ameasure(impl, max(counts), -1, 0.0, args.first_warmup, procs)
    results: list[RunResult] = []
    for run in range(args.runs):
        for c in counts:
            rot = run % len(ordered)
            for impl in ordered[rot:] + ordered[:rot]:
                r = await ameasure(impl, c, run, args.warmup, args.duration, procs)
                results.append(r)
                bench_ms = _ms_per_op(r.cores_by_process.get("bench process", 0.0),
                                      r.throughput)
                say(f"  run {run + 1}/{args.runs} tasks={c:<4} {impl.name:<12} "
                    f"{r.throughput:7.0f} ops/s  p50 {r.p50_ms:6.1f} ms  p99 "
                    f"{r.p99_ms:6.1f} ms  bench CPU {bench_ms:.2f} ms/op  machine "
                    f"{r.machine_cores_busy:.2f}"
                    + "".join(f"  {k}={v:.1f}" for k, v in r.extra.items()))
                await asyncio.sleep(args.pause)
    return results


async def _measure_all(args: argparse.Namespace, env: Services, counts: list[int],
                       tables: Tables, topics: dict[str, str], instance: str,
                       pool_size: int) -> list[RunResult]:
    opened: list[AsyncWorkload] = []
    try:
        await _open_paths(args, env, tables, topics, instance, pool_size, opened)
        ordered = sorted(opened, key=lambda w: ASYNC_PATHS.index(w.name))
        return await _run_all(args, ordered, counts, ProcessCpu(env.pg_port, env.kafka_port))
    finally:
        for impl in opened:
            try:
                await impl.close()
            except Exception as exc:
                say(f"bench: closing {impl.name}: {exc!r}")


def _loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``--uvloop``: uvloop's event loop (installed by ``scripts/bench --uvloop``)."""
    if not uvloop:
        return None
    try:
        uv = importlib.import_module("uvloop")  # not a dependency of the library
    except ImportError as exc:
        raise SystemExit("bench --uvloop: uvloop is not installed (pip install uvloop)") \
            from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uv.new_event_loop
    return factory


def run_mode(args: argparse.Namespace, out_dir: Path) -> tuple[str, float]:
    """Measure, write ``bench-asyncio.md/.json``; the report and (h)/(i) at 256 tasks."""
    env = Services.from_env()
    counts = [int(x) for x in args.tasks.split(",")]
    pool_size = min(max(counts), args.async_pool)
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(env.dsn, suffix)
    topics = {p: f"pk2pc-bench.{p}.{suffix}" for p in ASYNC_PATHS}
    instance = f"bench{os.getpid()}-h"
    started = time.monotonic()
    notes: dict[str, Any] = {**machine_notes(), **server_notes(env.dsn)}
    say(f"bench --asyncio: tasks {counts}, {args.runs} runs of {args.warmup}+"
        f"{args.duration} s, pool {pool_size}, producers={args.producers}")
    tables.create()
    create_topics(env.brokers, list(topics.values()), args.partitions)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.uvloop)) as runner:
            results = runner.run(_measure_all(args, env, counts, tables, topics, instance,
                                              pool_size))
    finally:
        left = rollback_own_prepared(env.dsn, [instance])
        if left:
            say(f"bench: rolled back {left} prepared transaction(s) left after errors")
        if not args.keep:
            with contextlib.suppress(Exception):
                tables.drop()
            delete_topics(env.brokers, list(topics.values()))
    elapsed = time.monotonic() - started
    cells = aggregate(results, ASYNC_PATHS)
    at, ratio = async_ratio(cells)
    settings = {
        "command": ("scripts/bench " + " ".join(sys.argv[1:])).strip(),
        "runs": args.runs, "warmup_s": args.warmup, "duration_s": args.duration,
        "tasks": counts, "pool_size": pool_size, "producers": args.producers,
        "event_loop": "uvloop" if args.uvloop else "asyncio",
        "group_commit": {"max_wait": args.max_wait, "max_batch": args.max_batch},
        "topic_partitions": args.partitions, "elapsed_s": round(elapsed, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    md = markdown(cells, results, settings, notes, at, ratio)
    write_mode_report(out_dir, "asyncio", {
        "settings": settings, "machine": notes,
        "cells": [vars(c) for c in cells.values()],
        "runs": [vars(r) for r in results], "ratio_at_tasks": at,
        "async_group_vs_async_naive": ratio,
    }, md)
    return md, ratio


def main(args: argparse.Namespace, out_dir: Path) -> int:
    md, ratio = run_mode(args, out_dir)
    print(md)
    print(ratio_line(ratio))
    return 0
