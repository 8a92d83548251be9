"""A coordinator process that kills itself at a chosen point of the two-phase protocol.

Run as ``python -m tests.crash.worker --postgres DSN --bootstrap HOST:PORT --name N
--instance I --topic T --table TBL --ops N --crash-at POINT --op-prefix P [...]``.

Operation ``k`` (``op_id = f"{prefix}-{k}"``) inserts the row ``(op_id)`` into ``--table``
and produces ``--messages-per-op`` messages to ``--topic`` with key ``op_id`` and value
``{"op": op_id, "n": i}``, in one coordinated transaction. At operation ``--crash-op``
(default: the last one) the process sends itself SIGKILL at ``--crash-at``:

``before_prepare``
    the block ran (row inserted, messages staged); ``PREPARE TRANSACTION`` not sent.
``after_prepare``
    PostgreSQL prepared, the Kafka transaction is open with every message (and the
    decision record) produced and flushed; ``commit_transaction()`` not called.
``during_commit``
    a thread sends SIGKILL while ``commit_transaction()`` is executing: the thread is
    started and waits until the worker is about to enter the real call (which releases
    the GIL), then kills (after ``--kill-delay-us`` of busy waiting, default 0). The
    commit may or may not get through.
``after_commit``
    ``commit_transaction()`` returned (the commit point passed); ``COMMIT PREPARED``
    not sent.
``during_pg_commit``
    a thread sends SIGKILL while ``COMMIT PREPARED`` is executing: it is started at
    ``Step.AFTER_KAFKA_COMMIT`` (the commit point passed; the next thing the transaction
    does is ``COMMIT PREPARED``) and kills after ``--kill-delay-us`` of busy waiting.
    ``COMMIT PREPARED`` may or may not get through.
``stop``
    (also ``--sigstop-before-commit``) the process sends itself SIGSTOP right before
    ``commit_transaction()``: a zombie. Whoever sends SIGCONT lets it try to commit.
``none``
    no crash.

``--driver async`` runs the same operations with :class:`~coordinator.AsyncCoordinator`
on an event loop, each operation an asyncio task (``--driver sync``, the default:
:class:`~coordinator.Coordinator`). The crash points and pauses are the same hooks: the
asyncio driver calls ``on_step`` and the producer's methods in its worker threads, so a
SIGKILL or SIGSTOP sent there stops the whole process at the same protocol step.

Pauses (``PAUSE_STEPS``, armed as ``pause:<step>`` by the fault campaign's workload,
``tests/faults/workload.py``) freeze the process instead of killing it: it records a ``pause``
event, starts a detached waker (``sleep N; kill -CONT <pid>``, its own session, so it
outlives a kill of the worker) and sends itself SIGSTOP; once continued it records
``continued`` and carries on. Steps: ``before_prepare`` (before ``PREPARE
TRANSACTION``), ``after_prepare`` (``PREPARE`` returned, before any Kafka work of the
operation), ``init_producer`` (inside ``init_transactions()`` of a producer being
created), ``before_commit`` (``commit_transaction()`` entered), ``after_commit`` (it
returned), ``before_pg_commit`` (the commit point passed, ``COMMIT PREPARED`` not sent).

The crash points are reached through the library's seams (no sleeps, no patching): a
``confluent_kafka.Producer`` subclass given as ``CoordinatorConfig.producer_factory``
(:class:`CrashingProducer`: the Kafka points) and :meth:`CrashState.on_step` given as
``CoordinatorConfig.on_step`` (``Step.BEFORE_PREPARE``: ``before_prepare``;
``Step.AFTER_PREPARE``: the ``after_prepare`` pause; ``Step.AFTER_KAFKA_COMMIT``:
``during_pg_commit`` and the ``before_pg_commit`` pause).

The worker writes one JSON line per event to ``--out`` (default stdout), each flushed
and fsync-ed before the next step, so they survive the SIGKILL:

* ``{"event": "start", "pid", "name", "instance", "transactional_ids", "driver", ...}``
* ``{"event": "crash", "op", "point", "gid", "kafka_flushed", "thread", "flushed": true}``
  right before the kill (or the SIGSTOP); ``kafka_flushed`` says whether the op's messages
  had been flushed to the brokers (they are, from ``after_prepare`` on); ``thread`` is the
  name of the thread the hook ran in (``MainThread`` with the sync driver, one of the
  coordinator's worker threads with the async one);
* ``{"event": "op", "op", "told", "error", "status", "gid", "flushed": true}`` once the
  coordinator answered: ``told`` is ``committed``, ``rolled_back``, ``unknown``
  (:class:`~coordinator.OutcomeUnknown`), ``committed_pending_recovery`` or ``error``;
  ``error`` is the exception class name (``null`` on success);
* ``{"event": "end"}`` when every op is done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from confluent_kafka import Producer
from psycopg import sql

from coordinator import (
    AsyncCoordinator,
    CommittedPendingRecovery,
    Coordinator,
    CoordinatorConfig,
    DecisionTopic,
    OutcomeUnknown,
    RolledBack,
    Step,
)

POINTS = ("none", "before_prepare", "after_prepare", "during_commit", "after_commit",
          "during_pg_commit", "stop")
PAUSE_STEPS = ("before_prepare", "after_prepare", "init_producer", "before_commit",
               "after_commit", "before_pg_commit")
"""Where an armed ``pause:<step>`` freezes the process (SIGSTOP, woken by SIGCONT)."""

DRIVERS = ("sync", "async")
"""``--driver``: :class:`~coordinator.Coordinator` or :class:`~coordinator.AsyncCoordinator`."""

__all__ = ["DRIVERS", "PAUSE_STEPS", "POINTS", "CrashState", "CrashingProducer",
           "crashing_producers", "main"]


class CrashState:
    """What the hooks need to know: which op is running and where to crash."""

    def __init__(self, out: TextIO, point: str, crash_op: str) -> None:
        self.out = out
        self.point = point
        self.crash_op = crash_op
        self.kill_delay_us = 0
        self.pause_seconds = 0.0
        self.op: str | None = None
        self.gid: str | None = None
        self.lock = threading.Lock()

    def emit(self, **record: Any) -> None:
        record["flushed"] = True
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()
            # A pipe or a terminal cannot be fsync-ed: flushed is all there is.
            with contextlib.suppress(OSError, ValueError):
                os.fsync(self.out.fileno())

    def armed(self, point: str) -> bool:
        return self.point == point and self.op == self.crash_op

    def crash(self, point: str, kafka_flushed: bool) -> None:
        self.emit(event="crash", op=self.op, point=point, gid=self.gid,
                  kafka_flushed=kafka_flushed, pid=os.getpid(),
                  thread=threading.current_thread().name)
        if point == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)  # returns after SIGCONT
            self.emit(event="continued", op=self.op, gid=self.gid)
            return
        _kill_now()

    def pause(self, step: str) -> None:
        """When ``pause:<step>`` is armed for the current op: freeze this process for
        ``pause_seconds`` (SIGSTOP; a detached waker sends SIGCONT), once per arming."""
        if not self.armed(f"pause:{step}"):
            return
        self.point = "none"  # once: the workload sees that the pause happened
        seconds = max(0.05, float(self.pause_seconds))
        pid = os.getpid()
        self.emit(event="pause", op=self.op, step=step, gid=self.gid, pid=pid,
                  seconds=round(seconds, 3), t=time.time())
        # The waker: its own session (a kill of this process's group spares it), and no
        # LD_PRELOAD (a worker under libfaketime must still be woken in real time).
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC")}
        subprocess.Popen(["/bin/sh", "-c", f"sleep {seconds:.3f}; kill -CONT {pid}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, env=env,
                         close_fds=True)
        os.kill(pid, signal.SIGSTOP)  # returns after SIGCONT
        self.emit(event="continued", op=self.op, step=step, gid=self.gid, pid=pid,
                  t=time.time())

    def on_step(self, step: Step, gid: str | None) -> None:
        """``CoordinatorConfig.on_step``: the crash points and pauses at the protocol's steps."""
        if step is Step.BEFORE_PREPARE:
            self.gid = gid
            if self.armed("before_prepare"):
                self.crash("before_prepare", kafka_flushed=False)
            self.pause("before_prepare")
        elif step is Step.AFTER_PREPARE:
            self.pause("after_prepare")
        elif step is Step.AFTER_KAFKA_COMMIT:
            # The next thing the transaction does is COMMIT PREPARED.
            self.pause("before_pg_commit")
            if self.armed("during_pg_commit"):
                self.kill_soon("during_pg_commit", kafka_flushed=True).set()

    # -- the producer's points (CrashingProducer) ---------------------------------------

    def before_kafka_commit(self) -> None:
        """``commit_transaction()`` entered: every message and the decision record are
        produced and flushed."""
        self.pause("before_commit")
        if self.armed("after_prepare"):
            self.crash("after_prepare", kafka_flushed=True)
        elif self.armed("stop"):
            self.crash("stop", kafka_flushed=True)
        elif self.armed("during_commit"):
            self.kill_soon("during_commit", kafka_flushed=True).set()

    def after_kafka_commit(self) -> None:
        """``commit_transaction()`` returned: the commit point passed."""
        if self.armed("after_commit"):
            self.crash("after_commit", kafka_flushed=True)
        self.pause("after_commit")

    def kill_soon(self, point: str, kafka_flushed: bool) -> threading.Event:
        """Record the crash and start a thread that sends SIGKILL once the caller has
        set the returned event (right before it enters the real call), after
        ``kill_delay_us`` microseconds of busy waiting (0: at once)."""
        self.emit(event="crash", op=self.op, point=point, gid=self.gid,
                  kafka_flushed=kafka_flushed, pid=os.getpid(),
                  kill_delay_us=self.kill_delay_us, thread=threading.current_thread().name)
        entered = threading.Event()
        delay = self.kill_delay_us / 1e6

        def killer() -> None:
            entered.wait()
            end = time.perf_counter() + delay
            while time.perf_counter() < end:
                pass
            _kill_now()

        threading.Thread(target=killer, daemon=True).start()
        return entered


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingProducer(Producer):
    """The coordinator's transactional producer, with crash points around the commit
    (those of :attr:`state`; ``None``: a plain producer). Made by
    :func:`crashing_producers`."""

    state: CrashState | None = None

    def init_transactions(self, *args: Any) -> Any:
        if self.state is not None:
            self.state.pause("init_producer")
        return super().init_transactions(*args)

    def commit_transaction(self, *args: Any) -> Any:
        st = self.state
        if st is not None:
            st.before_kafka_commit()
        result = super().commit_transaction(*args)
        if st is not None:
            st.after_kafka_commit()
        return result


