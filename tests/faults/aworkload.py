"""The fault campaign's client process with the asyncio driver (``python -m
tests.faults.workload --driver async``, ``scripts/faults --driver async``).

The same plan, operations, attempts, retries, hooks and log records as the synchronous
client (``tests/faults/workload.py``, shared in ``tests/faults/client.py``), run through an
:class:`~coordinator.AsyncCoordinator` on one event loop: ``--threads`` asyncio tasks share
the coordinator (with ``--group-commit`` their transactions share Kafka transactions), and
``recovery.arecover_own`` runs at start-up with ``--recover-own``.

The crash points and pauses fire in the asyncio driver's worker threads (the step hook,
the producer's calls), which run with the calling task's context: the per-operation state
lives in :class:`~tests.faults.hooks.ContextLocal` objects, bound per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import traceback
from typing import NoReturn, TextIO

import psycopg.errors

import recovery
from coordinator import AsyncCoordinator, CoordinatorConfig

from .client import ClientBase, DeliberateFailure, Schedule
from .operations import OpState

__all__ = ["AsyncClient", "run"]

CLOSE_SECONDS = 15.0
"""How long the client waits for its coordinator to close at the end."""


class AsyncClient(ClientBase):
    """Runs the plan's operations through one :class:`~coordinator.AsyncCoordinator`, on
    ``--threads`` asyncio tasks, logging what it is told."""

    async def attempt(self, coord: AsyncCoordinator, op: OpState) -> str:
        at = self.begin(op)
        tx = coord.transaction(idempotency_key=at.key)
        error: Exception | None = None
        inside = False
        try:
            async with tx:
                inside = True
                await tx.execute(*at.insert())
                for value in at.messages():
                    tx.produce(self.args.topic, key=op.op, value=value)
                if op.kind == "raise":
                    raise DeliberateFailure(op.op)
                if op.kind == "sql_error":
                    with contextlib.suppress(psycopg.errors.DivisionByZero):
                        await tx.execute("SELECT 1 / 0")
                inside = False
        except Exception as exc:
            error = exc
        return self.finish(at, error, inside, tx.gid, tx.status.value)

    async def run(self, coord: AsyncCoordinator) -> None:
        """The plan's operations on ``--threads`` tasks sharing the coordinator; the first
        error of a task is raised (the process must fail)."""
        tasks = [asyncio.create_task(self.run_ops(coord, sch), name=f"client-{i}")
                 for i, sch in enumerate(self.schedules())]
        await asyncio.gather(*tasks)

    async def run_ops(self, coord: AsyncCoordinator, schedule: Schedule) -> None:
        """Fresh operations in plan order (interrupted ones first), retries when due."""
        self.bind()  # this task's own operation state
        while (step := schedule.next()) is not None:
            op, wait = step
            if wait > 0:
                await asyncio.sleep(wait)
            if op is not None:
                self.settle(schedule, op, await self.attempt(coord, op))


async def _main(client: AsyncClient, config: CoordinatorConfig, out: TextIO,
                own: recovery.RecoveryConfig) -> None:
    args, state = client.args, client.state
    kafka = {"bootstrap.servers": args.bootstrap}
    coord = AsyncCoordinator(args.postgres, kafka, args.name, instance=args.instance,
                             config=config)
    await coord.open()  # fails (non-zero exit) while a service is down: the campaign retries
    state.emit(event="start", pid=os.getpid(), instance=args.instance, todo=len(client.ops),
               transactional_ids=coord.transactional_ids, driver="async", t=time.time())
    if args.recover_own:
        try:
            report = await recovery.arecover_own(coord, kafka, own)
            state.emit(event="recover_own", committed=report.committed,
                       rolled_back=report.rolled_back, skipped=report.skipped,
                       remaining=[r.gid for r in report.remaining], t=time.time())
        except Exception as exc:  # recovery is best effort here; the campaign's runs follow
            state.emit(event="recover_own_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    await client.run(coord)
    client.report_kafka_sizes()
    state.emit(event="end", t=time.time())
    out.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(coord.close(), CLOSE_SECONDS)


def run(client: AsyncClient, config: CoordinatorConfig, out: TextIO,
        own: recovery.RecoveryConfig) -> NoReturn:
    """Run the client's plan on a new event loop, then end the process at once: no
    interpreter shutdown, no wait for worker threads (librdkafka's or a Kafka call's may
    linger after a fault). An error ends it with a traceback and exit status 1."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_main(client, config, out, own))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
