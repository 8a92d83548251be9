"""The main mode: every path at each concurrency, side by side in one process tree.

Each figure is the median of ``--runs`` runs, interleaved (run 1 of every path and
concurrency, then run 2, ...; the order of the paths rotates) so that drift on a shared
machine hits every path alike. Writes ``bench-results.md/.json`` and
``bench-throughput.png``; the last line printed is the ratio line. With ``--quick``
(unless ``--no-consume``) the consume mode then runs at its largest batch size only
(``bench-consume.md/.json``) and the ratio line ends with
``consume_exactly_once_vs_at_least_once=R``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import coordinator
from coordinator import CoordinatorConfig, GroupCommit

from . import consume
from .cpu import ProcessCpu
from .env import (
    Services,
    Tables,
    create_topics,
    delete_topics,
    rollback_own_prepared,
    say,
)
from .loop import RunResult, measure
from .outbox import Outbox
from .paths import ALL_PATHS, Naive, PgOnly, TwoPC, Workload
from .report import (
    aggregate,
    cpu_markdown,
    final_ratios,
    machine_notes,
    plot,
    ratio_line,
    server_notes,
    table_markdown,
)

__all__ = ["main"]


def _open_paths(args: argparse.Namespace, env: Services, paths: list[str], tables: Tables,
                topics: dict[str, str], instances: dict[str, str], group: GroupCommit,
                pool_size: int, opened: dict[str, Workload]) -> None:
    """Open the paths asked for into ``opened`` (partly filled when one fails)."""
    if "outbox" in paths:  # spawn the child processes before any thread starts
        opened["outbox"] = Outbox(env.dsn, env.brokers, tables, topics["outbox"],
                                  args.partitions, pool_size, args.relay_batch,
                                  args.relay_poll_ms / 1e3)
    if "naive" in paths:
        opened["naive"] = Naive(env.dsn, env.brokers, tables, topics["naive"], pool_size,
                                {"linger.ms": 1})
    for p in ("pg_2pc", "pg_commit"):
        if p in paths:
            opened[p] = PgOnly(p, env.dsn, tables, pool_size)
    for p, gc in (("per_op", None), ("group", group)):
        if p in paths:
            cfg = CoordinatorConfig(producers=args.producers, group_commit=gc)
            opened[p] = TwoPC(p, env.dsn, env.brokers, tables, topics[p], pool_size + 1,
                              instances[p], cfg)


def _run_all(args: argparse.Namespace, ordered: list[Workload], concs: list[int],
             procs: ProcessCpu) -> list[RunResult]:
    for impl in ordered:
        for pid, label in impl.processes().items():
            procs.name(pid, label)
    for impl in ordered:  # one untimed pass at the highest concurrency
        measure(impl, max(concs), -1, 0.0, args.first_warmup, procs)
    results: list[RunResult] = []
    for run in range(args.runs):
        for c in concs:
            rot = run % len(ordered)
            for impl in ordered[rot:] + ordered[:rot]:
                r = measure(impl, c, run, args.warmup, args.duration, procs)
                results.append(r)
                say(f"  run {run + 1}/{args.runs} c={c:<3} {impl.name:<7} "
                    f"{r.throughput:7.0f} ops/s  p50 {r.p50_ms:6.1f} ms  p99 "
                    f"{r.p99_ms:6.1f} ms  cpu {r.machine_cores_busy:.2f}"
                    + "".join(f"  {k}={v:.1f}" for k, v in r.extra.items()))
                time.sleep(args.pause)
    return results


def main(args: argparse.Namespace, out_dir: Path) -> int:
    env = Services.from_env()
    out_dir.mkdir(parents=True, exist_ok=True)
    concs = [int(x) for x in args.concurrency.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in ALL_PATHS:
            sys.exit(f"unknown path {p!r}; choose from {', '.join(ALL_PATHS)}")
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(env.dsn, suffix)
    topics = {p: f"pk2pc-bench.{p}.{suffix}" for p in paths}
    instances = {"per_op": f"bench{os.getpid()}-c", "group": f"bench{os.getpid()}-d"}
    group = GroupCommit(max_wait=args.max_wait, max_batch=args.max_batch)
    pool_size = max(concs) + 4
    started = time.monotonic()
    notes = {**machine_notes(), **server_notes(env.dsn)}
    say(f"bench: paths {paths}, concurrency {concs}, {args.runs} runs of "
        f"{args.warmup}+{args.duration} s, producers={args.producers}, {group}")
    tables.create()
    create_topics(env.brokers, list(topics.values()), args.partitions)
    impls: dict[str, Workload] = {}
    try:
        _open_paths(args, env, paths, tables, topics, instances, group, pool_size, impls)
        say(f"bench: set up in {time.monotonic() - started:.1f} s; warming up")
        ordered = [impls[p] for p in ALL_PATHS if p in impls]
        results = _run_all(args, ordered, concs, ProcessCpu(env.pg_port, env.kafka_port))
    finally:
        for impl in impls.values():
            with contextlib.suppress(Exception):
                impl.close()
        left = rollback_own_prepared(env.dsn, list(instances.values()))
        if left:
            say(f"bench: rolled back {left} prepared transaction(s) left after errors")
        if not args.keep:
            tables.drop()
            delete_topics(env.brokers, list(topics.values()))
    elapsed = time.monotonic() - started
    cells = aggregate(results)
    table = table_markdown(cells)
    c32, ratios = final_ratios(cells)
    cpu_table = cpu_markdown(cells, c32)
    command = "scripts/bench " + " ".join(sys.argv[1:])
    settings = {
        "command": command.strip(), "runs": args.runs, "warmup_s": args.warmup,
        "duration_s": args.duration, "concurrency": concs, "producers": args.producers,
        "group_commit": asdict(group), "topic_partitions": args.partitions,
        "relay_batch": args.relay_batch, "relay_poll_ms": args.relay_poll_ms,
        "elapsed_s": round(elapsed, 1),
        "coordinator": coordinator.__file__,
    }
    (out_dir / "bench-results.json").write_text(json.dumps({
        "settings": settings, "machine": notes,
        "cells": [asdict(c) for c in cells.values()],
        "runs": [asdict(r) for r in results],
        "ratios_at": c32, "ratios": ratios,
    }, indent=1, default=str) + "\n")
    png = out_dir / "bench-throughput.png"
    has_plot = plot(cells, png)
    md = [
        "# Benchmark results",
        "",
        f"Generated by `{settings['command']}` on {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"in {elapsed:.0f} s. Each figure is the median of {args.runs} interleaved runs of "
        f"{args.duration} s after {args.warmup} s of warm-up; "
        f"producers={args.producers}, group commit max_wait={group.max_wait * 1e3:g} ms, "
        f"max_batch={group.max_batch}; topics with {args.partitions} partitions; outbox relay "
        f"batch {args.relay_batch}, idle poll {args.relay_poll_ms:g} ms. "
        "Outbox latency and throughput are end to end (until a read_committed consumer "
        "receives the message).",
        "",
        table,
        "",
        f"At concurrency {c32}: group vs naive {ratios['naive']:.2f}, vs outbox "
        f"{ratios['outbox']:.2f}, vs per-op {ratios['per_op']:.2f}, vs PostgreSQL alone "
        f"doing INSERT + PREPARE + COMMIT PREPARED (the ceiling) {ratios['pg_2pc']:.2f}.",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in notes.items()) + ".",
        "",
        f"CPU cores used by each process during the runs at concurrency {c32} (median; the "
        "machine has " + str(os.cpu_count()) + " cores; other processes on the shared machine "
        "count in machine busy):",
        "",
        cpu_table,
    ]
    if has_plot:
        md += ["", f"![throughput vs concurrency]({png.name})"]
    (out_dir / "bench-results.md").write_text("\n".join(md) + "\n")
    print(table)
    print(f"\nCPU cores by process at concurrency {c32}:\n{cpu_table}")
    print(f"\nwritten: {out_dir / 'bench-results.md'}, {out_dir / 'bench-results.json'}"
          + (f", {png}" if has_plot else ""))
    line = ratio_line(ratios)
    if args.quick and not args.no_consume:
        batch = max(int(x) for x in args.batch_sizes.split(","))
        say(f"bench: the consume path at batch {batch} (all batch sizes: --consume --quick)")
        _, consume_ratios = consume.run_mode(args, [batch], out_dir)
        print(f"\nconsume path at batch {batch}: see {out_dir / 'bench-consume.md'}")
        line += f" consume_exactly_once_vs_at_least_once={consume_ratios['at_least_once']:.2f}"
    print(line)
    return 0
