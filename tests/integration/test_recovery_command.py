"""The recovery command after real crashes (``tests/integration/crash_lab.py``): the grace
period, an unreachable decision topic, ``--dry-run`` and ``list`` change nothing they
should not; ``recover_own`` at coordinator start-up resolves the instance's own earlier
gids without fencing the live coordinator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from psycopg import sql

import recovery
from coordinator import Status
from coordinator.decision_log import partition_for
from tests.crash.checker import WorkerLog, merge_logs
from tests.integration.crash_lab import ROOT, Crashes, crash_gid, crash_lab, op_ids

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def lab(env: Env, tmp_path: Path) -> Iterator[Crashes]:
    with crash_lab(env, tmp_path) as c:
        yield c


# -- grace period, unreachable decision topic, dry run, list ------------------------------


def test_grace_period_respected(lab: Crashes) -> None:
    log = lab.crash(prefix="g", crash_at="after_prepare")
    gid = crash_gid(log)
    run = lab.recover(grace=3600)
    assert run.returncode == 0, run
    assert run.report["waiting"] == [gid]
    assert run.acted == [] and run.report["remaining"] == []
    assert lab.prepared() == [gid]
    assert run.report.get("fenced_transactional_ids", []) == []

    final = lab.recover()
    assert final.returncode == 0 and final.report["rolled_back"] == [gid]
    lab.check(op_ids("g"), log)


def _crash_pair(lab: Crashes, a: str = "pa", b: str = "pb"
                ) -> tuple[list[WorkerLog], str, str]:
    """Two crashed instances ``a`` and ``b`` (also their op prefixes): ``a`` without a
    decision (its Kafka transaction left open), ``b`` with a committed decision.
    Returns their logs and (undecided gid, decided gid)."""
    pa, oa = lab.start_worker(prefix=a, crash_at="after_prepare", instance=a)
    pb, ob = lab.start_worker(prefix=b, crash_at="after_commit", instance=b)
    logs = [lab.wait_worker(pa, oa, killed=True), lab.wait_worker(pb, ob, killed=True)]
    undecided, decided = (crash_gid(lg) for lg in logs)
    assert sorted(lab.prepared()) == sorted([undecided, decided])
    return logs, undecided, decided


def test_decision_topic_unreachable_changes_nothing(lab: Crashes) -> None:
    # pa and pb share decision partition 1: pb's decision sits behind pa's open
    # transaction, so the final run must fence pa before it can read it.
    assert partition_for("pa", 0, 3) == partition_for("pb", 0, 3)
    logs, undecided, decided = _crash_pair(lab, "pa", "pb")
    rows = lab.rows()
    run = lab.recover(bootstrap="127.0.0.1:1")
    assert run.returncode == 1, run
    assert sorted(run.report["remaining"]) == sorted([undecided, decided])
    assert run.acted == []
    assert sorted(lab.prepared()) == sorted([undecided, decided])
    assert lab.rows() == rows

    final = lab.recover()
    assert final.returncode == 0, final
    assert final.report["committed"] == [decided]
    assert final.report["rolled_back"] == [undecided]
    lab.check([*op_ids("pa"), *op_ids("pb")], merge_logs(logs))


def test_dry_run_changes_nothing(lab: Crashes) -> None:
    # Different decision partitions (0 and 2): the decided gid's record is readable
    # without fencing, despite the other instance's open transaction.
    assert partition_for("ka", 0, 3) != partition_for("kb", 0, 3)
    logs, undecided, decided = _crash_pair(lab, "ka", "kb")
    rows = lab.rows()
    run = lab.recover("--dry-run")
    assert run.returncode == 1, run  # a dry run leaves everything in doubt
    assert run.report["dry_run"] is True
    assert run.report["committed"] == [decided]  # would commit: its decision is visible
    assert run.report["rolled_back"] == []  # no fence in a dry run, so no conclusion
    assert run.report["remaining"] == [undecided]
    assert run.report["fenced_transactional_ids"] == []
    assert sorted(lab.prepared()) == sorted([undecided, decided])
    assert lab.rows() == rows

    final = lab.recover()
    assert final.returncode == 0, final
    assert final.report["committed"] == [decided]
    assert final.report["rolled_back"] == [undecided]
    lab.check([*op_ids("ka"), *op_ids("kb")], merge_logs(logs))


def test_list_shows_in_doubt_with_age(lab: Crashes) -> None:
    log = lab.crash(prefix="l", crash_at="after_commit")
    gid = crash_gid(log)

    def run_list(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "recovery", "list", "--postgres", lab.env.dsn,
               "--name", lab.env.name, *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)

    done = run_list("--json", "--grace-seconds", "3600")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["in_doubt"]
    assert [t["gid"] for t in listed] == [gid]
    assert listed[0]["age_seconds"] >= 0 and listed[0]["past_grace"] is False

    done = run_list("--grace-seconds", "0")
    assert done.returncode == 1, done.stderr  # one past the grace period
    assert gid in done.stdout and "1 in-doubt transaction" in done.stdout
    assert lab.prepared() == [gid]  # list changed nothing

    assert lab.recover().report["committed"] == [gid]
    lab.check(op_ids("l"), log)


# -- recover_own: a restarted coordinator resolves its own earlier gids ----------------------


def test_recover_own_at_startup_does_not_fence_the_live_coordinator(lab: Crashes) -> None:
    env = lab.env
    # Two incarnations of one instance crash: without, then with a decision.
    log1 = lab.crash(prefix="r1", crash_at="after_prepare")
    log2 = lab.crash(prefix="r2", crash_at="after_commit")
    undecided = crash_gid(log1)
    decided = crash_gid(log2)
    assert sorted(lab.prepared()) == sorted([undecided, decided])

    # The instance restarts; default grace period (60 s) -- its own gids need none.
    coord = env.coordinator(producers=1)
    report = recovery.recover_own(coord, env.kafka)
    assert report.committed == [decided]
    assert report.rolled_back == [undecided]
    assert report.fenced == [] and report.remaining == []
    assert lab.prepared() == []

    # The live coordinator was not fenced: it still commits.
    tx = coord.transaction()
    with tx:
        tx.execute(sql.SQL("INSERT INTO {} (op_id) VALUES (%s)").format(
            sql.Identifier(lab.table)), ("live-0",))
        for n in range(2):
            tx.produce(lab.topic, key="live-0", value=json.dumps({"op": "live-0", "n": n},
                                                                 sort_keys=True))
    assert tx.status is Status.COMMITTED
    lab.check([*op_ids("r1"), *op_ids("r2"), "live-0"], merge_logs([log1, log2]),
              {"live-0": tx.gid or ""})
