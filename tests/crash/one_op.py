"""One coordinated operation in a process of its own, stopped or killed at a step.

Run as ``python -m tests.crash.one_op --postgres DSN --bootstrap HOST:PORT --name N
--instance I --topic T --table TBL --decision-topic D --at STEP [--oversize-first]
[--no-clock-check]``. It prints JSON lines on stdout (flushed):

* ``{"event": "open"}`` once the coordinator is open;
* ``{"event": "oversize", "told": ...}`` with ``--oversize-first``: a first operation
  that fails in Kafka before the commit (a message over the broker's size limit), so
  the slot's producer is dropped and the next operation needs a new one;
* ``{"event": "step", "step": ..., "gid": ...}`` when the operation reaches ``--at``;
* ``{"event": "result", "told": ..., "error": ..., "gid": ...}`` at the end.

``--at after_prepare:stop`` sends itself SIGSTOP right after PREPARE (whoever sends
SIGCONT lets it go on); ``--at after_kafka_commit:kill`` sends itself SIGKILL right
after the Kafka commit. The steps come from ``CoordinatorConfig.on_step``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from psycopg import sql

from coordinator import Coordinator, CoordinatorConfig, DecisionTopic, Error, Status, Step


def emit(**record: object) -> None:
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crash.one_op")
    for flag in ("--postgres", "--bootstrap", "--name", "--instance", "--topic", "--table",
                 "--decision-topic", "--at"):
        p.add_argument(flag, required=True)
    p.add_argument("--oversize-first", action="store_true")
    p.add_argument("--no-clock-check", action="store_true")
    args = p.parse_args(argv)
    step_name, _, action = args.at.partition(":")
    armed = {"on": False}

    def on_step(step: Step, gid: str | None) -> None:
        if not armed["on"] or step.value != step_name:
            return
        emit(event="step", step=step.value, gid=gid)
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)

    config = CoordinatorConfig(
        decision_topic=DecisionTopic(name=args.decision_topic, partitions=3), producers=1,
        on_step=on_step, max_clock_skew_seconds=None if args.no_clock_check else 300.0)
    try:
        coord = Coordinator(args.postgres, {"bootstrap.servers": args.bootstrap}, args.name,
                            instance=args.instance, config=config).open()
    except Error as exc:
        emit(event="open_failed", error=type(exc).__name__, message=str(exc))
        return 3
    table = sql.Identifier(args.table)
    with coord:
        emit(event="open")
        if args.oversize_first:
            tx = coord.transaction()
            try:
                with tx:
                    tx.produce(args.topic, value=b"x" * 2_000_000)
            except Error as exc:
                emit(event="oversize", told=tx.status.value, error=type(exc).__name__)
        armed["on"] = True
        tx = coord.transaction()
        error = None
        try:
            with tx:
                tx.execute(sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(table),
                           (args.instance,))
                tx.produce(args.topic, key=args.instance, value=b"payload")
        except Error as exc:
            error = type(exc).__name__
        told = "committed" if tx.status is Status.COMMITTED else tx.status.value
        emit(event="result", told=told, error=error, gid=tx.gid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
