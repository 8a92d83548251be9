"""Fault injection on the local stack (`scripts/stack`) for tests.

These act on the stack's own processes (by the pids in its pid files), so they only make
sense when the tests run against `scripts/stack` -- not against PG_DSN /
KAFKA_BOOTSTRAP_SERVERS of your own or testcontainers. Each raises AssertionError with the
command's output when it fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

STACK = Path(__file__).resolve().parents[2] / "scripts" / "stack"


def stack(*args: str, timeout: float = 300.0) -> str:
    """Run `scripts/stack ARGS...` and return its stdout."""
    done = subprocess.run([str(STACK), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"scripts/stack {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stderr}")
    return done.stdout


def kill_kafka(broker: int = 1) -> None:
    """SIGKILL one Kafka broker: no clean shutdown."""
    stack("kill-kafka", "--broker", str(broker))


def start_kafka(broker: int = 1) -> None:
    """Start one Kafka broker again and wait until transactions work."""
    stack("start-kafka", "--broker", str(broker))


def pg_stop_immediate() -> None:
    """`pg_ctl stop -m immediate`: PostgreSQL stops like a crash (recovery on next start)."""
    stack("pg-stop-immediate")


def pg_start() -> None:
    """Start PostgreSQL again and wait until it accepts connections."""
    stack("pg-start")


def local_kafka() -> str | None:
    """The local stack's Kafka bootstrap servers (whose brokers tests may restart)."""
    for line in stack("env", timeout=60).splitlines():
        if line.startswith("export KAFKA_BOOTSTRAP_SERVERS="):
            return line.split("=", 1)[1].strip().strip("'\"")
    return None
