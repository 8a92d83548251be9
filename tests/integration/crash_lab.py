"""The crash lab of the recovery tests: coordinator processes (``tests/crash/worker.py``)
killed with SIGKILL at a protocol point, the recovery command run as a subprocess, and
the checks of ``tests/crash/checker.py``. Used by ``test_recovery_crashes.py`` and
``test_recovery_command.py``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from tests.crash.checker import (
    Verdict,
    WorkerLog,
    check,
    prepared_gids,
    read_log,
    wait_backends_gone,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

__all__ = ["ROOT", "Crashes", "RecoveryRun", "crash_gid", "crash_lab", "op_ids"]

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
                     instance: str | None = None, extra: Sequence[str] = (),
                     driver: str = "sync") -> tuple[subprocess.Popen[bytes], Path]:
        """Start a worker; ``driver``: ``sync`` (Coordinator) or ``async``
        (AsyncCoordinator, ``tests.crash.worker --driver async``)."""
        out = self.tmp / f"{prefix}.jsonl"
        args = [
            sys.executable, "-m", "tests.crash.worker",
            "--postgres", self.env.dsn, "--bootstrap", self.env.bootstrap,
            "--name", self.env.name, "--instance", instance or self.env.instance,
            "--topic", self.topic, "--table", self.table, "--ops", str(ops),
            "--op-prefix", prefix, "--crash-at", crash_at,
            "--decision-topic", self.env.decision_topic.name,
            "--decision-partitions", str(self.env.decision_topic.partitions),
            "--out", str(out), "--driver", driver, *extra,
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
              instance: str | None = None, extra: Sequence[str] = (),
              driver: str = "sync") -> WorkerLog:
        """Run a worker that SIGKILLs itself at ``crash_at`` in its last op."""
        proc, out = self.start_worker(prefix=prefix, crash_at=crash_at, ops=ops,
                                      instance=instance, extra=extra, driver=driver)
        log = self.wait_worker(proc, out, killed=crash_at != "none")
        if crash_at != "none":
            crash = log.crash
            assert crash is not None and crash["point"] == crash_at
            assert crash["op"] == f"{prefix}-{ops - 1}"
            start = next(ln for ln in log.lines if ln.get("event") == "start")
            assert start["driver"] == driver, start
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


@contextlib.contextmanager
def crash_lab(env: Env, tmp: Path) -> Iterator[Crashes]:
    """A lab with its own table (``op_id text PRIMARY KEY``) and a 2-partition business
    topic; every worker still running at the end is killed."""
    table = f"ops_{uuid.uuid4().hex[:8]}"
    env.execute(sql.SQL("CREATE TABLE {} (op_id text PRIMARY KEY)").format(
        sql.Identifier(table)))
    c = Crashes(env=env, tmp=tmp, table=table, topic=env.topic(partitions=2))
    try:
        yield c
    finally:
        c.stop_all()
