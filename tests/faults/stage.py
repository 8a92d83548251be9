"""One consumer stage of the campaign's pipeline workload (``tests/faults/pipeline.py``).

Run by the campaign as ``python -m tests.faults.stage --plan PLAN.json --log LOG.jsonl
--postgres DSN --bootstrap SERVERS --name N --instance I --group G --source T --sink T
--table TBL --decision-topic D --phase K [--driver async] [--recover-own]``; after a crash
the campaign starts it again with the same arguments (the same instance id, as an
orchestrator would).

The stage opens a coordinator, resolves its instance's earlier in-doubt transactions with
``recovery.recover_own`` (``--recover-own``: the even-numbered stages; the others leave
theirs to the recovery command), and runs ``Coordinator.run_consumer`` (``--driver async``:
``AsyncCoordinator.run_consumer``, whose worker threads then fire the crash hooks) on a
``read_committed`` consumer of group ``--group`` (``enable.auto.commit=false``,
``session.timeout.ms`` 6000) until SIGTERM. Each batch is one coordinated transaction --
its *label* is ``<phase>.<instance>.<incarnation>.<n>`` -- that inserts one row per input
message into ``--table`` (``phase, part, off, in_id, tx, instance``) and produces one
output message per input message to ``--sink`` (key = the input's key, value ``{"in",
"src", "tx"}``); its Kafka transaction also commits the batch's offsets.

The plan's *arms* (``{"arm", "crash", "after", "kill_delay_us", "pause_seconds"}``) are
fired one after the other, each on the ``after``-th transaction after the previous one
fired (or after start-up): ``crash`` is a protocol point where the stage SIGKILLs itself
(``tests.crash.worker.POINTS``) or ``pause:<step>``, where it freezes itself (SIGSTOP) for
``pause_seconds`` -- longer than the session timeout, so that the group moves its
partitions to the other stages and the stage wakes up a zombie -- or
``lost-commit:request`` / ``lost-commit:reply``, where ``commit_transaction()`` raises a
non-retriable error instead of the call or after it (:class:`StageProducer`): an unknown
outcome, which ``run_consumer`` waits out until recovery has decided. The hooks are those of
``tests/crash/worker.py`` through the library's seams (``CoordinatorConfig.on_step`` and a
``confluent_kafka.Producer`` subclass as ``producer_factory``); an arm whose point the
transaction did not reach (it failed before) stays armed for the next one.

The log (``tests.crash.worker.CrashState.emit``, fsync-ed): ``start`` {pid, incarnation},
``recover_own``; ``batch`` {tx, arm, msgs: [[in_id, partition, offset], ...]} when the
handler runs; ``gid`` {tx, gid} right before PREPARE; ``result`` {tx, gid, status} once the
transaction is over (reported by the consumer subclass at the next ``consume()``, at the
next handler call, or when the loop pauses the partitions); ``wait`` {tx, gid} when
``run_consumer`` pauses its partitions to wait for recovery after an unknown outcome, and
``resumed`` {seconds} when it goes on (``result`` also carries ``reason``, the
coordinator's last warning during the transaction, e.g. why it rolled back); ``crash``,
``pause``, ``continued`` (the hooks; their ``op`` is the arm id), ``lost-commit`` {op, mode,
gid}; ``failed`` {error} when
``run_consumer`` raised (the process then exits 3 and the campaign starts it again);
``end`` {stats} after SIGTERM; ``assign``, ``revoke``, ``lost`` {parts} when the group
changes the stage's partitions (``PK2PC_STAGE_DEBUG=<contexts>`` also turns on the
consumer's librdkafka debug log, on the stage's stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from psycopg import sql

import recovery
from coordinator import (
    AsyncCoordinator,
    AsyncTransaction,
    ConsumerStats,
    Coordinator,
    CoordinatorConfig,
    DecisionTopic,
    Step,
    Transaction,
)
from tests.crash import worker as crash_worker

__all__ = ["SESSION_TIMEOUT_MS", "Stage", "StageConsumer", "main"]

CLOSE_SECONDS = 10.0
"""How long the stage waits for its consumer and its coordinator to close at the end."""

SESSION_TIMEOUT_MS = 6000
"""The stages' ``session.timeout.ms`` (the brokers' minimum): an armed pause lasts longer."""

log = logging.getLogger("tests.faults.stage")


class Reasons(logging.Handler):
    """The coordinator's last warning (why a transaction rolled back or was retried): a
    handler on the ``coordinator`` logger. ``run_consumer`` dropping messages the consumer
    handed over again below the committed offset goes to the stage's log
    (``redelivered``)."""

    def __init__(self, state: crash_worker.CrashState) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None
        self.state = state

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()[:300]
        if "delivered again although" in self.last:
            self.state.emit(event="redelivered", text=self.last, t=time.time())


class Stage:
    """The handler, the hooks and the log of one stage process."""

    def __init__(self, args: argparse.Namespace, state: crash_worker.CrashState,
                 arms: list[dict[str, Any]], incarnation: int) -> None:
        self.args = args
        self.state = state
        self.arms = arms
        self.incarnation = incarnation
        self.prefix = f"{args.phase}.{args.instance}.{incarnation}"
        self.count = 0
        self.since_fired = 0
        self.current: tuple[Transaction | AsyncTransaction, str] | None = None
        self.armed: dict[str, Any] | None = None
        self.waiting_since: float | None = None
        self.lose: str | None = None
        """``lost-commit:<mode>`` armed for the current transaction (``StageProducer``)."""
        self.lost = False
        self.reasons = Reasons(state)
        logging.getLogger("coordinator").addHandler(self.reasons)
        self.insert = sql.SQL(
            "INSERT INTO {} (phase, part, off, in_id, tx, instance) SELECT %s, p, o, k, %s, "
            "%s FROM unnest(%s::int[], %s::bigint[], %s::text[]) AS u(p, o, k)"
        ).format(sql.Identifier(args.table))

    # -- run_consumer's handler ----------------------------------------------------------

    def handle(self, tx: Transaction, messages: Sequence[Message]) -> None:
        """One row and one output message per input message, in ``tx``."""
        label, params, msgs = self.begin(tx, messages)
        tx.execute(self.insert, params)
        self.produce(tx, label, msgs)

    async def ahandle(self, tx: AsyncTransaction, messages: Sequence[Message]) -> None:
        """:meth:`handle` for ``AsyncCoordinator.run_consumer`` (``--driver async``)."""
        label, params, msgs = self.begin(tx, messages)
        await tx.execute(self.insert, params)
        self.produce(tx, label, msgs)

    def begin(self, tx: Transaction | AsyncTransaction, messages: Sequence[Message],
              ) -> tuple[str, tuple[Any, ...], list[list[Any]]]:
        """Arm the batch's transaction, log it; its label, the insert's parameters and
        the batch as ``[in_id, partition, offset]`` rows."""
        self.settle()
        self.reasons.last = None
        self.count += 1
        self.since_fired += 1
        label = f"{self.prefix}.{self.count}"
        st = self.state
        st.gid = None
        arm = self.arms[0] if self.arms and self.since_fired >= int(self.arms[0]["after"]) \
            else None
        self.armed = arm
        self.lose, self.lost = None, False
        if arm is not None and str(arm["crash"]).startswith("lost-commit:"):
            st.op, st.crash_op, st.point = str(arm["arm"]), "", "none"
            self.lose = str(arm["crash"]).split(":", 1)[1]
        elif arm is not None:
            st.op = st.crash_op = str(arm["arm"])
            st.point = str(arm["crash"])
            st.kill_delay_us = int(arm.get("kill_delay_us") or 0)
            st.pause_seconds = float(arm.get("pause_seconds") or 0.0)
        else:
            st.op, st.crash_op, st.point = label, "", "none"
        self.current = (tx, label)
        msgs = [[(m.key() or b"").decode(), int(m.partition() or 0), int(m.offset() or 0)]
                for m in messages]
        st.emit(event="batch", tx=label, arm=None if arm is None else arm["arm"], msgs=msgs,
                t=time.time())
        params = (int(self.args.phase), label, self.args.instance, [m[1] for m in msgs],
                  [m[2] for m in msgs], [m[0] for m in msgs])
        return label, params, msgs

    def produce(self, tx: Transaction | AsyncTransaction, label: str,
                msgs: list[list[Any]]) -> None:
        for key, part, off in msgs:
            tx.produce(self.args.sink, key=str(key), value=json.dumps(
                {"in": key, "src": f"{part}:{off}", "tx": label}, sort_keys=True))

    def on_step(self, step: Step, gid: str | None) -> None:
        """``CoordinatorConfig.on_step``: the gid of every transaction right before its
        PREPARE, then the crash hooks of ``tests/crash/worker.py``."""
        if step is Step.BEFORE_PREPARE and self.current is not None:
            self.state.emit(event="gid", tx=self.current[1], gid=gid, t=time.time())
        self.state.on_step(step, gid)

    def settle(self, waiting: bool = False) -> None:
        """Log how the last transaction ended (once), and whether its arm fired."""
        if self.current is None:
            return
        tx, label = self.current
        self.current = None
        self.state.emit(event="result", tx=label, gid=tx.gid, status=tx.status.value,
                        waiting=waiting, reason=self.reasons.last, t=time.time())
        arm, self.armed = self.armed, None
        if arm is not None and (self.lost or (str(arm["crash"]).startswith("pause:")
                                              and self.state.point == "none")):
            # The pause happened (CrashState.pause disarms itself) or the commit's error
            # was raised: on to the next arm.
            self.arms.pop(0)
            self.since_fired = 0
        self.state.point = "none"
        self.lose, self.lost = None, False

    def producer_factory(self, conf: dict[str, Any]) -> StageProducer:
        """``CoordinatorConfig.producer_factory``: the crash hooks, and lost commits."""
        producer = crash_worker.crashing_producers(self.state, StageProducer)(conf)
        assert isinstance(producer, StageProducer)
        producer.stage = self
        return producer

    # -- what the consumer subclass reports ----------------------------------------------

    def waiting(self) -> None:
        """``run_consumer`` pauses the partitions: it waits for recovery to decide."""
        tx_label = self.current[1] if self.current is not None else None
        gid = self.current[0].gid if self.current is not None else None
        self.settle(waiting=True)
        self.waiting_since = time.monotonic()
        self.state.emit(event="wait", tx=tx_label, gid=gid, t=time.time())

    def resumed(self) -> None:
        if self.waiting_since is None:
            return
        seconds = time.monotonic() - self.waiting_since
        self.waiting_since = None
        self.state.emit(event="resumed", seconds=round(seconds, 3), t=time.time())


class StageProducer(crash_worker.CrashingProducer):
    """The crash hooks of ``tests/crash/worker.py``, and the ``lost-commit`` arms: an error
    from ``commit_transaction()`` -- ``request``: instead of the call (the transaction
    stays open until the broker's transaction timeout aborts it); ``reply``: after the
    call returned (committed). Either way the coordinator cannot know the outcome
    (``OutcomeUnknown``): ``run_consumer`` waits until recovery decides."""

    stage: Stage | None = None

    def commit_transaction(self, *args: Any) -> Any:
        stage = self.stage
        mode = None if stage is None else stage.lose
        if stage is None or mode is None:
            return super().commit_transaction(*args)
        stage.lose, stage.lost = None, True
        st = stage.state
        st.emit(event="lost-commit", op=st.op, mode=mode, gid=st.gid, t=time.time())
        if mode == "reply":
            super().commit_transaction(*args)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                        f"commit {mode} lost (a fault of the campaign)"))


class StageConsumer(Consumer):
    """The stage's consumer: tells the stage when a transaction is over (the loop asks for
    the next batch) and when the loop waits for recovery (it pauses the partitions)."""

    stage: Stage | None = None

    def consume(self, *args: Any, **kwargs: Any) -> list[Message]:
        if self.stage is not None:
            self.stage.settle()
        result: list[Message] = super().consume(*args, **kwargs)
        return result

    def pause(self, partitions: Any) -> None:
        if self.stage is not None:
            self.stage.waiting()
        super().pause(partitions)

    def resume(self, partitions: Any) -> None:
        super().resume(partitions)
        if self.stage is not None:
            self.stage.resumed()


def _resume(path: Path) -> tuple[int, set[str]]:
    """This process's incarnation number and the arms that already fired, from the log."""
    starts, fired = 0, set()
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                ln = json.loads(raw)
            except ValueError:
                continue  # torn by a kill
            if ln.get("event") == "start":
                starts += 1
            elif ln.get("event") in ("crash", "pause", "lost-commit"):
                fired.add(str(ln.get("op")))
    return starts + 1, fired


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.faults.stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--plan", "--log", "--postgres", "--bootstrap", "--name", "--instance",
                 "--group", "--source", "--sink", "--table", "--decision-topic", "--phase"):
        p.add_argument(flag, required=True)
    p.add_argument("--decision-partitions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4,
                   help="run_consumer's batch_size (default 4: many transactions)")
    p.add_argument("--transaction-timeout-ms", type=int, default=10_000)
    p.add_argument("--driver", choices=("sync", "async"), default="sync",
                   help="Coordinator.run_consumer (sync) or AsyncCoordinator.run_consumer")
    p.add_argument("--recover-own", action="store_true",
                   help="run recovery.recover_own right after the coordinator opened")
    return p


