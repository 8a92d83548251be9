"""Recovery after real crashes: a coordinator process is killed with SIGKILL at a protocol
point (``tests/crash/worker.py``), then the recovery command runs as a subprocess.

After recovery, for every operation: its PostgreSQL row is committed <=> its messages
are visible to a read_committed consumer <=> its decision record is visible; no message
twice; no prepared transaction of ours left (``tests/crash/checker.py``).

Also: foreign prepared transactions stay untouched, two recoveries at the same moment
act once per gid, a zombie coordinator (SIGSTOP before its Kafka commit) cannot commit
after recovery fenced it, the grace period, an unreachable decision topic, ``--dry-run``,
``list``, and ``recover_own`` at coordinator start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import recovery
from coordinator import Status
from coordinator.decision_log import partition_for
from coordinator.gid import Gid, parse
from tests.crash import indoubt
from tests.crash.checker import (
    Verdict,
    WorkerLog,
    check,
    merge_logs,
    prepared_gids,
    read_log,
    wait_backends_gone,
)
from tests.plugins.kafka_helpers import read_committed, read_uncommitted
from tests.plugins.services import drop_database

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"committed", "rolled_back", "remaining"}
WORKER_TIMEOUT = 120.0
RECOVERY_TIMEOUT = 180.0


@dataclass
class RecoveryRun:
    returncode: int
    report: dict[str, Any]
    stderr: str

    @property
    def acted(self) -> list[str]:
        return [*self.report["committed"], *self.report["rolled_back"]]


@dataclass
class Crashes:
    """One test's crash lab: its table, business topic, workers and recovery runs."""

    env: Env
    tmp: Path
    table: str
    topic: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- workers ------------------------------------------------------------------

    def start_worker(self, *, prefix: str, crash_at: str = "none", ops: int = 3,
                     instance: str | None = None, extra: Sequence[str] = ()
                     ) -> tuple[subprocess.Popen[bytes], Path]:
        out = self.tmp / f"{prefix}.jsonl"
        args = [
            sys.executable, "-m", "tests.crash.worker",
            "--postgres", self.env.dsn, "--bootstrap", self.env.bootstrap,
            "--name", self.env.name, "--instance", instance or self.env.instance,
            "--topic", self.topic, "--table", self.table, "--ops", str(ops),
            "--op-prefix", prefix, "--crash-at", crash_at,
            "--decision-topic", self.env.decision_topic.name,
            "--decision-partitions", str(self.env.decision_topic.partitions),
            "--out", str(out), *extra,
        ]
        with open(self.tmp / f"{prefix}.stderr", "wb") as err:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append(proc)
        return proc, out

    def wait_worker(self, proc: subprocess.Popen[bytes], out: Path, *,
                    killed: bool) -> WorkerLog:
        rc = proc.wait(WORKER_TIMEOUT)
        log = read_log(out)
        stderr = (out.with_suffix(".stderr")).read_text(errors="replace")
        if killed:
            assert rc == -signal.SIGKILL, f"worker exit {rc}, expected SIGKILL\n{stderr}"
            assert log.crash is not None, f"worker died before its crash point\n{stderr}"
        else:
            assert rc == 0, f"worker exit {rc}\n{stderr}"
            assert log.ended
        # The killed client's backends end when they see the closed socket; until then
        # they hold locks, and a COMMIT PREPARED they were running is still in progress.
        wait_backends_gone(self.env.admin_dsn, self.env.dbname)
        return log

    def crash(self, *, prefix: str, crash_at: str, ops: int = 3,
              instance: str | None = None, extra: Sequence[str] = ()) -> WorkerLog:
        """Run a worker that SIGKILLs itself at ``crash_at`` in its last op."""
        proc, out = self.start_worker(prefix=prefix, crash_at=crash_at, ops=ops,
                                      instance=instance, extra=extra)
        log = self.wait_worker(proc, out, killed=crash_at != "none")
        if crash_at != "none":
            crash = log.crash
            assert crash is not None and crash["point"] == crash_at
            assert crash["op"] == f"{prefix}-{ops - 1}"
            # Every op before the crash committed normally.
            for k in range(ops - 1):
                assert log.ops[f"{prefix}-{k}"]["told"] == "committed", log.lines
        return log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)

    # -- recovery -----------------------------------------------------------------

    def recovery_args(self, *extra: str, grace: float = 0, bootstrap: str | None = None,
                      command: str | None = None) -> list[str]:
        return [
            sys.executable, "-m", "recovery", *([command] if command else []),
            "--postgres", self.env.dsn,
            "--bootstrap-servers", bootstrap or self.env.bootstrap,
            "--name", self.env.name,
            "--decision-topic", self.env.decision_topic.name,
            "--grace-seconds", str(grace), "--json", *extra,
        ]

    def start_recovery(self, *extra: str, grace: float = 0, bootstrap: str | None = None
                       ) -> subprocess.Popen[str]:
        return subprocess.Popen(self.recovery_args(*extra, grace=grace, bootstrap=bootstrap),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    @staticmethod
    def finish_recovery(proc: subprocess.Popen[str]) -> RecoveryRun:
        try:
            stdout, stderr = proc.communicate(timeout=RECOVERY_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        try:
            report = json.loads(stdout)
        except ValueError:
            raise AssertionError(f"recovery (exit {proc.returncode}) printed no JSON:\n"
                                 f"{stdout}\n{stderr}") from None
        assert set(report) >= JSON_KEYS, report
        for key in JSON_KEYS:
            assert isinstance(report[key], list), report
        return RecoveryRun(proc.returncode, report, stderr)

    def recover(self, *extra: str, grace: float = 0, bootstrap: str | None = None
                ) -> RecoveryRun:
        return self.finish_recovery(self.start_recovery(*extra, grace=grace,
                                                        bootstrap=bootstrap))

    # -- checks -------------------------------------------------------------------

    def check(self, op_ids: Sequence[str], log: WorkerLog | None = None,
              gids: dict[str, str] | None = None) -> Verdict:
        v = check(dsn=self.env.dsn, bootstrap=self.env.bootstrap, name=self.env.name,
                  table=self.table, topic=self.topic,
                  decision_topic=self.env.decision_topic.name, op_ids=op_ids, log=log,
                  gids=gids)
        v.assert_ok()
        return v

    def rows(self) -> list[str]:
        return [r[0] for r in self.env.execute(
            sql.SQL("SELECT op_id FROM {} ORDER BY op_id").format(sql.Identifier(self.table)))]

    def prepared(self) -> list[str]:
        return prepared_gids(self.env.dsn)


def crash_gid(log: WorkerLog) -> str:
    crash = log.crash
    assert crash is not None and crash["gid"], log.lines
    return str(crash["gid"])


def op_ids(prefix: str, n: int = 3) -> list[str]:
    return [f"{prefix}-{k}" for k in range(n)]


@pytest.fixture
def lab(env: Env, tmp_path: Path) -> Iterator[Crashes]:
    table = f"ops_{uuid.uuid4().hex[:8]}"
    env.execute(sql.SQL("CREATE TABLE {} (op_id text PRIMARY KEY)").format(
        sql.Identifier(table)))
    c = Crashes(env=env, tmp=tmp_path, table=table, topic=env.topic(partitions=2))
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def crash_in_process() -> Iterator[None]:
    """Let ``indoubt.make_in_doubt`` simulate crashes at the Kafka commit in-process."""
    undo = indoubt.install()
    try:
        yield
    finally:
        undo()


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
def test_kill_then_recovery_command(lab: Crashes, point: str, expected: str | None,
                                    delay_us: int) -> None:
    log = lab.crash(prefix="op", crash_at=point, extra=["--kill-delay-us", str(delay_us)])
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


def test_two_recovery_processes_at_once(lab: Crashes, crash_in_process: None) -> None:
    env = lab.env
    # Real crashes of two instances at once (one with, one without a decision)...
    pa, oa = lab.start_worker(prefix="ka", crash_at="after_prepare", instance="ka")
    pb, ob = lab.start_worker(prefix="kb", crash_at="after_commit", instance="kb")
    logs = [lab.wait_worker(pa, oa, killed=True), lab.wait_worker(pb, ob, killed=True)]
    # ... plus 20 simulated ones of a third instance.
    coord = env.coordinator(instance="kc", producers=2)
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


def test_zombie_coordinator_cannot_commit_after_recovery(lab: Crashes) -> None:
    proc, out = lab.start_worker(prefix="z", ops=2, crash_at="none",
                                 extra=["--sigstop-before-commit"])
    _wait_stopped(proc, out)
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