def crashing_producers(state: CrashState, cls: type[CrashingProducer] = CrashingProducer
                       ) -> Callable[[dict[str, Any]], CrashingProducer]:
    """A ``CoordinatorConfig.producer_factory`` making ``cls`` producers that serve ``state``."""

    def make(conf: dict[str, Any]) -> CrashingProducer:
        producer = cls(conf)
        producer.state = state
        return producer

    return make


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.crash.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--postgres", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--topic", required=True, help="business topic (must exist)")
    p.add_argument("--table", required=True, help="table (op_id text PRIMARY KEY); created "
                   "when missing")
    p.add_argument("--ops", type=int, default=1)
    p.add_argument("--op-prefix", default="op")
    p.add_argument("--crash-at", choices=POINTS, default="none")
    p.add_argument("--crash-op", type=int, default=None,
                   help="index of the op that crashes (default: the last one)")
    p.add_argument("--sigstop-before-commit", action="store_true",
                   help="same as --crash-at stop")
    p.add_argument("--kill-delay-us", type=int, default=0,
                   help="during_commit / during_pg_commit: busy-wait this long after "
                   "entering the call before the SIGKILL (default 0: at once); lets a "
                   "fault campaign move the kill along the call")
    p.add_argument("--decision-topic", default=DecisionTopic().name)
    p.add_argument("--decision-partitions", type=int, default=3)
    p.add_argument("--producers", type=int, default=1)
    p.add_argument("--messages-per-op", type=int, default=2)
    p.add_argument("--transaction-timeout-ms", type=int, default=10_000)
    p.add_argument("--out", default="-", help="JSON lines file (default: stdout)")
    p.add_argument("--driver", choices=DRIVERS, default="sync",
                   help="sync: Coordinator (default); async: AsyncCoordinator, one asyncio "
                   "task per operation")
    return p