OWN_RECOVERY = recovery.RecoveryConfig(kafka_timeout=10.0, lso_wait_seconds=15.0,
                                       lock_wait_seconds=10.0)
"""``--recover-own``'s settings."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.instance} %(levelname)s %(name)s "
                        "%(message)s")
    log_path = Path(args.log)
    incarnation, fired = _resume(log_path)
    out = log_path.open("a", encoding="utf-8")
    if log_path.stat().st_size and not log_path.read_bytes().endswith(b"\n"):
        out.write("\n")  # a line torn by the kill stays alone (and is skipped)
    state = crash_worker.CrashState(out, "none", "")
    arms = [a for a in json.loads(Path(args.plan).read_text(encoding="utf-8"))["arms"]
            if str(a["arm"]) not in fired]
    stage = Stage(args, state, arms, incarnation)
    config = CoordinatorConfig(
        decision_topic=DecisionTopic(name=args.decision_topic,
                                     partitions=args.decision_partitions),
        producers=1, transaction_timeout_ms=args.transaction_timeout_ms, kafka_timeout=10.0,
        startup_timeout=20.0, producer_factory=stage.producer_factory,
        on_step=stage.on_step, connection_timeout=10.0, pool_max_size=4)
    run = _arun if args.driver == "async" else _run
    code = run(args, stage, config, {"bootstrap.servers": args.bootstrap})
    out.close()
    os._exit(code)  # no interpreter shutdown: librdkafka threads may linger after a fault


def _consumer(args: argparse.Namespace, stage: Stage) -> StageConsumer:
    conf: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap, "group.id": args.group,
        "enable.auto.commit": False, "isolation.level": "read_committed",
        "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": 500}
    if os.environ.get("PK2PC_STAGE_DEBUG"):  # librdkafka's debug contexts, on stderr
        conf["debug"] = os.environ["PK2PC_STAGE_DEBUG"]
    consumer = StageConsumer(conf)
    consumer.stage = stage

    def changed(event: str) -> Any:
        def log(_consumer: Consumer, tps: list[Any]) -> None:
            stage.state.emit(event=event, parts=sorted(tp.partition for tp in tps),
                             t=time.time())
        return log

    consumer.subscribe([args.source], on_assign=changed("assign"),
                       on_revoke=changed("revoke"), on_lost=changed("lost"))
    return consumer


def _started(args: argparse.Namespace, stage: Stage) -> None:
    stage.state.emit(event="start", pid=os.getpid(), instance=args.instance,
                     incarnation=stage.incarnation,
                     arms_left=len(stage.arms), driver=args.driver, t=time.time())


def _recovered(stage: Stage, report: recovery.RecoveryReport | BaseException) -> None:
    if isinstance(report, BaseException):  # best effort; the campaign's recovery runs follow
        stage.state.emit(event="recover_own_failed",
                         error=f"{type(report).__name__}: {report}"[:300])
    else:
        stage.state.emit(event="recover_own", committed=report.committed,
                         rolled_back=report.rolled_back, skipped=report.skipped,
                         remaining=[r.gid for r in report.remaining], t=time.time())


def _ended(stage: Stage, stats: ConsumerStats | BaseException) -> int:
    """Log how ``run_consumer`` ended; the process's exit status."""
    stage.settle()
    if isinstance(stats, BaseException):
        stage.state.emit(event="failed", error=type(stats).__name__, detail=str(stats)[:300],
                         trace="".join(traceback.format_exception(stats))[-1500:],
                         t=time.time())
        return 3
    stage.state.emit(event="end", batches=stats.batches, messages=stats.messages,
                     retries=stats.retries, handler_failures=stats.handler_failures,
                     in_doubt=len(stats.in_doubt), t=time.time())
    return 0


