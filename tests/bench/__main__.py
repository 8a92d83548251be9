"""Throughput and latency of the coordinator against the alternatives.

The business operation is always the same: one INSERT of a row and one 1 KB
Kafka message. It goes through four paths, side by side in one process tree,
next to PostgreSQL alone doing the INSERT with 2PC:

``naive``   (a) commit PostgreSQL, then produce with an idempotent producer
            (``acks=all``) and wait for the delivery report. Unsafe: a crash
            between the two loses the message.
``outbox``  (b) transactional outbox: the business transaction also inserts an
            outbox row; a relay process polls ``SELECT ... FOR UPDATE SKIP
            LOCKED LIMIT n``, publishes the rows in one Kafka transaction and
            deletes them after the Kafka commit. Measured end to end: an
            operation completes when a ``read_committed`` consumer (another
            process) receives its message.
``per_op``  (c) the coordinator, one Kafka transaction per operation.
``group``   (d) the coordinator with group commit.
``pg_2pc``  PostgreSQL alone, no Kafka: INSERT + PREPARE TRANSACTION + COMMIT
            PREPARED, the physical ceiling of (c) and (d) on the machine at hand.

(c) and (d) use the same producer pool size. Every path runs at each
concurrency (threads, closed loop); the first ``--warmup`` seconds of every
measurement are excluded, and each figure is the median of ``--runs`` runs,
interleaved (run 1 of every path and concurrency, then run 2, ...) so that
drift on a shared machine hits every path alike.

Usage (through ``scripts/bench``, which starts the local stack, or
``.venv/bin/python -m tests.bench`` from the repository root)::

    scripts/bench                 # full benchmark, writes docs/bench-results.*
    scripts/bench --quick         # under three minutes, writes bench-results/; ends
                                  # with the consume path at batch 500
    scripts/bench --memory 300000 # RSS of the group-commit path over many operations
    scripts/bench --consume       # the consume path: messages/s of a consume-process-
                                  # produce stage, exactly once vs at least once vs an
                                  # idempotent consumer, at batch sizes 1, 100, 500
    scripts/bench --consume --quick
    scripts/bench --asyncio       # asyncio: (h) AsyncCoordinator with group commit vs
                                  # (i) async naive dual-write, at 32 and 256 tasks
    scripts/bench --asyncio --quick
    scripts/bench --aio-producer  # a Kafka transaction from asyncio: confluent_kafka.aio.
                                  # AIOProducer vs the blocking Producer in worker threads
    scripts/bench --observers     # group commit at 32 threads with observers off, with
                                  # Prometheus metrics, with metrics + tracing (observers.py)

The services come from ``PG_DSN`` and ``KAFKA_BOOTSTRAP_SERVERS``. The last
line of the main mode is::

    twopc_group_vs_naive=R twopc_group_vs_outbox=R twopc_group_vs_per_op=R twopc_group_vs_pg_2pc=R

(throughput of (d) over that of each path, at concurrency 32 or the highest
concurrency measured; NaN for a path not measured); with ``--quick`` it ends with
``consume_exactly_once_vs_at_least_once=R`` (the consume mode at batch 500 only).
The last line of ``--consume`` is::

    consume_exactly_once_vs_at_least_once=R consume_exactly_once_vs_idempotent=R

((e)'s messages/s over (f)'s and (g)'s at the largest batch size; see ``consume.py``).
The last line of ``--asyncio`` is ``async_group_vs_async_naive=R`` ((h)'s throughput
over (i)'s at 256 tasks; see ``aio_mode.py``), that of ``--aio-producer``
``aio_producer_vs_threads=R`` (see ``aio_producer.py``).
The last line of ``--observers`` is ``observer_overhead_pct=X`` (see ``observers.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator import CoordinatorConfig, GroupCommit

from . import aio_mode, aio_producer, consume, memory, throughput
from .consume_paths import CONSUME_PATHS
from .env import DEFAULT_OUT, QUICK_OUT
from .paths import PATHS

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = CoordinatorConfig()
    g = GroupCommit()
    refs = ",".join(p for p in ("pg_commit", "pg_2pc") if p not in PATHS)
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short runs (under three minutes); output to bench-results/")
    ap.add_argument("--runs", type=int, default=None, help="runs per figure (median)")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds excluded at the start of every run")
    ap.add_argument("--concurrency", default="1,8,32", help="thread counts, comma-separated")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="subset of " + ",".join(PATHS) + "; also the references "
                    + refs + " (PostgreSQL alone, no Kafka)")
    ap.add_argument("--producers", type=int, default=2,
                    help="producer pool size of (c) and (d) (default 2, the best for group "
                    "commit at concurrency 32 in docs/bench-tune.md; the library default is "
                    f"{d.producers})")
    ap.add_argument("--max-wait", type=float, default=g.max_wait,
                    help="GroupCommit.max_wait (s) of (d)")
    ap.add_argument("--max-batch", type=int, default=g.max_batch,
                    help="GroupCommit.max_batch of (d)")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of the bench topics")
    ap.add_argument("--relay-batch", type=int, default=500, help="outbox relay LIMIT")
    ap.add_argument("--relay-poll-ms", type=float, default=5.0,
                    help="outbox relay sleep when the outbox is empty")
    ap.add_argument("--out", default=None,
                    help="output directory (default docs/, or bench-results/ with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the bench tables and topics")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between measurements")
    ap.add_argument("--memory", type=int, metavar="N",
                    help="RSS of the group-commit path over N operations")
    ap.add_argument("--consume", action="store_true",
                    help="the consume path: (e) exactly once through run_consumer, (f) at "
                    "least once, (g) an idempotent consumer, at each --batch-sizes")
    ap.add_argument("--batch-sizes", default="1,100,500",
                    help="batch sizes of --consume, comma-separated")
    ap.add_argument("--consume-paths", default=",".join(CONSUME_PATHS),
                    help="paths of --consume: a subset of " + ",".join(CONSUME_PATHS)
                    + "; also the reference at_least_once_async (offsets committed "
                    "asynchronously)")
    ap.add_argument("--consume-input", type=int, default=None, metavar="N",
                    help="input messages of --consume (default: enough for one "
                    "measurement at 60,000 messages/s)")
    ap.add_argument("--no-consume", action="store_true",
                    help="with --quick: skip the consume path at the largest batch size")
    ap.add_argument("--asyncio", action="store_true",
                    help="asyncio: (h) AsyncCoordinator with group commit vs (i) async "
                    "naive dual-write, at each --tasks count, on one event loop")
    ap.add_argument("--tasks", default="32,256",
                    help="asyncio task counts of --asyncio, comma-separated")
    ap.add_argument("--uvloop", action="store_true",
                    help="--asyncio on uvloop's event loop instead of asyncio's own")
    ap.add_argument("--async-pool", type=int, default=64,
                    help="connection pool size of both --asyncio paths (at most the highest "
                    "--tasks; PostgreSQL's max_prepared_transactions bounds (h)'s)")
    ap.add_argument("--aio-producer", action="store_true",
                    help="a Kafka transaction's produce + commit from asyncio: "
                    "confluent_kafka.aio.AIOProducer vs the blocking Producer in a "
                    "ThreadPoolExecutor (at most 3 runs of at most 3 s per figure), and a check "
                    "of AIOProducer's transactional API")
    ap.add_argument("--aio-messages", default="2,16,128",
                    help="messages per Kafka transaction of --aio-producer, comma-separated")
    ap.add_argument("--observers", action="store_true",
                    help="the cost of metrics and tracing: group commit at the highest "
                    "--concurrency with observers off, PrometheusObserver, and "
                    "PrometheusObserver + TracingObserver, interleaved")
    ap.add_argument("--observer-variants", default="off,metrics,metrics_tracing",
                    help="variants of --observers; also the reference metrics_tracing_sampled")
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.duration is None:
        args.duration = 1.5 if args.quick else 6.0
    if args.warmup is None:
        args.warmup = 0.4 if args.quick else 1.5
    args.first_warmup = 1.0 if args.quick else 3.0
    if args.quick:
        args.pause = min(args.pause, 0.1)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out_dir = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.memory:
        return memory.main(args, out_dir)
    if args.consume:
        return consume.main(args, out_dir)
    if args.asyncio:
        return aio_mode.main(args, out_dir)
    if args.aio_producer:
        return aio_producer.main(args, out_dir)
    if args.observers:  # imported here: only this mode needs the metrics and otel extras
        from . import observers

        return observers.main(args, out_dir)
    return throughput.main(args, out_dir)


if __name__ == "__main__":
    sys.exit(main())
