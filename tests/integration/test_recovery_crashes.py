"""Recovery after real crashes: a coordinator process is killed with SIGKILL at a protocol
point (``tests/crash/worker.py``), then the recovery command runs as a subprocess
(``tests/integration/crash_lab.py``).

After recovery, for every operation: its PostgreSQL row is committed <=> its messages
are visible to a read_committed consumer <=> its decision record is visible; no message
twice; no prepared transaction of ours left (``tests/crash/checker.py``).

The kill at each protocol point and the zombie run with both drivers of the worker:
``sync`` (:class:`~coordinator.Coordinator`) and ``async``
(:class:`~coordinator.AsyncCoordinator`, whose hooks run in its worker threads while the
event loop awaits them); the two recovery processes get one crashed worker of each.

Also: foreign prepared transactions stay untouched, two recoveries at the same moment
act once per gid, and a zombie coordinator (SIGSTOP before its Kafka commit) cannot
commit after recovery fenced it. The recovery command's own behaviour (grace period,
unreachable decision topic, ``--dry-run``, ``list``, ``recover_own``) is in
``test_recovery_command.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from coordinator.gid import Gid, parse
from tests.crash import indoubt
from tests.crash.checker import WorkerLog, merge_logs, prepared_gids, read_log
from tests.crash.worker import DRIVERS
from tests.integration.crash_lab import Crashes, crash_gid, crash_lab, op_ids
from tests.plugins.kafka_helpers import read_committed, read_uncommitted
from tests.plugins.services import drop_database

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def lab(env: Env, tmp_path: Path) -> Iterator[Crashes]:
    with crash_lab(env, tmp_path) as c:
        yield c


def assert_crashed_in_driver(log: WorkerLog, driver: str) -> None:
    """The crash hook ran where the driver runs the protocol: the calling thread (sync),
    or one of the AsyncCoordinator's worker threads while the event loop awaited it."""
    crash = log.crash
    assert crash is not None
    if driver == "sync":
        assert crash["thread"] == "MainThread", crash
    else:
        assert crash["thread"].startswith("pk2pc-"), crash


# -- (a), (b), (c): kill -9 at each protocol point, then the recovery command ------------


@pytest.mark.parametrize(
    ("point", "expected", "delay_us"),
    [
        pytest.param("after_prepare", "rolled_back", 0, id="a-after-prepare-kafka-open"),
        pytest.param("after_commit", "committed", 0, id="b-after-kafka-commit"),
        # In flight: killed right after entering commit_transaction() (the EndTxn request
        # has rarely left: usually aborted), or 3 ms into it (usually committed on the
        # broker but not yet answered). Either outcome is fine if both sides agree.
        pytest.param("during_commit", None, 0, id="c-during-kafka-commit"),
        pytest.param("during_commit", None, 3000, id="c-during-kafka-commit-3ms"),
        pytest.param("before_prepare", "nothing", 0, id="before-prepare"),
        pytest.param("during_pg_commit", "committed", 0, id="during-commit-prepared"),
    ],
)
@pytest.mark.parametrize("driver", DRIVERS)
def test_kill_then_recovery_command(lab: Crashes, point: str, expected: str | None,
                                    delay_us: int, driver: str) -> None:
    log = lab.crash(prefix="op", crash_at=point, extra=["--kill-delay-us", str(delay_us)],
                    driver=driver)
    assert_crashed_in_driver(log, driver)
    crash = log.crash
    assert crash is not None
    gid = crash["gid"]
    assert crash["kafka_flushed"] is (point != "before_prepare")
    ours = lab.prepared()
    if point == "before_prepare":
        assert ours == []  # the session died before PREPARE: PostgreSQL rolled it back
    elif point in ("after_prepare", "after_commit"):
        assert ours == [gid]
    else:  # killed during a call: its gid is prepared, or committed already
        assert ours in ([gid], [])

    run = lab.recover()
    assert run.returncode == 0, run
    assert run.report["remaining"] == []
    assert set(run.acted) <= {gid}
    if expected == "rolled_back":
        assert run.report["rolled_back"] == [gid] and run.report["committed"] == []
    elif expected == "committed" and point == "after_commit":
        assert run.report["committed"] == [gid] and run.report["rolled_back"] == []
    elif expected == "committed":  # during COMMIT PREPARED: done by it or by recovery
        assert run.report["rolled_back"] == []
    elif expected == "nothing":
        assert run.acted == []

    verdict = lab.check(op_ids("op"), log)
    assert {"op-0", "op-1"} <= verdict.committed
    if expected in ("rolled_back", "nothing"):
        assert "op-2" in verdict.rolled_back
    elif expected == "committed":
        assert "op-2" in verdict.committed
    elif gid in ours:  # in flight: either outcome, as long as both sides agree (above)
        assert (gid in run.report["committed"]) == ("op-2" in verdict.committed)
        assert (gid in run.report["rolled_back"]) == ("op-2" in verdict.rolled_back)
    else:  # the kill came only after COMMIT PREPARED
        assert run.acted == [] and "op-2" in verdict.committed

    # Running again finds nothing to do.
    again = lab.recover()
    assert again.returncode == 0 and again.acted == [] and again.report["remaining"] == []


# -- foreign prepared transactions ------------------------------------------------------


def _prepare(dsn: str, gid: str, statement: str = "SELECT 1") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(statement)
        conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))


