"""The closed loop on an event loop: ``concurrency`` asyncio tasks each issuing
operations back to back; an operation counts when it completes inside the measured
window (after the warm-up), as in ``loop.py``. While it runs, a probe task measures the
event loop's lag (how late a 5 ms sleep wakes up): a loop kept busy by the bench's own
Python code shows here before anywhere else."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable

from .aio_paths import AsyncWorkload
from .cpu import CpuMeter, ProcessCpu, cpu_delta
from .env import say
from .loop import RunResult, percentile, summarize
from .paths import Op

__all__ = ["ameasure", "run_task_loop"]

_op_counter = itertools.count()
_PROBE_S = 0.005


async def run_task_loop(
    op: Callable[[str], Awaitable[None]], concurrency: int, warmup: float, duration: float,
    tag: str, first_error: list[BaseException],
) -> tuple[list[Op], int, float, float]:
    """Run ``op`` from ``concurrency`` tasks; return (op_id, start, end) of every
    operation, the error count, and the measurement window."""
    records: list[list[Op]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = time.monotonic()
    w0, w1 = start + warmup, start + warmup + duration

    async def worker(i: int) -> None:
        out = records[i]
        while True:
            t0 = time.monotonic()
            if t0 >= w1:
                return
            op_id = f"{tag}{next(_op_counter)}"
            try:
                await op(op_id)
            except Exception as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(exc)
                await asyncio.sleep(0.01)
                continue
            out.append((op_id, t0, time.monotonic()))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return [r for rs in records for r in rs], sum(errors), w0, w1


async def _probe_lag(lags: list[float]) -> None:
    """Append how late each ``_PROBE_S`` sleep woke up, until cancelled."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(_PROBE_S)
        lags.append(max(0.0, time.monotonic() - t0 - _PROBE_S))


async def ameasure(path: AsyncWorkload, concurrency: int, run: int, warmup: float,
                   duration: float, procs: ProcessCpu) -> RunResult:
    """One measurement of ``path``: warm-up, then ``duration`` seconds measured, with the
    CPU used by every process meanwhile and the event loop's lag."""
    first_error: list[BaseException] = []
    tag = f"a{path.name[6]}{concurrency}r{run}-"
    path.begin_measure()
    procs0 = procs.snapshot()
    meter = CpuMeter()
    lags: list[float] = []
    probe = asyncio.create_task(_probe_lag(lags))
    try:
        ops, errors, w0, w1 = await run_task_loop(path.op, concurrency, warmup, duration,
                                                  tag, first_error)
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    cpu = meter.read()
    elapsed = time.monotonic() - meter.t0
    by_proc = {k: v / elapsed for k, v in cpu_delta(procs0, procs.snapshot())}
    extra = path.end_measure(ops, w0, w1, warmup)
    lags.sort()
    extra["loop_lag_p50_ms"] = percentile(lags, 0.50) * 1e3
    extra["loop_lag_p99_ms"] = percentile(lags, 0.99) * 1e3
    result = summarize(path.name, concurrency, run, ops, errors, w0, w1, cpu, extra)
    result.cores_by_process = by_proc
    if first_error:
        say(f"  ! {path.name} c={concurrency}: {errors} errors, first: {first_error[0]!r}")
    return result
