"""Do ``commit_transaction(timeout)`` and ``abort_transaction(timeout)`` keep their
timeout while the broker does not answer? ``confluent_kafka.Producer`` against
``confluent_kafka.aio.AIOProducer`` (whose commit and abort first await an unbounded
``flush()``).

The broker is paused (SIGSTOP) for ``--pause`` seconds around each call, so run it
ONLY against a private stack (``STACK_DIR=... STACK_PORT_OFFSET=... scripts/stack up``),
never the shared one::

    eval "$(STACK_DIR=$PWD/.stack STACK_PORT_OFFSET=4170 scripts/stack env)"
    .venv/bin/python -m tests.bench.aio_pause --broker-pid <pid from scripts/stack status>

The pid must be the broker that ``KAFKA_BOOTSTRAP_SERVERS`` names (checked).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.aio import AIOProducer

from .env import create_topics, delete_topics

__all__ = ["main"]


def _conf(brokers: str) -> dict[str, Any]:
    return {"bootstrap.servers": brokers, "transactional.id": f"pk2pc-bench-pause-"
            f"{uuid.uuid4().hex[:8]}", "enable.idempotence": True, "acks": "all",
            "linger.ms": 1, "transaction.timeout.ms": 60_000}


def _is_broker_of(pid: int, port: int) -> bool:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if not any(b"kafka.Kafka" in a for a in args):
        return False
    conf = next((a.decode() for a in reversed(args) if a.endswith(b".properties")), "")
    path = Path(os.readlink(f"/proc/{pid}/cwd")) / conf
    return f":{port}" in path.read_text()


def _sync(brokers: str, topic: str, op: str, timeout: float, pid: int, pause: float) -> str:
    p = Producer(_conf(brokers))
    p.init_transactions(10)
    p.begin_transaction()
    p.produce(topic, value=b"x", key=b"k")
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        getattr(p, op)(timeout)
        result = "returned"
    except Exception as exc:
        result = f"raised {exc!r}"[:160]
    finally:
        took = time.monotonic() - t0
        time.sleep(max(0.0, pause - took))
        os.kill(pid, signal.SIGCONT)
    return f"Producer.{op}({timeout:g}): {took:.1f} s, {result}"


async def _aio(brokers: str, topic: str, op: str, timeout: float, pid: int,
               pause: float) -> str:
    p = AIOProducer(_conf(brokers))
    await p.init_transactions(10)
    await p.begin_transaction()
    await p.produce(topic, value=b"x", key=b"k")
    os.kill(pid, signal.SIGSTOP)
    resume = asyncio.get_running_loop().call_later(pause, os.kill, pid, signal.SIGCONT)
    t0 = time.monotonic()
    try:
        await getattr(p, op)(timeout)
        result = "returned"
    except Exception as exc:
        result = f"raised {exc!r}"[:160]
    took = time.monotonic() - t0
    if not resume.cancelled():
        await asyncio.sleep(max(0.0, pause - took) + 0.1)
    os.kill(pid, signal.SIGCONT)
    try:
        await p.close()
    except Exception as exc:
        result += f" (close: {exc!r})"[:80]
    return f"AIOProducer.{op}({timeout:g}): {took:.1f} s, {result}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.aio_pause", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker-pid", type=int, required=True)
    ap.add_argument("--pause", type=float, default=15.0, help="seconds the broker is paused")
    ap.add_argument("--timeout", type=float, default=3.0, help="timeout of each call")
    args = ap.parse_args(argv)
    brokers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    if not brokers or not _is_broker_of(args.broker_pid,
                                        int(brokers.split(",")[0].rsplit(":", 1)[1])):
        sys.exit("--broker-pid is not the broker of KAFKA_BOOTSTRAP_SERVERS")
    topic = f"pk2pc-bench.pause.{uuid.uuid4().hex[:6]}"
    create_topics(brokers, [topic], 1)
    print(f"the broker paused {args.pause:g} s around each call:")
    try:
        for op in ("commit_transaction", "abort_transaction"):
            print(" ", _sync(brokers, topic, op, args.timeout, args.broker_pid, args.pause),
                  flush=True)
            time.sleep(1)
            print(" ", asyncio.run(_aio(brokers, topic, op, args.timeout, args.broker_pid,
                                        args.pause)), flush=True)
            time.sleep(1)
    finally:
        os.kill(args.broker_pid, signal.SIGCONT)
        time.sleep(1)
        delete_topics(brokers, [topic])
    return 0


if __name__ == "__main__":
    sys.exit(main())
