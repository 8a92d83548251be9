"""The report of the ``--consume`` mode: the table, the ratios of (e) to (f) and (g)
at each batch size, where each path's time goes, the CPU by process, the ratio line."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .consume_paths import CONSUME_LABELS
from .loop import RunResult
from .report import Cell, Cells

__all__ = ["TARGET", "consume_ratios", "markdown", "ratio_line"]

TARGET = 0.8
"""(e) >= 0.8x (f) at batch sizes >= 100."""
TARGET_MIN_BATCH = 100
_PROCS = ("bench process", "kafka broker", "postgres")


def _ratio(cells: Cells, a: str, b: str, batch: int) -> float:
    x, y = cells.get((a, batch)), cells.get((b, batch))
    return x.throughput / y.throughput if x and y and y.throughput else float("nan")


def consume_ratios(cells: Cells) -> tuple[int, dict[str, float]]:
    """The largest batch size measured and (e)'s messages/s over (f)'s and (g)'s there."""
    batch = max(b for _, b in cells)
    return batch, {"at_least_once": _ratio(cells, "exactly_once", "at_least_once", batch),
                   "idempotent": _ratio(cells, "exactly_once", "idempotent", batch)}


def ratio_line(ratios: dict[str, float]) -> str:
    return " ".join(f"consume_exactly_once_vs_{k}={v:.2f}" for k, v in ratios.items())


def _notes(cell: Cell) -> str:
    notes = []
    if cell.extra.get("check_failed"):
        notes.append("rows / offsets check FAILED")
    if cell.extra.get("input_exhausted"):
        notes.append("input ran out")
    if cell.errors:
        notes.append(f"{cell.errors} errors")
    return "; ".join(notes)


def _table(cells: Cells) -> list[str]:
    lines = [
        "| path | batch | messages/s | x (f) | min-max of runs | batches/s | batch p50 (ms) | "
        "batch p99 (ms) | machine CPU busy | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (path, b), c in cells.items():
        r = _ratio(cells, path, "at_least_once", b)
        lines.append(
            f"| {CONSUME_LABELS[path]} | {b} | {c.throughput:.0f} | "
            f"{'-' if math.isnan(r) else f'{r:.2f}'} | {c.tput_min:.0f}-{c.tput_max:.0f} | "
            f"{c.extra.get('batches_per_s', 0):.0f} | {c.p50_ms:.1f} | {c.p99_ms:.1f} | "
            f"{c.machine_cores_busy:.2f} | {_notes(c)} |")
    return lines


def _paired(results: Sequence[RunResult], other: str, batch: int) -> str:
    """(e)'s messages/s over ``other``'s in the same run (the two measured next to each
    other): min, median, max over the runs."""
    by = {(r.path, r.run): r.throughput for r in results if r.concurrency == batch}
    rs = sorted(by[("exactly_once", i)] / by[(other, i)] for p, i in by
                if p == "exactly_once" and by.get((other, i)))
    if not rs:
        return "-"
    return f"{rs[0]:.2f} / {statistics.median(rs):.2f} / {rs[-1]:.2f}"


def _ratios_table(cells: Cells, results: Sequence[RunResult]) -> list[str]:
    lines = ["| batch | (e) / (f), medians | (e) / (f) run by run: min / median / max | "
             "(e) / (g), medians | (e) / (g) run by run | target (e) >= 0.8x (f) |",
             "|---:|---:|---:|---:|---:|---|"]
    for b in sorted({b for _, b in cells}):
        ef = _ratio(cells, "exactly_once", "at_least_once", b)
        eg = _ratio(cells, "exactly_once", "idempotent", b)
        met = ("-" if b < TARGET_MIN_BATCH or math.isnan(ef)
               else "met" if ef >= TARGET else "**missed**")
        lines.append(f"| {b} | {ef:.2f} | {_paired(results, 'at_least_once', b)} | "
                     f"{eg:.2f} | {_paired(results, 'idempotent', b)} | {met} |")
    return lines


def _phases_table(cells: Cells) -> list[str]:
    lines = ["| path | batch | ms per batch | where the time goes: ms per batch (share) |",
             "|---|---:|---:|---|"]
    for (path, b), c in cells.items():
        phases = {k.removeprefix("phase:"): v for k, v in c.extra.items()
                  if k.startswith("phase:")}
        total = sum(phases.values())
        parts = ", ".join(f"{k} {v:.2f} ({v / total:.0%})" for k, v in
                          sorted(phases.items(), key=lambda kv: -kv[1]) if total)
        lines.append(f"| {CONSUME_LABELS[path]} | {b} | {total:.2f} | {parts} |")
    return lines


def _cpu_table(cells: Cells) -> list[str]:
    lines = ["| path | batch | " + " | ".join(_PROCS) + " | other processes |",
             "|---|---:|" + "---:|" * (len(_PROCS) + 1)]
    for (path, b), c in cells.items():
        tp = max(c.throughput, 1e-9)
        row = []
        for k in _PROCS:
            cores = c.cores_by_process.get(k, 0.0)
            row.append(f"{cores:.2f} ({cores / tp * 1e6:.0f} us/msg)")
        other = sum(v for k, v in c.cores_by_process.items() if k not in _PROCS)
        lines.append(f"| {CONSUME_LABELS[path]} | {b} | " + " | ".join(row)
                     + f" | {other:.2f} |")
    return lines


def markdown(cells: Cells, results: Sequence[RunResult], settings: dict[str, Any],
             notes: dict[str, Any], at: int, ratios: dict[str, float], cores: int) -> str:
    s = settings
    md = [
        f"In {s['elapsed_s']:.0f} s. Each figure is the median of {s['runs']} interleaved "
        f"runs of {s['duration_s']} s after {s['warmup_s']} s of warm-up, each run with a "
        f"new consumer group reading a {s['topic_partitions']}-partition input topic of "
        f"{s['input_messages']} 1 KB messages from its start; one stage thread, one "
        "consumer; one row and one 1 KB output message per input message. A batch counts "
        "when it is finished (offsets committed, and for (e) COMMIT PREPARED done) inside "
        "the measured window; batch latency is from its consume() call to that point.",
        "",
        *_table(cells),
        "",
        *_ratios_table(cells, results),
        "",
        f"At batch {at}: (e) / (f) = {ratios['at_least_once']:.2f}, (e) / (g) = "
        f"{ratios['idempotent']:.2f}.",
        "",
        "Where each path's time goes (wall time between the steps of one batch, summed over "
        "the measurement including warm-up, per batch; for (e) measured through "
        "`on_step`, `producer_factory` and the consumer passed to `run_consumer`):",
        "",
        *_phases_table(cells),
        "",
        f"CPU cores used by each process during the runs (median; the machine has {cores} "
        "cores; other processes on the shared machine count in the last column), and CPU "
        "microseconds per message:",
        "",
        *_cpu_table(cells),
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in notes.items())
        + f"; load average at the end {tuple(round(x, 2) for x in s['loadavg_at_end'])}.",
    ]
    return "\n".join(md)
