"""A coordinator frozen at a protocol step past every grace period, with recovery run
meanwhile at ``--grace-seconds 0``: whatever happens, both sides agree, and the
caller is never told COMMITTED for something that is not committed on both sides.

The end-to-end reproduction of a divergence found in review: a producer re-created
after PREPARE (after a failed transaction on the slot) used to get an epoch newer
than recovery's fence and commit what recovery had rolled back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import pytest

import recovery
from coordinator import Error, GroupCommit, Status, Step
from recovery import RecoveryConfig
from tests.integration.safety import (
    Crash,
    make_table,
    next_event,
    one_op,
    recover_cli,
    rows,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


@pytest.mark.parametrize("oversize_first", [True, False], ids=["producer-recreated", "plain"])
def test_sigstopped_after_prepare_then_recovery_grace_zero(
        env: Env, procs: list[subprocess.Popen[str]], oversize_first: bool) -> None:
    make_table(env)
    topic = env.topic()
    proc = one_op(env, topic, "after_prepare:stop",
                  *(["--oversize-first"] if oversize_first else []))
    procs.append(proc)
    assert next_event(proc)["event"] == "open"
    if oversize_first:
        assert next_event(proc)["told"] == Status.ROLLED_BACK.value
    stopped = next_event(proc)
    assert stopped["event"] == "step"
    gid = stopped["gid"]
    assert env.prepared() == [gid]

    # The coordinator is frozen past every grace period: recovery fences and rolls back.
    code, report, stderr = recover_cli(env)
    assert code == 0, stderr
    assert report["rolled_back"] == [gid]
    assert env.prepared() == []

    os.kill(proc.pid, signal.SIGCONT)
    result = next_event(proc)
    assert proc.wait(60) == 0
    assert result["told"] != "committed", result
    assert result["error"] in ("RolledBack", "OutcomeUnknown"), result
    # Both sides rolled back.
    assert rows(env) == []
    assert env.read(topic) == []
    assert gid not in env.decisions()


def test_paused_in_process_group_commit_never_told_committed_when_rolled_back(
        env: Env) -> None:
    """Group commit, four threads on one producer slot, recovery at grace 0 while one
    transaction is held right after PREPARE; every answer must match both sides."""
    make_table(env)
    topic = env.topic()
    hold = threading.Event()
    held: list[str] = []

    first = threading.Lock()

    def on_step(step: Step, gid: str | None) -> None:
        # The first transaction to reach AFTER_PREPARE is frozen there.
        if step is Step.AFTER_PREPARE and first.acquire(blocking=False):
            assert gid is not None
            held.append(gid)
            hold.wait(60)

    coord = env.coordinator(producers=1, group_commit=GroupCommit(max_wait=0.005),
                            on_step=on_step)
    told: dict[str, tuple[str, str | None]] = {}

    def work(i: int) -> None:
        for k in range(5):
            op = f"t{i}-{k}"
            tx = coord.transaction()
            try:
                with tx:
                    tx.execute("INSERT INTO ops (op_id) VALUES (%s)", (op,))
                    tx.produce(topic, key=op, value=op)
            except Error:
                pass
            told[op] = (tx.status.value, tx.gid)

    threads = [threading.Thread(target=work, args=(i,), name=f"t{i}") for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held
    for _ in range(3):  # a recovery storm while t0 is frozen after PREPARE
        recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))
    hold.set()
    for t in threads:
        t.join(120)
    recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))
    visible = {r.key.decode() for r in env.read(topic) if r.key is not None}
    committed_rows = set(rows(env))
    assert visible == committed_rows
    for op, (status, _gid) in told.items():
        assert (status == Status.COMMITTED.value) == (op in committed_rows), (op, status)
    [frozen] = [status for status, gid in told.values() if gid == held[0]]
    assert frozen != Status.COMMITTED.value
    assert env.prepared() == []


def test_recover_own_never_touches_the_live_coordinators_transactions(env: Env) -> None:
    """recover_own skips grace and fence only for the gids the coordinator found
    prepared when it opened (a set, not a time: a clock step on the PostgreSQL host
    cannot make a live transaction look inherited)."""
    make_table(env)
    topic = env.topic()

    def crash_after_prepare(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE:
            raise Crash(gid)

    old = env.coordinator(on_step=crash_after_prepare)
    tx = old.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('old')")
        tx.produce(topic, key="old", value=b"old")
    env.close()
    inherited = tx.gid

    hold, held = threading.Event(), threading.Event()

    def pause_after_prepare(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE:
            held.set()
            hold.wait(60)

    coord = env.coordinator(on_step=pause_after_prepare)
    assert coord.inherited_gids == {inherited}
    live = coord.transaction()

    def run_live() -> None:
        with live:
            live.execute("INSERT INTO ops (op_id) VALUES ('live')")
            live.produce(topic, key="live", value=b"live")

    t = threading.Thread(target=run_live)
    t.start()
    assert held.wait(60)
    report = env.recover_own(coord)
    assert report.rolled_back == [inherited]
    assert report.waiting == [live.gid] and report.fenced == []
    hold.set()
    t.join(60)
    assert live.status is Status.COMMITTED
    assert rows(env) == ["live"]
    assert [r.value for r in env.read(topic)] == [b"live"]


