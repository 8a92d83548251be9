"""A consume-path stage in a process of its own, for crash, rebalance and zombie tests.

Run as ``python -m tests.crash.consumer_worker --postgres DSN --bootstrap HOST:PORT
--name N --instance I --group G --source T --sink T [--at STEP:ACTION --after N]``.
It opens a coordinator, resolves its instance's earlier in-doubt transactions
(``recovery.recover_own``), and runs ``run_consumer``: one row in ``invoices`` and one
message to ``--sink`` per input message. With ``--at STEP:kill`` it SIGKILLs itself at
``STEP`` (``before_prepare``, ``after_prepare``, ``after_kafka_commit``, or ``commit``:
inside ``commit_transaction()``) of its ``--after``-th transaction; with ``STEP:stop`` it
SIGSTOPs itself there instead (a zombie: whoever sends SIGCONT lets it go on). It prints
``ready`` once consuming and ``step <step> <gid>`` right before it kills or stops itself,
flushed; it stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, Message, Producer

import recovery
from coordinator import Coordinator, CoordinatorConfig, DecisionTopic, Step, Transaction


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Arm:
    def __init__(self, at: str | None, after: int) -> None:
        step, _, action = (at or "").partition(":")
        self.step, self.action, self.after, self.count = step, action, after, 0
        self.gid: str | None = None

    def fire(self, step: str, gid: str | None) -> None:
        if step != self.step or self.count != self.after:
            return
        say(f"step {step} {gid}")
        os.kill(os.getpid(), signal.SIGSTOP if self.action == "stop" else signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crash.consumer_worker")
    for flag in ("--postgres", "--bootstrap", "--name", "--instance", "--group", "--source",
                 "--sink", "--decision-topic"):
        p.add_argument(flag, required=True)
    p.add_argument("--at", default=None)
    p.add_argument("--after", type=int, default=1, help="arm the N-th transaction (1-based)")
    p.add_argument("--batch-size", type=int, default=20)
    args = p.parse_args(argv)
    arm = _Arm(args.at, args.after)

    def on_step(step: Step, gid: str | None) -> None:
        if step is Step.BEFORE_PREPARE:
            arm.count += 1
        arm.fire(step.value, gid)

    class ArmedProducer(Producer):
        def commit_transaction(self, *a: Any) -> None:
            arm.fire("commit", None)
            super().commit_transaction(*a)

    config = CoordinatorConfig(
        decision_topic=DecisionTopic(name=args.decision_topic, partitions=3), producers=1,
        on_step=on_step, producer_factory=ArmedProducer)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kafka = {"bootstrap.servers": args.bootstrap}
    with Coordinator(args.postgres, kafka, args.name, instance=args.instance,
                     config=config) as coord:
        recovery.recover_own(coord, kafka)
        consumer = Consumer({
            "bootstrap.servers": args.bootstrap, "group.id": args.group,
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500})
        consumer.subscribe([args.source])

        def handle(tx: Transaction, messages: Sequence[Message]) -> None:
            for m in messages:
                key = (m.key() or b"").decode()
                tx.execute("INSERT INTO invoices (msg_key, src) VALUES (%s, %s)",
                           (key, f"{args.instance} {m.partition()}:{m.offset()}"))
                tx.produce(args.sink, key=key, value=b"paid " + key.encode())

        say("ready")
        try:
            coord.run_consumer(consumer, handle, batch_size=args.batch_size,
                               batch_timeout=0.2, stop=stop)
        finally:
            consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