def test_foreign_prepared_transactions_stay_untouched(lab: Crashes) -> None:
    env = lab.env
    env.execute("CREATE TABLE foreign_t (x int)")
    foreign = f"foreign-{uuid.uuid4().int % 1000}"
    other_name = str(Gid.new(f"other{env.name}", env.instance, 0, 0, 0, "0" * 12))
    _prepare(env.dsn, foreign, "INSERT INTO foreign_t VALUES (1)")
    _prepare(env.dsn, other_name, "INSERT INTO foreign_t VALUES (2)")
    # A gid of exactly our format and name, in another database.
    other_db = f"t_other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(env.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other_db)))
    other_dsn = make_conninfo(env.admin_dsn, dbname=other_db)
    ours_elsewhere = str(Gid.new(env.name, env.instance, 0, 0, 0, "0" * 12))
    try:
        _prepare(other_dsn, ours_elsewhere)
        log = lab.crash(prefix="op", crash_at="after_commit")
        gid = crash_gid(log)

        run = lab.recover()
        assert run.returncode == 0, run
        assert run.report["committed"] == [gid]
        assert run.acted == [gid]
        assert sorted(lab.prepared()) == sorted([foreign, other_name])
        assert prepared_gids(other_dsn) == [ours_elsewhere]
        lab.check(op_ids("op"), log)
    finally:
        drop_database(env.admin_dsn, other_dsn, other_db)


# -- two recovery processes at the same moment ------------------------------------------


def test_two_recovery_processes_at_once(lab: Crashes) -> None:
    env = lab.env
    # Real crashes of two instances at once (one with, one without a decision; one of
    # each driver)...
    pa, oa = lab.start_worker(prefix="ka", crash_at="after_prepare", instance="ka",
                              driver="async")
    pb, ob = lab.start_worker(prefix="kb", crash_at="after_commit", instance="kb",
                              driver="sync")
    logs = [lab.wait_worker(pa, oa, killed=True), lab.wait_worker(pb, ob, killed=True)]
    assert_crashed_in_driver(logs[0], "async")
    assert_crashed_in_driver(logs[1], "sync")
    # ... plus 20 simulated ones of a third instance.
    coord = env.coordinator(instance="kc", producers=2, on_step=indoubt.on_step)
    insert = sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(sql.Identifier(lab.table))
    gids: dict[str, str] = {}
    for k in range(20):
        op = f"kc-{k}"
        mode = "after_commit" if k % 2 else "before_commit"
        msgs = [(lab.topic, op.encode(), json.dumps({"op": op, "n": n}, sort_keys=True)
                 .encode()) for n in range(2)]
        gids[op] = indoubt.make_in_doubt(coord, mode, insert, (op,), msgs)
    coord.close()
    all_gids = {*(crash_gid(lg) for lg in logs), *gids.values()}
    assert set(lab.prepared()) == all_gids

    procs = [lab.start_recovery(), lab.start_recovery()]
    runs = [Crashes.finish_recovery(p) for p in procs]
    for run in runs:
        assert run.returncode == 0, run
        assert run.report["remaining"] == []
    acted = [g for run in runs for g in run.acted]
    assert len(acted) == len(set(acted)), "a gid was acted on twice"
    assert set(acted) == all_gids
    for a, b in ((runs[0], runs[1]), (runs[1], runs[0])):
        assert not set(a.report["committed"]) & set(b.report["rolled_back"])
    lab.check([*op_ids("ka"), *op_ids("kb"), *gids], merge_logs(logs), gids)


# -- the zombie ---------------------------------------------------------------------------


def _wait_stopped(proc: subprocess.Popen[bytes], out: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T" and read_log(out).crash is not None:
            return
        assert proc.poll() is None, "the worker ended instead of stopping"
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.05)


@pytest.mark.parametrize("driver", DRIVERS)
def test_zombie_coordinator_cannot_commit_after_recovery(lab: Crashes, driver: str) -> None:
    proc, out = lab.start_worker(prefix="z", ops=2, crash_at="none",
                                 extra=["--sigstop-before-commit"], driver=driver)
    _wait_stopped(proc, out)
    assert_crashed_in_driver(read_log(out), driver)
    crash = read_log(out).crash
    assert crash is not None and crash["point"] == "stop" and crash["op"] == "z-1"
    gid = crash["gid"]
    assert lab.prepared() == [gid]

    run = lab.recover()
    assert run.returncode == 0, run
    assert run.report["rolled_back"] == [gid]
    assert run.report["fenced_transactional_ids"] == [parse(gid).transactional_id]
    assert lab.prepared() == []

    os.kill(proc.pid, signal.SIGCONT)
    log = lab.wait_worker(proc, out, killed=False)
    told = log.ops["z-1"]
    assert told["told"] in ("unknown", "error", "rolled_back"), told
    assert told["told"] != "committed"
    # Its messages reached the log but stay invisible: the fence aborted their transaction.
    uncommitted = {json.loads(r.value or b"")["op"] for r in
                   read_uncommitted(lab.env.bootstrap, lab.topic)}
    assert "z-1" in uncommitted
    assert "z-1" not in {json.loads(r.value or b"")["op"] for r in
                         read_committed(lab.env.bootstrap, lab.topic)}
    verdict = lab.check(op_ids("z", 2), log)
    assert verdict.committed == {"z-0"} and verdict.rolled_back == {"z-1"}
    assert "z-1" not in lab.rows()
