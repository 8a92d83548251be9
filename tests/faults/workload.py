"""One client process of the fault campaign: business operations through a coordinator.

Run by the campaign as ``python -m tests.faults.workload --plan PLAN.json --log LOG.jsonl
--postgres DSN --bootstrap SERVERS --name N --instance I --topic T --table TBL
--decision-topic D [--recover-own]``; after a crash the campaign starts it again with
the same arguments and it carries on where its log says it stopped.

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

* ``start`` (pid), ``recover_own`` (what ``recovery.recover_own`` resolved at start-up);
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
import collections
import contextlib
import dataclasses
import heapq
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

import recovery
from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    Coordinator,
    CoordinatorConfig,
    DecisionTopic,
    Error,
    GroupCommit,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    RolledBack,
    ServiceUnavailable,
    Step,
)
from tests.crash import worker as crash_worker

from .hooks import CountingProducer, ThreadState
from .operations import (
    COMMITTED_TOLD,
    FINAL_TOLD,
    NOT_APPLIED_TOLD,
    RETRY_AFTER,
    OpState,
    resume,
)

__all__ = ["COMMITTED_TOLD", "FINAL_TOLD", "NOT_APPLIED_TOLD", "POINTS", "main"]

POINTS = tuple(p for p in crash_worker.POINTS if p not in ("none", "stop"))
"""The deterministic crash points, in protocol order."""

log = logging.getLogger("tests.faults.workload")


class DeliberateFailure(Exception):
    """The application's own error inside the block (kind ``raise``)."""