def _run(args: argparse.Namespace, stage: Stage, config: CoordinatorConfig,
         kafka: dict[str, Any]) -> int:
    """The stage on a :class:`Coordinator`, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    coord = Coordinator(args.postgres, kafka, args.name, instance=args.instance, config=config)
    coord.open()  # fails (non-zero exit) while a service is down: the campaign retries
    _started(args, stage)
    if args.recover_own:
        try:
            _recovered(stage, recovery.recover_own(coord, kafka, OWN_RECOVERY))
        except Exception as exc:
            _recovered(stage, exc)
    consumer = _consumer(args, stage)
    try:
        code = _ended(stage, coord.run_consumer(consumer, stage.handle,
                                                batch_size=args.batch_size,
                                                batch_timeout=0.2, stop=stop))
    except Exception as exc:
        code = _ended(stage, exc)
    for close in (consumer.close, coord.close):  # bounded: a fault may still be on
        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        closer.join(CLOSE_SECONDS)
    return code


def _arun(args: argparse.Namespace, stage: Stage, config: CoordinatorConfig,
          kafka: dict[str, Any]) -> int:
    """The stage on an :class:`AsyncCoordinator` (``--driver async``), until SIGTERM."""

    async def run() -> int:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        coord = AsyncCoordinator(args.postgres, kafka, args.name, instance=args.instance,
                                 config=config)
        await coord.open()  # fails while a service is down: the campaign retries
        _started(args, stage)
        if args.recover_own:
            try:
                _recovered(stage, await recovery.arecover_own(coord, kafka, OWN_RECOVERY))
            except Exception as exc:
                _recovered(stage, exc)
        consumer = _consumer(args, stage)
        try:
            code = _ended(stage, await coord.run_consumer(
                consumer, stage.ahandle, batch_size=args.batch_size, batch_timeout=0.2,
                stop=stop))
        except Exception as exc:
            code = _ended(stage, exc)
        closer = threading.Thread(target=consumer.close, daemon=True)
        closer.start()
        with contextlib.suppress(TimeoutError):  # bounded: a fault may still be on
            await asyncio.wait_for(coord.close(), CLOSE_SECONDS)
        await asyncio.to_thread(closer.join, CLOSE_SECONDS)
        return code

    return asyncio.new_event_loop().run_until_complete(run())

if __name__ == "__main__":
    sys.exit(main())
