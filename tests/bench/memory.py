"""The ``--memory N`` mode: RSS of the group-commit path over N operations.

One process, group commit at the highest ``--concurrency``; RSS (``/proc/self/status``)
and the count of objects tracked by the garbage collector every ``N/100`` operations
(at least 1,000). Writes ``bench-memory.md/.json/.png``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from coordinator import CoordinatorConfig, GroupCommit

from .cpu import rss_kb
from .env import Services, Tables, create_topics, delete_topics, rollback_own_prepared, say
from .paths import TwoPC
from .report import write_mode_report

__all__ = ["main"]

Sample = tuple[int, float, int, int]
"""Operations done, seconds, RSS in kB, objects tracked by the garbage collector."""


def _run(impl: TwoPC, total: int, concurrency: int,
         step: int) -> tuple[list[Sample], int, float]:
    """``total`` operations from ``concurrency`` threads; the samples, the errors and
    the seconds taken."""
    samples: list[Sample] = []
    lock = threading.Lock()
    done = 0
    errors = 0
    t_start = time.monotonic()
    samples.append((0, 0.0, rss_kb(), len(gc.get_objects())))

    def worker(i: int) -> None:
        nonlocal done, errors
        n = 0
        while True:
            with lock:
                if done >= total:
                    return
                done += 1
                mine = done
            try:
                impl.op(f"m{i}-{n}")
            except Exception as exc:
                with lock:
                    errors += 1
                if errors < 5:
                    say(f"  ! {exc!r}")
            n += 1
            if mine % step == 0:
                s = (mine, time.monotonic() - t_start, rss_kb(), len(gc.get_objects()))
                with lock:
                    samples.append(s)
                if mine % (step * 10) == 0:
                    say(f"  {mine:>9} ops  {s[1]:6.0f} s  RSS {s[2] / 1024:6.1f} MB  "
                        f"objects {s[3]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples.sort()
    return samples, errors, time.monotonic() - t_start


def _rss_slope(samples: list[Sample], since: int) -> float:
    """Least-squares RSS growth (kB per operation) over the samples from ``since``."""
    part = [s for s in samples if s[0] >= since]
    if len(part) < 2:
        return 0.0
    xs = [s[0] for s in part]
    ys = [s[2] for s in part]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0


def _summary(samples: list[Sample], total: int, concurrency: int, errors: int,
             elapsed: float, step: int) -> dict[str, Any]:
    slope = _rss_slope(samples, total // 2)
    slope_last = _rss_slope(samples, total * 3 // 4)
    first_after_warm = next((s for s in samples if s[0] >= step * 5), samples[0])
    last = samples[-1]
    return {
        "operations": total, "concurrency": concurrency, "errors": errors,
        "elapsed_s": round(elapsed, 1), "ops_per_s": round(total / elapsed, 1),
        "rss_start_mb": round(samples[0][2] / 1024, 1),
        "rss_after_warmup_mb": round(first_after_warm[2] / 1024, 1),
        "rss_end_mb": round(last[2] / 1024, 1),
        "rss_max_mb": round(max(s[2] for s in samples) / 1024, 1),
        "slope_second_half_kb_per_100k_ops": round(slope * 100_000, 1),
        "slope_last_quarter_kb_per_100k_ops": round(slope_last * 100_000, 1),
        "extrapolated_growth_to_1M_ops_mb": round(slope * max(0, 1_000_000 - total) / 1024, 1),
        "extrapolated_growth_to_1M_ops_mb_last_quarter_slope": round(
            slope_last * max(0, 1_000_000 - total) / 1024, 1),
        "gc_objects_after_warmup": first_after_warm[3], "gc_objects_end": last[3],
    }


def _plot(samples: list[Sample], concurrency: int, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s[0] for s in samples], [s[2] / 1024 for s in samples], marker=".")
    ax.set_xlabel(f"operations (group commit, concurrency {concurrency})")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace, out_dir: Path) -> int:
    env = Services.from_env()
    total: int = args.memory
    c = int(args.concurrency.split(",")[-1])
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    tables = Tables(env.dsn, suffix)
    topic = f"pk2pc-bench.mem.{suffix}"
    tables.create()
    create_topics(env.brokers, [topic], args.partitions)
    instance = f"bench{os.getpid()}-m"
    step = max(total // 100, 1000)
    cfg = CoordinatorConfig(producers=args.producers,
                            group_commit=GroupCommit(args.max_wait, args.max_batch))
    try:
        impl = TwoPC("group", env.dsn, env.brokers, tables, topic, c + 5, instance, cfg)
        say(f"memory: {total} operations at concurrency {c}, RSS every {step}")
        try:
            samples, errors, elapsed = _run(impl, total, c, step)
        finally:
            impl.close()
    finally:
        rollback_own_prepared(env.dsn, [instance])
        tables.drop()
        delete_topics(env.brokers, [topic])
    summary = _summary(samples, total, c, errors, elapsed, step)
    md = "\n".join(f"- {k}: {v}" for k, v in summary.items())
    print(md)
    write_mode_report(out_dir, "memory", {"summary": summary, "samples": samples}, md)
    _plot(samples, c, out_dir / "bench-memory.png")
    return 0