def _told(exc: BaseException | None) -> tuple[str, str | None]:
    """What the client was told, from the exception its transaction raised (``None``:
    none): ``(told, error class name)``."""
    if exc is None:
        return "committed", None
    name = type(exc).__name__
    if isinstance(exc, OutcomeUnknown):
        return "unknown", name
    if isinstance(exc, CommittedPendingRecovery):
        return "committed_pending_recovery", name
    if isinstance(exc, RolledBack):
        return "rolled_back", name
    return "error", name


def _insert(args: argparse.Namespace) -> sql.Composed:
    return sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(sql.Identifier(args.table))


def _bodies(args: argparse.Namespace, op_id: str) -> list[str]:
    return [json.dumps({"op": op_id, "n": n}, sort_keys=True)
            for n in range(args.messages_per_op)]


def _run_op(coord: Coordinator, state: CrashState, args: argparse.Namespace, op_id: str) -> None:
    state.op, state.gid = op_id, None
    tx = coord.transaction()
    error: Exception | None = None
    try:
        with tx:
            tx.execute(_insert(args), (op_id,))
            for body in _bodies(args, op_id):
                tx.produce(args.topic, key=op_id, value=body)
    except Exception as exc:
        error = exc
    answer, name = _told(error)
    state.emit(event="op", op=op_id, told=answer, error=name, status=tx.status.value,
               gid=tx.gid)


