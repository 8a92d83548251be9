"""Reporting: the runs aggregated into cells (medians), the Markdown tables, the final
ratio line, the plot, and the notes on the machine and the servers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka
import psycopg
from psycopg import sql

from .cpu import OWN_PROCESSES
from .env import say
from .loop import RunResult
from .paths import ALL_PATHS, LABELS

__all__ = [
    "Cell",
    "aggregate",
    "cpu_markdown",
    "final_ratios",
    "machine_notes",
    "plot",
    "ratio_line",
    "server_notes",
    "table_markdown",
    "write_mode_report",
]

RATIOS = ("naive", "outbox", "per_op", "pg_2pc")
"""The ratio line: group commit's throughput over each of these paths'. The last is
the share of the protocol's physical ceiling reached: PostgreSQL alone doing INSERT +
PREPARE TRANSACTION + COMMIT PREPARED at the same concurrency, in the same run."""


def machine_notes() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "memory": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "psycopg": psycopg.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def server_notes(dsn: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT version()").fetchone()
        out["postgres"] = str(row[0]).split(" on ")[0] if row else "?"
        for s in ("fsync", "synchronous_commit", "wal_sync_method", "commit_delay",
                  "max_prepared_transactions", "shared_buffers"):
            r = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(s))).fetchone()
            out[s] = str(r[0]) if r else "?"
    return out


@dataclass
class Cell:
    path: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    tput_min: float
    tput_max: float
    runs: int
    errors: int
    machine_cores_busy: float
    extra: dict[str, float]
    cores_by_process: dict[str, float]


Cells = dict[tuple[str, int], Cell]


def aggregate(results: Sequence[RunResult], order: Sequence[str] = ALL_PATHS) -> Cells:
    """Medians by (path, concurrency), sorted by concurrency, then ``order``."""
    cells: Cells = {}
    keys = sorted({(r.path, r.concurrency) for r in results},
                  key=lambda k: (k[1], list(order).index(k[0])))
    for key in keys:
        rs = [r for r in results if (r.path, r.concurrency) == key]
        tp = [r.throughput for r in rs]
        extra_keys = sorted({k for r in rs for k in r.extra})
        cells[key] = Cell(
            path=key[0], concurrency=key[1], throughput=statistics.median(tp),
            p50_ms=statistics.median(r.p50_ms for r in rs),
            p99_ms=statistics.median(r.p99_ms for r in rs),
            tput_min=min(tp), tput_max=max(tp), runs=len(rs),
            errors=sum(r.errors for r in rs),
            machine_cores_busy=statistics.median(r.machine_cores_busy for r in rs),
            extra={k: statistics.median(r.extra[k] for r in rs if k in r.extra)
                   for k in extra_keys},
            cores_by_process={
                k: statistics.median(r.cores_by_process.get(k, 0.0) for r in rs)
                for k in sorted({k for r in rs for k in r.cores_by_process})},
        )
    return cells


def _notes(cell: Cell) -> str:
    notes = []
    if "mean_group_size" in cell.extra:
        notes.append(f"{cell.extra['mean_group_size']:.1f} ops/Kafka txn")
    if "pg_commit_throughput" in cell.extra:
        notes.append(f"PG commits {cell.extra['pg_commit_throughput']:.0f}/s, relay "
                     f"{cell.extra.get('relay_rows_per_txn', 0):.0f} rows/Kafka txn, "
                     f"backlog drained in {cell.extra.get('drain_s', 0):.1f} s")
    if cell.extra.get("lost"):
        notes.append(f"{cell.extra['lost']:.0f} not seen by consumer")
    if cell.errors:
        notes.append(f"{cell.errors} errors")
    return "; ".join(notes)


def table_markdown(cells: Cells) -> str:
    lines = [
        "| path | threads | throughput (ops/s) | x (a) | min-max of runs | p50 (ms) | "
        "p99 (ms) | p99 x (a) | machine CPU busy (of 2) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (path, c), cell in cells.items():
        base = cells.get(("naive", c))
        ratio = f"{cell.throughput / base.throughput:.2f}" if base and base.throughput else "-"
        p99r = f"{cell.p99_ms / base.p99_ms:.2f}" if base and base.p99_ms else "-"
        lines.append(
            f"| {LABELS[path]} | {c} | {cell.throughput:.0f} | {ratio} | "
            f"{cell.tput_min:.0f}-{cell.tput_max:.0f} | {cell.p50_ms:.1f} | {cell.p99_ms:.1f} | "
            f"{p99r} | {cell.machine_cores_busy:.2f} | {_notes(cell)} |")
    return "\n".join(lines)


def cpu_markdown(cells: Cells, concurrency: int) -> str:
    """Cores used by each process during the runs at one concurrency (medians), and
    CPU milliseconds per operation for the processes of this benchmark."""
    lines = ["| path | " + " | ".join(OWN_PROCESSES) + " | all other processes "
             "(other tenants, kernel) |", "|---|" + "---:|" * (len(OWN_PROCESSES) + 1)]
    for (_, c), cell in cells.items():
        if c != concurrency:
            continue
        tp = max(cell.throughput, 1e-9)
        row = []
        for k in OWN_PROCESSES:
            cores = cell.cores_by_process.get(k, 0.0)
            row.append(f"{cores:.2f} ({cores / tp * 1e3:.2f} ms/op)" if cores >= 0.005 else "-")
        other = sum(v for k, v in cell.cores_by_process.items() if k not in OWN_PROCESSES)
        lines.append(f"| {LABELS[cell.path]} | " + " | ".join(row) + f" | {other:.2f} |")
    return "\n".join(lines)


def final_ratios(cells: Cells) -> tuple[int, dict[str, float]]:
    """The concurrency of the ratio line (32, or the highest measured) and group
    commit's throughput over each path of :data:`RATIOS` there (NaN if not measured)."""
    concs = sorted({c for _, c in cells})
    c = 32 if 32 in concs else concs[-1]

    def r(other: str) -> float:
        g, o = cells.get(("group", c)), cells.get((other, c))
        return g.throughput / o.throughput if g and o and o.throughput else float("nan")

    return c, {other: r(other) for other in RATIOS}


def ratio_line(ratios: dict[str, float]) -> str:
    return " ".join(f"twopc_group_vs_{k}={v:.2f}" for k, v in ratios.items())


def plot(cells: Cells, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        say("matplotlib missing (.venv/bin/pip install matplotlib): no plot")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in ALL_PATHS:
        pts = sorted(((c, cell) for (p, c), cell in cells.items() if p == path),
                     key=lambda pc: pc[0])
        if not pts:
            continue
        xs = [c for c, _ in pts]
        ax1.errorbar(xs, [x.throughput for _, x in pts],
                     yerr=[[x.throughput - x.tput_min for _, x in pts],
                           [x.tput_max - x.throughput for _, x in pts]],
                     marker="o", capsize=3, label=LABELS[path])
        ax2.plot(xs, [x.p99_ms for _, x in pts], marker="o", label=LABELS[path])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c for _, c in cells}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrency (threads)")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("throughput (ops/s, median; bars: min-max)")
    ax1.set_title("Throughput: 1 INSERT + one 1 KB message")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("p99 latency")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_mode_report(out_dir: Path, name: str, data: Any, md: str) -> None:
    """``bench-<name>.json`` and ``bench-<name>.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / f"bench-{name}.md").write_text(
        f"# bench --{name}\n\nGenerated by `scripts/bench {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.\n\n{md}\n")
    say(f"written: {out_dir / f'bench-{name}.md'}")
