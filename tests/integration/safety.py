"""Helpers of the safety tests (``test_paused_coordinator.py``,
``test_wrong_decision_log.py``, ``test_clocks_and_liveness.py``): a transaction that
"dies" at a protocol step, the recovery command, a coordinator in a process of its own
(``tests/crash/one_op.py``) that stops or kills itself at a step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from coordinator import Step

if TYPE_CHECKING:
    from tests.integration.conftest import Env

ROOT = Path(__file__).resolve().parents[2]


class Crash(BaseException):
    """Stands for the process dying at a step (raised from an on_step hook)."""


def make_table(env: Env) -> str:
    env.execute("CREATE TABLE ops (op_id text PRIMARY KEY)")
    return "ops"


def rows(env: Env) -> list[str]:
    return [r[0] for r in env.execute("SELECT op_id FROM ops ORDER BY op_id")]


def recover_cli(env: Env, *extra: str, bootstrap: str | None = None
                ) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "recovery", "--postgres", env.dsn, "--bootstrap-servers",
         bootstrap or env.bootstrap, "--name", env.name, "--grace-seconds", "0", "--json",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def crash_at(env: Env, step: Step, **config: Any) -> tuple[str, str]:
    """One transaction (row ``a`` in ``ops``, message ``a``) whose process "dies" at
    ``step`` (an on_step hook raises :class:`Crash`); its coordinator is closed
    afterwards, so no producer of it is alive. Returns (gid, business topic)."""
    make_table(env)
    topic = env.topic()

    def on_step(at: Step, gid: str | None) -> None:
        if at is step:
            raise Crash(gid)

    coord = env.coordinator(on_step=on_step, **config)
    tx = coord.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('a')")
        tx.produce(topic, key="a", value=b"a")
    assert tx.gid is not None
    env.close()
    assert env.prepared() == [tx.gid]
    return tx.gid, topic


def one_op(env: Env, topic: str, at: str, *extra: str, faketime: str | None = None
           ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.crash.one_op", "--postgres", env.dsn, "--bootstrap",
           env.bootstrap, "--name", env.name, "--instance", env.instance, "--topic", topic,
           "--table", "ops", "--decision-topic", env.decision_topic.name, "--at", at, *extra]
    envvars = dict(os.environ)
    if faketime is not None:
        cmd = ["faketime", "-f", faketime, *cmd]
        envvars["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=envvars)


def next_event(proc: subprocess.Popen[str], timeout: float = 90.0) -> dict[str, Any]:
    assert proc.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()  # type: ignore[union-attr]
                                                        ), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no event from the process within {timeout}s"
    event: dict[str, Any] = json.loads(box[0])
    return event
