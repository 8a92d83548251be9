"""The closed loop: ``concurrency`` threads each issuing operations back to back; an
operation counts when it completes inside the measured window (after the warm-up)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .cpu import CpuMeter, ProcessCpu, cpu_delta
from .env import say
from .paths import Op, Workload

__all__ = ["RunResult", "measure", "percentile", "run_closed_loop", "summarize"]


@dataclass
class RunResult:
    path: str
    concurrency: int
    run: int
    throughput: float
    p50_ms: float
    p99_ms: float
    completed: int
    errors: int
    machine_cores_busy: float
    bench_process_cores: float
    extra: dict[str, float] = field(default_factory=dict)
    cores_by_process: dict[str, float] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


_op_counter = itertools.count()


def run_closed_loop(
    op: Callable[[str], None], concurrency: int, warmup: float, duration: float, tag: str,
    first_error: list[BaseException],
) -> tuple[list[Op], int, float, float]:
    """Run ``op`` from ``concurrency`` threads; return (op_id, start, end) of every
    operation, the error count, and the measurement window."""
    records: list[list[Op]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)
    window: list[float] = []

    def worker(i: int) -> None:
        out = records[i]
        barrier.wait()
        end = window[1]
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            op_id = f"{tag}{next(_op_counter)}"
            try:
                op(op_id)
            except Exception as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(exc)
                time.sleep(0.01)
                continue
            out.append((op_id, t0, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(i,), name=f"w{i}", daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    start = time.monotonic()
    window[:] = [start + warmup, start + warmup + duration]
    barrier.wait()
    for t in threads:
        t.join()
    return [r for rs in records for r in rs], sum(errors), window[0], window[1]


def summarize(path: str, concurrency: int, run: int, ops: Sequence[Op], errors: int,
              w0: float, w1: float, cpu: tuple[float, float],
              extra: dict[str, float] | None = None) -> RunResult:
    inside = sorted(end - start for _, start, end in ops if w0 <= end <= w1)
    dur = w1 - w0
    return RunResult(
        path=path, concurrency=concurrency, run=run,
        throughput=len(inside) / dur,
        p50_ms=percentile(inside, 0.50) * 1e3, p99_ms=percentile(inside, 0.99) * 1e3,
        completed=len(inside), errors=errors,
        machine_cores_busy=cpu[0], bench_process_cores=cpu[1], extra=extra or {},
    )


def measure(path: Workload, concurrency: int, run: int, warmup: float, duration: float,
            procs: ProcessCpu) -> RunResult:
    """One measurement of ``path``: warm-up, then ``duration`` seconds measured, with the
    CPU used by every process meanwhile."""
    first_error: list[BaseException] = []
    tag = f"{path.name[0]}{concurrency}r{run}-"
    path.begin_measure()
    procs0 = procs.snapshot()
    meter = CpuMeter()
    ops, errors, w0, w1 = run_closed_loop(path.op, concurrency, warmup, duration, tag,
                                          first_error)
    cpu = meter.read()
    elapsed = time.monotonic() - meter.t0
    by_proc = {k: v / elapsed for k, v in cpu_delta(procs0, procs.snapshot())}
    ops, extra = path.end_measure(ops, w0, w1, warmup)
    result = summarize(path.name, concurrency, run, ops, errors, w0, w1, cpu, extra)
    result.cores_by_process = by_proc
    if first_error:
        say(f"  ! {path.name} c={concurrency}: {errors} errors, first: {first_error[0]!r}")
    return result