async def _arun_op(coord: AsyncCoordinator, state: CrashState, args: argparse.Namespace,
                   op_id: str) -> None:
    state.op, state.gid = op_id, None
    tx = coord.transaction()
    error: Exception | None = None
    try:
        async with tx:
            await tx.execute(_insert(args), (op_id,))
            for body in _bodies(args, op_id):
                tx.produce(args.topic, key=op_id, value=body)
    except Exception as exc:
        error = exc
    answer, name = _told(error)
    state.emit(event="op", op=op_id, told=answer, error=name, status=tx.status.value,
               gid=tx.gid)


def _create_table(args: argparse.Namespace) -> sql.Composed:
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} (op_id text PRIMARY KEY)").format(
        sql.Identifier(args.table))


def _started(state: CrashState, args: argparse.Namespace,
             transactional_ids: Sequence[str]) -> None:
    state.emit(event="start", pid=os.getpid(), name=args.name, instance=args.instance,
               transactional_ids=list(transactional_ids), crash_at=args.crash_at,
               crash_op=state.crash_op, driver=args.driver, started=time.time())


def _run_sync(args: argparse.Namespace, state: CrashState, config: CoordinatorConfig) -> None:
    coord = Coordinator(args.postgres, {"bootstrap.servers": args.bootstrap}, args.name,
                        instance=args.instance, config=config)
    with coord:
        with coord.connection() as conn:
            conn.execute(_create_table(args))
        _started(state, args, coord.transactional_ids)
        for k in range(args.ops):
            _run_op(coord, state, args, f"{args.op_prefix}-{k}")


async def _run_async(args: argparse.Namespace, state: CrashState,
                     config: CoordinatorConfig) -> None:
    coord = AsyncCoordinator(args.postgres, {"bootstrap.servers": args.bootstrap}, args.name,
                             instance=args.instance, config=config)
    async with coord:
        async with coord.connection() as conn:
            await conn.execute(_create_table(args))
        _started(state, args, coord.transactional_ids)
        for k in range(args.ops):
            # One task per operation, as a server handles each request.
            await asyncio.create_task(_arun_op(coord, state, args, f"{args.op_prefix}-{k}"))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sigstop_before_commit:
        args.crash_at = "stop"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s worker %(levelname)s %(name)s %(message)s")
    crash_op = args.crash_op if args.crash_op is not None else args.ops - 1
    out: TextIO = sys.stdout if args.out == "-" else open(args.out, "a", encoding="utf-8")  # noqa: SIM115
    state = CrashState(out, args.crash_at, f"{args.op_prefix}-{crash_op}")
    state.kill_delay_us = args.kill_delay_us
    config = CoordinatorConfig(
        decision_topic=DecisionTopic(name=args.decision_topic,
                                     partitions=args.decision_partitions),
        producers=args.producers,
        transaction_timeout_ms=args.transaction_timeout_ms,
        kafka_timeout=10.0,
        startup_timeout=60.0,
        producer_factory=crashing_producers(state),
        on_step=state.on_step,
    )
    if args.driver == "async":
        asyncio.run(_run_async(args, state, config))
    else:
        _run_sync(args, state, config)
    state.emit(event="end")
    if out is not sys.stdout:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