class Client:
    """Runs the plan's operations through one coordinator, logging what it is told."""

    def __init__(self, args: argparse.Namespace, state: crash_worker.CrashState,
                 ops: list[OpState]) -> None:
        self.args = args
        self.state = state
        self.ops = ops
        self._local = threading.local()
        self.kafka_sizes: dict[int, int] = {}
        self._sizes_lock = threading.Lock()

    @property
    def current(self) -> tuple[str, int] | None:
        """The attempt this thread runs: (op id, attempt number)."""
        value: tuple[str, int] | None = getattr(self._local, "current", None)
        return value

    @current.setter
    def current(self, value: tuple[str, int] | None) -> None:
        self._local.current = value

    # -- hooks -----------------------------------------------------------------

    def on_step(self, step: Step, gid: str | None) -> None:
        """``CoordinatorConfig.on_step``: the crash hooks of ``tests/crash/worker.py``, plus
        a record of every gid right before its PREPARE (so that recovery's work can be
        traced to attempts)."""
        if step is Step.BEFORE_PREPARE and self.current is not None:
            op, attempt = self.current
            self.state.emit(event="gid", op=op, attempt=attempt, gid=gid)
        self.state.on_step(step, gid)

    def producer_factory(self, conf: dict[str, Any]) -> CountingProducer:
        """``CoordinatorConfig.producer_factory``: producers with the crash hooks of
        ``tests/crash/worker.py`` that count the decision records per Kafka transaction."""
        producer = crash_worker.crashing_producers(self.state, CountingProducer)(conf)
        assert isinstance(producer, CountingProducer)
        producer.on_transaction = self.count_kafka_transaction
        producer.decision_topic = str(self.args.decision_topic)
        return producer

    def count_kafka_transaction(self, members: int) -> None:
        with self._sizes_lock:
            self.kafka_sizes[members] = self.kafka_sizes.get(members, 0) + 1
            due = sum(self.kafka_sizes.values()) % 20 == 0
        if due:
            self.report_kafka_sizes()

    def report_kafka_sizes(self) -> None:
        with self._sizes_lock:
            sizes = dict(self.kafka_sizes)
        self.state.emit(event="kafka_txns", pid=os.getpid(), sizes=sizes)

    # -- operations ------------------------------------------------------------

    def attempt(self, coord: Coordinator, op: OpState) -> str:
        args = self.args
        number = len(op.attempts) + 1
        armed = op.spec.get("crash") if not op.crashed else None
        st = self.state
        st.op, st.gid = op.op, None
        st.crash_op = op.op
        st.point = armed or "none"
        st.kill_delay_us = int(op.spec.get("kill_delay_us") or 0)
        st.pause_seconds = float(op.spec.get("pause_seconds") or 0.0)
        self.current = (op.op, number)
        key = f"op:{op.op}" if op.idem else None
        st.emit(event="attempt", op=op.op, attempt=number, key=key, kind=op.kind, armed=armed,
                t=time.time())
        if op.first_at is None:
            op.first_at = time.monotonic()
        tx = coord.transaction(idempotency_key=key)
        told: str = "committed"
        error: BaseException | None = None
        phase: Any = None
        inside = False
        try:
            with tx:
                inside = True
                tx.execute(sql.SQL("INSERT INTO {} (op_id, attempt, instance) VALUES "
                                   "(%s, %s, %s)").format(sql.Identifier(args.table)),
                           (op.op, number, args.instance))
                for n in range(args.messages_per_op):
                    body: dict[str, Any] = {"op": op.op, "n": n, "attempt": number}
                    if op.kind == "oversize" and n == 0:
                        body["pad"] = "x" * int(args.oversize_bytes)
                    tx.produce(args.topic, key=op.op, value=json.dumps(body, sort_keys=True))
                if op.kind == "raise":
                    raise DeliberateFailure(op.op)
                if op.kind == "sql_error":
                    with contextlib.suppress(psycopg.errors.DivisionByZero):
                        tx.execute("SELECT 1 / 0")
                inside = False
        except AlreadyCommitted as exc:
            told, error, phase = "already_committed", exc, exc.phase
        except CommittedPendingRecovery as exc:
            told, error, phase = "pending", exc, exc.phase
        except OutcomeUnknown as exc:
            told, error, phase = "unknown", exc, exc.phase
        except IdempotencyKeyBusy as exc:
            told, error, phase = "busy", exc, exc.phase
        except (RolledBack, ServiceUnavailable) as exc:
            # ServiceUnavailable comes from BEGIN only: nothing was done.
            told, error, phase = "rolled_back", exc, exc.phase
        except Error as exc:
            told, error, phase = "error", exc, exc.phase
        except Exception as exc:
            # Raised inside the block (ours, or the driver's): the coordinator rolled back.
            told, error = ("rolled_back" if inside else "error"), exc
        self.current = None
        if armed is not None and armed.startswith("pause:") and st.point == "none":
            op.crashed = True  # the pause happened (once per operation)
        st.emit(event="result", op=op.op, attempt=number, told=told,
                error=None if error is None else type(error).__name__,
                detail=None if error is None else str(error)[:300],
                phase=None if phase is None else str(phase.value),
                gid=tx.gid, status=tx.status.value, t=time.time())
        return told

    def run(self, coord: Coordinator) -> None:
        """The plan's operations on ``--threads`` threads sharing the coordinator."""
        threads = max(1, int(self.args.threads))
        if threads == 1:
            self.run_ops(coord, self.ops)
            return
        errors: list[BaseException] = []

        def one(ops: list[OpState]) -> None:
            try:
                self.run_ops(coord, ops)
            except BaseException as exc:  # re-raised below: the process must fail
                errors.append(exc)

        workers = [threading.Thread(target=one, args=(self.ops[i::threads],),
                                    name=f"client-{i}") for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if errors:
            raise errors[0]

    def run_ops(self, coord: Coordinator, ops: list[OpState]) -> None:
        """Fresh operations in plan order (interrupted ones first), retries when due."""
        pace = float(self.args.pace)
        fresh = collections.deque(sorted(ops, key=lambda o: 0 if o.attempts else 1))
        deferred: list[tuple[float, int, OpState]] = []
        seq = 0
        while fresh or deferred:
            now = time.monotonic()
            if deferred and deferred[0][0] <= now:
                op = heapq.heappop(deferred)[2]
            elif fresh:
                op = fresh.popleft()
                if pace > 0 and not op.attempts:
                    if int(self.args.threads) > 1:
                        # Every thread starts on the same tick, so that their transactions
                        # reach the commit together (group commit batches them).
                        time.sleep(pace - time.monotonic() % pace)
                    else:
                        time.sleep(pace)
            else:
                time.sleep(min(deferred[0][0] - now, 0.5))
                continue
            told = self.attempt(coord, op)
            op.attempts.append(told)
            final = op.final()
            if final is not None:
                self._final(op, final)
                continue
            seq += 1
            heapq.heappush(deferred, (time.monotonic() + RETRY_AFTER.get(told, 1.0), seq, op))

    def _final(self, op: OpState, told: str) -> None:
        self.state.emit(event="op", op=op.op, told=told, attempts=len(op.attempts),
                        error=None if told == "committed" else op.attempts[-1])


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
    p.add_argument("--no-clock-check", action="store_true",
                   help="CoordinatorConfig(max_clock_skew_seconds=None): for a client run "
                   "with a skewed clock (the clock-skew fault), which the start-up check "
                   "would refuse")
    return p


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
    state = ThreadState(out, "none", "")
    ops = resume(log_path, plan, state.emit)
    client = Client(args, state, ops)
    kafka = {"bootstrap.servers": args.bootstrap}
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
    coord = Coordinator(args.postgres, kafka, args.name, instance=args.instance, config=config)
    coord.open()  # fails (non-zero exit) while a service is down: the campaign retries
    state.emit(event="start", pid=os.getpid(), instance=args.instance, todo=len(ops),
               transactional_ids=coord.transactional_ids, t=time.time())
    if args.recover_own:
        try:
            report = recovery.recover_own(coord, kafka, recovery.RecoveryConfig(
                kafka_timeout=10.0, lso_wait_seconds=15.0, lock_wait_seconds=10.0))
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
