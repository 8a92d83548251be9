"""The ``--observers`` mode: what metrics and tracing cost the coordinator.

The group-commit path of the main mode ((d): one INSERT and one 1 KB message per
coordinated transaction, ``Coordinator`` with ``GroupCommit``, ``--producers``
producers) at the highest ``--concurrency`` (32 by default), three ways:

``off``              no observer (the default ``CoordinatorConfig(observers=())``);
``metrics``          :class:`~coordinator.metrics.PrometheusObserver` on a fresh
                     ``CollectorRegistry``;
``metrics_tracing``  the same plus :class:`~coordinator.tracing.TracingObserver` on an
                     SDK ``TracerProvider`` with a ``BatchSpanProcessor`` whose exporter
                     drops the spans in process: the cost measured is the library's and
                     the SDK's, not a network's.

and, only when asked (``--observer-variants``), a reference:

``metrics_tracing_sampled``  the same with the sampler
                     ``ParentBased(TraceIdRatioBased(0.1))``: one root span in ten
                     recorded (the others are non-recording; their context is still
                     propagated).

The three coordinators are open together in this process, on one connection pool and
one topic. The measurements are interleaved (round 1 of each variant, then round 2, ...;
the order rotates every round) after one untimed pass of each, so that drift on a shared
machine hits all three alike; each figure is the median of ``--runs`` rounds. Reported:
ops/s, CPU milliseconds per operation (the bench process, where the observers run, and
bench + Kafka + PostgreSQL) and each variant's overhead against ``off``.

Then, to say where the time goes: the calls one real transaction makes to its observers
are recorded (through the observer seam) and replayed on one thread through the
coordinator's fan-out to each variant's observers: CPU microseconds per transaction, and
a cProfile of the metrics + tracing replay by package and by function.

Writes ``bench-observers.md/.json``. The last line printed is ``observer_overhead_pct=X``:
the share of throughput metrics + tracing loses against off, in percent (medians; a
negative figure means it measured faster, i.e. the difference is within the noise).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import os
import pstats
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool

from coordinator import Coordinator, CoordinatorConfig, GroupCommit, Phase, Status
from coordinator._observing import Observers
from coordinator.metrics import PrometheusObserver
from coordinator.observe import Headers, Observer, TransactionInfo
from coordinator.tracing import TracingObserver

from .cpu import ProcessCpu
from .env import (
    COORD_NAME,
    PAYLOAD,
    Services,
    Tables,
    create_topics,
    delete_topics,
    make_pool,
    rollback_own_prepared,
    say,
)
from .loop import RunResult, measure
from .paths import Op, TwoPC
from .report import machine_notes, server_notes, write_mode_report

__all__ = [
    "ALL_VARIANTS",
    "LABELS",
    "TARGET_PCT",
    "VARIANTS",
    "DroppingExporter",
    "Observed",
    "main",
    "make_observers",
]

VARIANTS = ("off", "metrics", "metrics_tracing")
"""Measured by default."""
ALL_VARIANTS = (*VARIANTS, "metrics_tracing_sampled")
LABELS = {
    "off": "observers off",
    "metrics": "PrometheusObserver",
    "metrics_tracing": "PrometheusObserver + TracingObserver",
    "metrics_tracing_sampled": "PrometheusObserver + TracingObserver, 10 % sampled",
}
SAMPLED_RATIO = 0.1
"""The trace-id ratio of ``metrics_tracing_sampled``."""
TARGET_PCT = 5.0
"""The overhead aimed at, in percent of throughput at 32 threads."""

REPLAY_TRANSACTIONS = 5000
"""Transactions per replay of the observer calls."""
REPLAY_REPEATS = 5
"""Replays per variant (the least CPU per transaction is reported)."""

_WORK = ("bench process", "kafka broker", "postgres")
"""The processes doing the work of this mode (``cpu.OWN_PROCESSES`` less the outbox's)."""


class DroppingExporter(SpanExporter):
    """An in-process exporter that counts the spans it is given and drops them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclasses.dataclass
class Observed:
    """The observers of one variant, and what can be read from them afterwards."""

    observers: tuple[Observer, ...]
    registry: CollectorRegistry | None = None
    provider: TracerProvider | None = None
    exporter: DroppingExporter | None = None

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def committed_counted(self) -> float | None:
        """``pk2pc_transactions_total`` of committed transactions (None: no metrics)."""
        if self.registry is None:
            return None
        return self.registry.get_sample_value("pk2pc_transactions_total", {
            "name": COORD_NAME, "status": Status.COMMITTED.value, "phase": "none"}) or 0.0

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def make_observers(variant: str) -> Observed:
    """The observers of ``variant`` (one of :data:`ALL_VARIANTS`), each on its own
    registry and tracer provider."""
    if variant == "off":
        return Observed(())
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    if variant == "metrics":
        return Observed((metrics,), registry)
    if variant not in ("metrics_tracing", "metrics_tracing_sampled"):
        raise ValueError(f"unknown variant {variant!r}")
    exporter = DroppingExporter()
    provider = (TracerProvider() if variant == "metrics_tracing" else
                TracerProvider(sampler=ParentBased(TraceIdRatioBased(SAMPLED_RATIO))))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Observed((metrics, TracingObserver(tracer_provider=provider)), registry, provider,
                    exporter)


class _Variant(TwoPC):
    """The group-commit path with one variant's observers, on a shared pool."""

    def __init__(self, variant: str, pool: ConnectionPool[Any], brokers: str, tables: Tables,
                 topic: str, instance: str, config: CoordinatorConfig) -> None:
        self.observed = make_observers(variant)
        self.committed = 0
        self.errors = 0
        super().__init__(variant, "", brokers, tables, topic, 0, instance,
                         dataclasses.replace(config, observers=self.observed.observers),
                         pool=pool)

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> tuple[list[Op], dict[str, float]]:
        self.committed += len(ops)
        return super().end_measure(ops, w0, w1, warmup)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.observed.close()


# -- the measurement ----------------------------------------------------------------


def _rounds(args: argparse.Namespace, impls: list[_Variant], c: int,
            procs: ProcessCpu) -> list[RunResult]:
    for impl in impls:  # one untimed pass each
        measure(impl, c, -1, 0.0, args.first_warmup, procs)
    results: list[RunResult] = []
    for run in range(args.runs):
        rot = run % len(impls)
        for impl in impls[rot:] + impls[:rot]:
            r = measure(impl, c, run, args.warmup, args.duration, procs)
            impl.errors += r.errors
            results.append(r)
            say(f"  round {run + 1}/{args.runs} c={c} {impl.name:<15} "
                f"{r.throughput:7.0f} ops/s  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  "
                f"bench {_cpu_ms(r, ('bench process',)):.3f} ms/op  machine "
                f"{r.machine_cores_busy:.2f} cores")
            time.sleep(args.pause)
    return results


def _cpu_ms(r: RunResult, labels: Sequence[str]) -> float:
    """CPU milliseconds per operation of the processes ``labels`` during run ``r``."""
    cores = sum(r.cores_by_process.get(k, 0.0) for k in labels)
    return cores / max(r.throughput, 1e-9) * 1e3


def _pct(x: float, base: float) -> float:
    return (x / base - 1.0) * 100 if base else float("nan")


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Medians by variant, and each variant's overhead against ``off``: throughput lost
    (``tput_loss_pct``, from the medians; ``tput_loss_paired_pct``, the median over the
    rounds of the loss against ``off`` in the same round) and CPU per operation added."""
    out: dict[str, dict[str, float]] = {}
    by_run = {(r.path, r.run): r for r in results}
    for v in ALL_VARIANTS:
        rs = [r for r in results if r.path == v]
        if not rs:
            continue
        tp = [r.throughput for r in rs]
        out[v] = {
            "runs": len(rs), "ops_per_s": statistics.median(tp),
            "ops_per_s_min": min(tp), "ops_per_s_max": max(tp),
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "bench_cpu_ms_per_op": statistics.median(_cpu_ms(r, _WORK[:1]) for r in rs),
            "total_cpu_ms_per_op": statistics.median(_cpu_ms(r, _WORK) for r in rs),
            "machine_cores_busy": statistics.median(r.machine_cores_busy for r in rs),
            "mean_group_size": statistics.median(
                r.extra.get("mean_group_size", float("nan")) for r in rs),
            "errors": sum(r.errors for r in rs),
        }
    off = out.get("off")
    for v, s in out.items():
        if off is None:
            break
        s["tput_loss_pct"] = -_pct(s["ops_per_s"], off["ops_per_s"])
        s["bench_cpu_added_pct"] = _pct(s["bench_cpu_ms_per_op"], off["bench_cpu_ms_per_op"])
        s["total_cpu_added_pct"] = _pct(s["total_cpu_ms_per_op"], off["total_cpu_ms_per_op"])
        paired = [-_pct(by_run[(v, run)].throughput, by_run[("off", run)].throughput)
                  for (p, run) in by_run if p == v and ("off", run) in by_run]
        s["tput_loss_paired_pct"] = statistics.median(paired) if paired else float("nan")
    return out


# -- where the time goes: a replay of the observer calls ------------------------------

Call = tuple[str, tuple[Any, ...]]
"""One call of the coordinator's fan-out to a transaction's observers: the method of
``TxObservers`` and its arguments."""


class _RecordingTx:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def headers(self) -> Headers:
        self.calls.append(("headers", ()))
        return ()

    def phase(self, phase: Phase, seconds: float) -> None:
        self.calls.append(("phase", (phase,)))

    def prepared(self, gid: str) -> None:
        self.calls.append(("prepared", (gid,)))

    def group(self, members: int) -> None:
        self.calls.append(("group", (members,)))

    def end(self, status: Status, phase: Phase | None, error: BaseException | None,
            seconds: float) -> None:
        self.calls.append(("end", (status, phase, error)))


class _Recorder:
    """An observer that records what the coordinator tells each transaction."""

    def __init__(self) -> None:
        self.transactions: list[_RecordingTx] = []

    def transaction(self, info: TransactionInfo) -> _RecordingTx:
        rec = _RecordingTx()
        self.transactions.append(rec)
        return rec

    def producer_started(self, name: str, instance: str, slot: int, generation: int) -> None:
        pass

    def idempotency_hit(self, name: str, instance: str) -> None:
        pass


def record_calls(pool: ConnectionPool[Any], brokers: str, tables: Tables, topic: str,
                 instance: str, config: CoordinatorConfig) -> list[Call]:
    """The observer calls of one committed transaction of a real coordinator."""
    recorder = _Recorder()
    coord = Coordinator(pool, {"bootstrap.servers": brokers}, COORD_NAME, instance=instance,
                        config=dataclasses.replace(config, observers=(recorder,)))
    with coord:
        with coord.transaction() as tx:
            tx.execute(tables.insert_row, (f"rec-{uuid.uuid4().hex}", 1))
            tx.produce(topic, value=PAYLOAD, key=b"rec")
        if tx.status is not Status.COMMITTED:
            raise RuntimeError(f"the recorded transaction ended {tx.status}")
    return recorder.transactions[-1].calls


_CHUNK = 500
"""Transactions replayed between two flushes of the span processor (below its export
batch of 512 and queue of 2048: no span is dropped, the exporter thread stays idle)."""


def _replay(observed: Observed, calls: Sequence[Call], n: int,
            on: Callable[[], None] | None = None,
            off: Callable[[], None] | None = None) -> float:
    """CPU seconds (this thread's) per transaction of ``n`` replays of ``calls`` through
    the coordinator's fan-out (:class:`coordinator._observing.Observers`) to
    ``observed``; ``on``/``off`` around each timed chunk (a profiler)."""
    fan = Observers(observed.observers, COORD_NAME, "replay")
    spent = 0.0
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        if on:
            on()
        t0 = time.thread_time()
        for i in range(done, done + k):
            tx = fan.transaction(f"replay-{i}", None)
            for method, args in calls:
                getattr(tx, method)(*args)
        spent += time.thread_time() - t0
        if off:
            off()
        done += k
        observed.flush()
    return spent / n


def _category(filename: str) -> str:
    f = filename.replace(os.sep, "/")
    if "/prometheus_client/" in f:
        return "prometheus-client"
    if "/opentelemetry/sdk/" in f:
        return "opentelemetry-sdk"
    if "/opentelemetry/" in f:
        return "opentelemetry-api"
    for mod in ("_observing", "metrics", "tracing"):
        if f.endswith(f"/coordinator/{mod}.py"):
            return f"coordinator/{mod}.py"
    if f.endswith("/tests/bench/observers.py"):
        return "replay loop (bench)"
    if "/coordinator/" in f:
        return "coordinator (other)"
    return "Python built-ins and stdlib"


def profile_replay(calls: Sequence[Call], n: int, repeats: int,
                   variants: Sequence[str] = VARIANTS) -> dict[str, Any]:
    """Microseconds per transaction of each variant's observer calls (the least of
    ``repeats`` replays; ``off`` is the fan-out with no observer), and a cProfile of the
    metrics + tracing replay: tottime by package and the top functions."""
    us: dict[str, float] = {}
    variants = ["off", *(v for v in variants if v != "off")]
    for v in variants:
        observed = make_observers(v)
        try:
            _replay(observed, calls, min(n, 2000))  # warm-up
            us[v] = min(_replay(observed, calls, n) for _ in range(repeats)) * 1e6
        finally:
            observed.close()
    prof = cProfile.Profile()
    observed = make_observers("metrics_tracing")
    try:
        _replay(observed, calls, n, prof.enable, prof.disable)
    finally:
        observed.close()
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = (
        stats.stats)  # type: ignore[attr-defined]
    total = sum(t[2] for t in raw.values()) or 1e-12
    by_cat: dict[str, float] = {}
    for (filename, _, _), t in raw.items():
        by_cat[_category(filename)] = by_cat.get(_category(filename), 0.0) + t[2]
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:15]
    root = str(Path(__file__).resolve().parents[2]) + os.sep
    return {
        "transactions": n, "calls_per_transaction": [m for m, _ in calls],
        "cpu_us_per_transaction": us,
        "observer_cpu_us_per_transaction": {v: us[v] - us["off"] for v in variants[1:]},
        "profile_share_by_package": dict(sorted(
            ((k, v / total) for k, v in by_cat.items()), key=lambda kv: -kv[1])),
        "profile_top_tottime": [
            {"function": f"{_short(fn, root)}:{line}({name})", "calls": t[1],
             "tottime_share": t[2] / total, "us_per_transaction": t[2] / n * 1e6}
            for (fn, line, name), t in top],
    }


def _short(filename: str, root: str) -> str:
    if filename.startswith(root):
        return filename[len(root):]
    parts = filename.replace(os.sep, "/").split("/site-packages/")
    return parts[-1] if len(parts) > 1 else filename


# -- the report -----------------------------------------------------------------------


def _vs(variant: str, s: dict[str, float], key: str) -> str:
    return "-" if variant == "off" else f"{s[key]:+.1f} %"


def _markdown(summary: dict[str, dict[str, float]], replay: dict[str, Any],
              sanity: dict[str, Any], args: argparse.Namespace, c: int,
              group: GroupCommit) -> str:
    lines = [
        f"Coordinator with group commit (max_wait={group.max_wait * 1e3:g} ms, "
        f"max_batch={group.max_batch}, producers={args.producers}), {c} threads, one INSERT "
        f"+ one 1 KB message per transaction; median of {args.runs} interleaved rounds of "
        f"{args.duration} s after {args.warmup} s of warm-up. Throughput overhead: the share "
        "of ops/s lost against off (from the medians; paired: the median over the rounds of "
        "the loss against off in the same round). CPU per operation: cores used / ops/s, "
        "bench process (where the observers run) and bench + Kafka broker + PostgreSQL.",
        "",
        "| variant | ops/s | min-max | throughput overhead | paired | p50 (ms) | p99 (ms) "
        "| bench CPU (ms/op) | vs off | bench+Kafka+PG CPU (ms/op) | vs off | ops/Kafka txn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, s in summary.items():
        lines.append(
            f"| {LABELS[v]} | {s['ops_per_s']:.0f} | {s['ops_per_s_min']:.0f}-"
            f"{s['ops_per_s_max']:.0f} | {_vs(v, s, 'tput_loss_pct')} | "
            f"{_vs(v, s, 'tput_loss_paired_pct')} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{s['bench_cpu_ms_per_op']:.3f} | {_vs(v, s, 'bench_cpu_added_pct')} | "
            f"{s['total_cpu_ms_per_op']:.3f} | {_vs(v, s, 'total_cpu_added_pct')} | "
            f"{s['mean_group_size']:.1f} |")
    us = replay["cpu_us_per_transaction"]
    added = replay["observer_cpu_us_per_transaction"]
    off_ms = summary.get("off", {}).get("bench_cpu_ms_per_op", float("nan"))
    lines += [
        "",
        f"Observer calls replayed on one thread ({replay['transactions']} transactions, "
        f"the least of {REPLAY_REPEATS} replays, this thread's CPU; the calls of one "
        f"real transaction: {', '.join(replay['calls_per_transaction'])}):",
        "",
        "| variant | CPU per transaction (us) | added by the observers (us) | "
        "as a share of the bench process's CPU per op with observers off |",
        "|---|---:|---:|---:|",
    ]
    for v in us:
        extra = added.get(v)
        share = f"{extra / (off_ms * 1e3) * 100:.1f} %" if extra is not None else "-"
        shown = "-" if extra is None else f"{extra:.1f}"
        lines.append(f"| {LABELS[v]} | {us[v]:.1f} | {shown} | {share} |")
    lines += ["", "cProfile of the metrics + tracing replay, tottime by package:", "",
              "| package | share |", "|---|---:|"]
    lines += [f"| {k} | {v * 100:.1f} % |"
              for k, v in replay["profile_share_by_package"].items()]
    lines += ["", "Top functions by tottime (cProfile inflates the absolute times):", "",
              "| function | calls per transaction | share |", "|---|---:|---:|"]
    lines += [f"| `{f['function']}` | {f['calls'] / replay['transactions']:.1f} | "
              f"{f['tottime_share'] * 100:.1f} % |" for f in replay["profile_top_tottime"]]
    lines += ["", "Checks: " + ", ".join(f"{k}={v}" for k, v in sanity.items()) + "."]
    return "\n".join(lines)


def main(args: argparse.Namespace, out_dir: Path) -> int:
    env = Services.from_env()
    c = max(int(x) for x in args.concurrency.split(","))
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(env.dsn, suffix)
    topic = f"pk2pc-bench.observers.{suffix}"
    variants = [v for v in args.observer_variants.split(",") if v]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or "off" not in variants:
        sys.exit(f"--observer-variants: a subset of {','.join(ALL_VARIANTS)} with off; "
                 f"not {','.join(unknown) or 'without off'}")
    instances = {v: f"bench{os.getpid()}-o{i}" for i, v in enumerate(variants)}
    rec_instance = f"bench{os.getpid()}-orec"
    group = GroupCommit(max_wait=args.max_wait, max_batch=args.max_batch)
    config = CoordinatorConfig(producers=args.producers, group_commit=group)
    started = time.monotonic()
    notes = {**machine_notes(), **server_notes(env.dsn)}
    say(f"observers: {variants} at concurrency {c}, {args.runs} rounds of "
        f"{args.warmup}+{args.duration} s, producers={args.producers}, {group}")
    tables.create()
    create_topics(env.brokers, [topic], args.partitions)
    impls: list[_Variant] = []
    pool: ConnectionPool[Any] | None = None
    sanity: dict[str, Any] = {}
    try:
        # One pool for all: c workers, one instance-lock session per coordinator, spare.
        pool = make_pool(env.dsn, c + len(variants) + 5, "bench-observers")
        calls = record_calls(pool, env.brokers, tables, topic, rec_instance, config)
        for v in variants:
            impls.append(_Variant(v, pool, env.brokers, tables, topic, instances[v], config))
        say(f"observers: set up in {time.monotonic() - started:.1f} s; warming up")
        results = _rounds(args, impls, c, ProcessCpu(env.pg_port, env.kafka_port))
        for impl in impls:
            impl.observed.flush()
            counted = impl.observed.committed_counted()
            if counted is not None:
                sanity[f"{impl.name}_committed_ops"] = impl.committed
                sanity[f"{impl.name}_counter_committed"] = int(counted)
            if impl.observed.exporter is not None:
                sanity[f"{impl.name}_spans_exported"] = impl.observed.exporter.spans
                sanity[f"{impl.name}_transactions"] = impl.committed + impl.errors
    finally:
        for impl in impls:
            with contextlib.suppress(Exception):
                impl.close()
        if pool is not None:
            pool.close()
        left = rollback_own_prepared(env.dsn, [*instances.values(), rec_instance])
        if left:
            say(f"observers: rolled back {left} prepared transaction(s) left after errors")
        if not args.keep:
            tables.drop()
            delete_topics(env.brokers, [topic])
    measured_s = time.monotonic() - started
    say("observers: replaying the observer calls of one transaction (cProfile)")
    replay = profile_replay(calls, REPLAY_TRANSACTIONS, REPLAY_REPEATS, variants)
    summary = summarize(results)
    notes["loadavg_at_end"] = os.getloadavg()
    md = _markdown(summary, replay, sanity, args, c, group)
    elapsed = time.monotonic() - started
    write_mode_report(out_dir, "observers", {
        "settings": {
            "command": ("scripts/bench " + " ".join(sys.argv[1:])).strip(),
            "concurrency": c, "runs": args.runs, "warmup_s": args.warmup,
            "duration_s": args.duration, "first_warmup_s": args.first_warmup,
            "producers": args.producers, "group_commit": dataclasses.asdict(group),
            "topic_partitions": args.partitions, "replay_transactions": REPLAY_TRANSACTIONS,
            "replay_repeats": REPLAY_REPEATS, "measured_s": round(measured_s, 1),
            "elapsed_s": round(elapsed, 1), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        },
        "machine": notes, "summary": summary, "replay": replay, "checks": sanity,
        "runs": [dataclasses.asdict(r) for r in results],
    }, md + "\n\nMachine: " + ", ".join(f"{k}={v}" for k, v in notes.items()) + ".")
    print(md)
    loss = summary.get("metrics_tracing", {}).get("tput_loss_pct", float("nan"))
    verdict = "met" if loss < TARGET_PCT else "NOT met"
    print(f"\ntarget: overhead under {TARGET_PCT:g} % at {c} threads: {verdict} "
          f"({elapsed:.0f} s)")
    print(f"observer_overhead_pct={loss:.1f}")
    return 0
