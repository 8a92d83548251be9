"""One client process of the fault campaign: business operations through a coordinator.

Run by the campaign as ``python -m tests.faults.workload --plan PLAN.json --log LOG.jsonl
--postgres DSN --bootstrap SERVERS --name N --instance I --topic T --table TBL
--decision-topic D [--recover-own] [--driver async]``; after a crash the campaign starts
it again with the same arguments and it carries on where its log says it stopped.

``--driver sync`` (the default) runs the operations through a
:class:`~coordinator.Coordinator` on ``--threads`` threads; ``--driver async`` through an
:class:`~coordinator.AsyncCoordinator` on ``--threads`` asyncio tasks of one event loop
(``tests/faults/aworkload.py``). Everything else -- the operations, retries, hooks and log
records (``tests/faults/client.py``) -- is the same.

Every operation of the plan has a unique op id. An *attempt* inserts the row
``(op_id, attempt)`` into ``--table`` and produces ``--messages-per-op`` messages to
``--topic`` (key = op id, value ``{"op", "n", "attempt"}``), in one coordinated
transaction. Kinds of operation:

``ok``
    nothing special;
``raise``
    the block raises after its writes (the application's own error): told rolled back;
``sql_error``
    a statement fails inside the block and the block catches it, so PREPARE answers
    ROLLBACK: ``RolledBack``, told rolled back;
``oversize``
    message 0 carries ``--oversize-bytes`` of padding, more than the business topic's
    ``max.message.bytes``: the broker refuses it (``MSG_SIZE_TOO_LARGE``) after PREPARE,
    so the coordinator rolls back and drops the slot's producer, which the next
    transaction on that slot creates again (``init_transactions()``). Told rolled back;
    nothing may be visible.

``idem`` operations carry the idempotency key ``op:<op id>`` and are retried by the client,
as a real client would, after every answer that is not final: ``OutcomeUnknown``,
``IdempotencyKeyBusy``, ``RolledBack`` of an ``ok`` operation (e.g. a network cut), and
after the process itself was killed in the middle of the operation. Other operations are
retried only after an answer that guarantees nothing happened (``RolledBack`` of an ``ok``
operation, ``ServiceUnavailable`` at BEGIN); an ``OutcomeUnknown`` or a kill is final for
them ("unknown").

``crash`` names a protocol point (``tests.crash.worker.POINTS``): the process SIGKILLs
itself there during the operation, once; or ``pause:<step>``
(``tests.crash.worker.PAUSE_STEPS``): the process freezes itself there (SIGSTOP) for
``pause_seconds``, once, and carries on. The hooks are those of ``tests/crash/worker.py``,
given through the library's seams: a ``confluent_kafka.Producer`` subclass as
``CoordinatorConfig.producer_factory`` and ``CoordinatorConfig.on_step``; for
``during_commit`` and ``during_pg_commit`` the kill comes from another thread
``kill_delay_us`` after the real call was entered (for ``during_pg_commit``: after the
commit point, right before ``COMMIT PREPARED``), so that both "not yet" and "already
through" happen.

The log: JSON lines written with ``tests.crash.worker.CrashState.emit`` (flushed and fsync-ed
before the next step, so they survive the kill):

* ``start`` (pid, driver), ``recover_own`` (what ``recovery.recover_own`` -- or
  ``arecover_own`` -- resolved at start-up);
* ``attempt`` {op, attempt, key, kind, armed} before an attempt begins;
* ``gid`` {op, attempt, gid} right before ``PREPARE TRANSACTION`` (``Step.BEFORE_PREPARE``,
  so every prepared transaction can be traced to its attempt);
* ``crash`` {op, point, gid, ...} right before a deliberate kill (``tests.crash.worker``);
* ``pause`` {op, step, gid, seconds} right before a deliberate SIGSTOP, ``continued``
  after it;
* ``result`` {op, attempt, told, error, phase, gid}: what this attempt was told --
  ``committed``, ``already_committed`` (an earlier attempt committed), ``pending``
  (``CommittedPendingRecovery``), ``rolled_back``, ``busy`` (key held by another
  attempt: this one did nothing), ``unknown`` (``OutcomeUnknown``), ``error`` (anything
  unexpected), ``killed`` (written after a restart for an attempt the kill interrupted);
* ``op`` {op, told, error, attempts}: the client's final answer for the operation
  (``committed``, ``rolled_back`` or ``unknown``) -- the same record ``tests.crash.checker``
  reads;
* ``kafka_txns`` {pid, sizes}: how many Kafka transactions carried how many decision
  records (more than one: a shared group commit), counted by the producer when a
  transaction reaches its commit or its abort; every 20 transactions and at the end;
* ``end`` when the plan is done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import psycopg
import psycopg.errors

import recovery
from coordinator import Coordinator, CoordinatorConfig, DecisionTopic, GroupCommit
from tests.crash import worker as crash_worker

from . import aworkload
from .client import ClientBase, DeliberateFailure, Schedule
from .hooks import ContextLocal, ThreadState
from .operations import COMMITTED_TOLD, FINAL_TOLD, NOT_APPLIED_TOLD, OpState, resume

__all__ = ["COMMITTED_TOLD", "FINAL_TOLD", "NOT_APPLIED_TOLD", "POINTS", "Client", "main"]

POINTS = tuple(p for p in crash_worker.POINTS if p not in ("none", "stop"))
"""The deterministic crash points, in protocol order."""

log = logging.getLogger("tests.faults.workload")


class Client(ClientBase):
    """Runs the plan's operations through one :class:`~coordinator.Coordinator`, on
    ``--threads`` threads, logging what it is told."""

    def attempt(self, coord: Coordinator, op: OpState) -> str:
        at = self.begin(op)
        tx = coord.transaction(idempotency_key=at.key)
        error: Exception | None = None
        inside = False
        try:
            with tx:
                inside = True
                tx.execute(*at.insert())
                for value in at.messages():
                    tx.produce(self.args.topic, key=op.op, value=value)
                if op.kind == "raise":
                    raise DeliberateFailure(op.op)
                if op.kind == "sql_error":
                    with contextlib.suppress(psycopg.errors.DivisionByZero):
                        tx.execute("SELECT 1 / 0")
                inside = False
        except Exception as exc:
            error = exc
        return self.finish(at, error, inside, tx.gid, tx.status.value)

    def run(self, coord: Coordinator) -> None:
        """The plan's operations on ``--threads`` threads sharing the coordinator."""
        schedules = self.schedules()
        if len(schedules) == 1:
            self.run_ops(coord, schedules[0])
            return
        errors: list[BaseException] = []

        def one(schedule: Schedule) -> None:
            try:
                self.run_ops(coord, schedule)
            except BaseException as exc:  # re-raised below: the process must fail
                errors.append(exc)

        workers = [threading.Thread(target=one, args=(sch,), name=f"client-{i}")
                   for i, sch in enumerate(schedules)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if errors:
            raise errors[0]

    def run_ops(self, coord: Coordinator, schedule: Schedule) -> None:
        """Fresh operations in plan order (interrupted ones first), retries when due."""
        while (step := schedule.next()) is not None:
            op, wait = step
            if wait > 0:
                time.sleep(wait)
            if op is not None:
                self.settle(schedule, op, self.attempt(coord, op))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.faults.workload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="JSON: {\"ops\": [{op, kind, idem, crash, "
                   "kill_delay_us}, ...]}")
    p.add_argument("--log", required=True, help="JSON lines, appended")
    p.add_argument("--postgres", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--decision-topic", required=True)
    p.add_argument("--decision-partitions", type=int, default=3)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--messages-per-op", type=int, default=2)
    p.add_argument("--transaction-timeout-ms", type=int, default=10_000)
    p.add_argument("--oversize-bytes", type=int, default=200_000,
                   help="padding of an oversize operation's message 0")
    p.add_argument("--pace", type=float, default=0.0, help="seconds to wait before each op")
    p.add_argument("--threads", type=int, default=1,
                   help="client threads sharing the coordinator (for group commit)")
    p.add_argument("--group-commit", action="store_true",
                   help="CoordinatorConfig(group_commit=GroupCommit())")
    p.add_argument("--recover-own", action="store_true",
                   help="run recovery.recover_own right after the coordinator opened")
    p.add_argument("--driver", choices=crash_worker.DRIVERS, default="sync",
                   help="sync: Coordinator, --threads threads (default); async: "
                   "AsyncCoordinator, --threads asyncio tasks")
    p.add_argument("--no-clock-check", action="store_true",
                   help="CoordinatorConfig(max_clock_skew_seconds=None): for a client run "
                   "with a skewed clock (the clock-skew fault), which the start-up check "
                   "would refuse")
    return p


def _config(args: argparse.Namespace, client: ClientBase) -> CoordinatorConfig:
    config = CoordinatorConfig(
        decision_topic=DecisionTopic(name=args.decision_topic,
                                     partitions=args.decision_partitions),
        producers=args.producers,
        transaction_timeout_ms=args.transaction_timeout_ms,
        kafka_timeout=10.0,
        startup_timeout=20.0,
        producer_factory=client.producer_factory,
        on_step=client.on_step,
        connection_timeout=10.0,
        pool_max_size=max(4, 2 * args.threads),
        idempotency_wait_ms=1000,
        group_commit=GroupCommit() if args.group_commit else None,
    )
    if args.no_clock_check:
        config = dataclasses.replace(config, max_clock_skew_seconds=None)
    return config


RECOVER_OWN = recovery.RecoveryConfig(kafka_timeout=10.0, lso_wait_seconds=15.0,
                                      lock_wait_seconds=10.0)
"""How the clients run ``recover_own`` at start-up (``--recover-own``)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.instance} %(levelname)s %(name)s "
                        "%(message)s")
    plan = json.loads(Path(args.plan).read_text(encoding="utf-8"))["ops"]
    log_path = Path(args.log)
    out = log_path.open("a", encoding="utf-8")
    if log_path.stat().st_size and not log_path.read_bytes().endswith(b"\n"):
        out.write("\n")  # a line torn by the kill stays alone (and is skipped)
    if args.driver == "async":
        # Per task: the asyncio driver runs the hooks in its worker threads.
        state = ThreadState(out, "none", "", local=ContextLocal())
        ops = resume(log_path, plan, state.emit)
        aclient = aworkload.AsyncClient(args, state, ops, local=ContextLocal())
        aworkload.run(aclient, _config(args, aclient), out, RECOVER_OWN)  # never returns
    state = ThreadState(out, "none", "")
    ops = resume(log_path, plan, state.emit)
    client = Client(args, state, ops)
    _run_sync(client, _config(args, client), out)
    return 0


def _run_sync(client: Client, config: CoordinatorConfig, out: TextIO) -> None:
    args, state = client.args, client.state
    kafka = {"bootstrap.servers": args.bootstrap}
    coord = Coordinator(args.postgres, kafka, args.name, instance=args.instance, config=config)
    coord.open()  # fails (non-zero exit) while a service is down: the campaign retries
    state.emit(event="start", pid=os.getpid(), instance=args.instance, todo=len(client.ops),
               transactional_ids=coord.transactional_ids, driver="sync", t=time.time())
    if args.recover_own:
        try:
            report = recovery.recover_own(coord, kafka, RECOVER_OWN)
            state.emit(event="recover_own", committed=report.committed,
                       rolled_back=report.rolled_back, skipped=report.skipped,
                       remaining=[r.gid for r in report.remaining], t=time.time())
        except Exception as exc:  # recovery is best effort here; the campaign's runs follow
            state.emit(event="recover_own_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    client.run(coord)
    client.report_kafka_sizes()
    state.emit(event="end", t=time.time())
    out.close()
    closer = threading.Thread(target=coord.close, daemon=True)
    closer.start()
    closer.join(15)
    os._exit(0)  # no interpreter shutdown: librdkafka threads may linger after a fault


if __name__ == "__main__":
    sys.exit(main())
