"""The consume path with real processes: each input message gives exactly one row and
one output message when a stage is killed (``kill -9``) at every step of the protocol,
when the broker is killed and restarted under it, when two or three stages rebalance
partitions among themselves (one of them killed), and when a stage is frozen past its
session timeout (a zombie) and then resumed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import recovery
from recovery import RecoveryConfig
from tests.integration.consume import Pipeline, pipeline
from tests.plugins import stack

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


class Stages:
    """The test's consumer processes (tests/crash/consumer_worker.py)."""

    def __init__(self, env: Env, p: Pipeline) -> None:
        self.env, self.p = env, p
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, instance: str, at: str | None = None, after: int = 1
              ) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "tests.crash.consumer_worker", "--postgres", self.env.dsn,
               "--bootstrap", self.env.bootstrap, "--name", self.env.name, "--instance",
               instance, "--group", self.p.group, "--source", self.p.source, "--sink",
               self.p.sink, "--decision-topic", self.env.decision_topic.name]
        if at is not None:
            cmd += ["--at", at, "--after", str(after)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert self.line(proc) == "ready"
        return proc

    @staticmethod
    def line(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def wait_rows(self, n: int, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.p.rows().values()) < n:
            assert time.monotonic() < deadline, f"{sum(self.p.rows().values())} of {n} rows"
            time.sleep(0.3)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()

    def finish(self, keys: list[str]) -> None:
        """Stop every stage, resolve what is left in doubt, check exactly once."""
        self.stop_all()
        report = recovery.recover(self.env.dsn, self.env.kafka, self.env.name,
                                  RecoveryConfig(grace_seconds=0))
        assert report.remaining == []
        assert self.env.prepared() == []
        self.p.assert_exactly_once(keys)
        per = len(keys) // self.p.partitions
        assert self.p.committed() == dict.fromkeys(range(self.p.partitions), per)


@pytest.fixture
def stages(env: Env) -> Iterator[Stages]:
    s = Stages(env, pipeline(env))
    try:
        yield s
    finally:
        s.stop_all()


@pytest.mark.parametrize("step", ["before_prepare", "after_prepare", "commit",
                                  "after_kafka_commit"])
def test_kill_at_every_step(stages: Stages, step: str) -> None:
    keys = stages.p.feed(150)
    killed = stages.start("w0", at=f"{step}:kill", after=3)
    assert stages.line(killed).startswith(f"step {step}")
    assert killed.wait(30) == -signal.SIGKILL
    stages.start("w0")  # the same instance comes back: recover_own, then on
    stages.wait_rows(150)
    stages.finish(keys)


@pytest.mark.parametrize("n", [2, 3])
def test_stages_rebalancing_one_killed(stages: Stages, n: int) -> None:
    keys = stages.p.feed(300, prefix="a")
    first = [stages.start(f"w{i}") for i in range(n)]
    stages.wait_rows(60)
    first[-1].kill()  # its partitions move to the others after the session timeout
    first[-1].wait(30)
    keys += stages.p.feed(150, prefix="b")
    stages.wait_rows(450)
    stages.finish(keys)


def test_broker_restart_under_a_stage(stages: Stages) -> None:
    """SIGKILL of the (single) broker while a stage runs, then a restart: in-flight
    transactions fail or end in doubt, recovery (run here as its job would) decides
    them, the stage carries on; still exactly once."""
    local = stack.local_kafka()
    if local != stages.env.bootstrap:
        pytest.skip(f"restarts a broker: only against the local stack (scripts/stack): the "
                    f"tests use {stages.env.bootstrap!r}, the local stack is {local!r}")
    keys = stages.p.feed(300)
    stages.start("w0")
    stages.wait_rows(60)
    done = threading.Event()

    def recovery_job() -> None:  # what the scheduled recovery job does, every 2 s
        while not done.wait(2.0):
            with contextlib.suppress(Exception):
                recovery.recover(stages.env.dsn, stages.env.kafka, stages.env.name,
                                 RecoveryConfig(grace_seconds=5))

    job = threading.Thread(target=recovery_job, daemon=True)
    job.start()
    try:
        stack.kill_kafka()
        time.sleep(3)
        stack.start_kafka()
        deadline = time.monotonic() + 180
        while sum(stages.p.rows().values()) < 300:
            assert time.monotonic() < deadline, "the stage did not finish after the restart"
            if stages.procs[-1].poll() is not None:  # died of the outage: an orchestrator
                stages.start("w0")                   # would start it again
            time.sleep(0.5)
    finally:
        done.set()
        job.join(60)
    stages.finish(keys)


def test_zombie_stage_is_fenced_by_the_group(stages: Stages) -> None:
    keys = stages.p.feed(150)
    zombie = stages.start("w0", at="after_prepare:stop", after=2)
    assert stages.line(zombie).startswith("step after_prepare")
    stages.start("w1")  # takes the partitions once the zombie's session times out
    time.sleep(10)  # past session.timeout.ms (6 s): the group moved on
    os.kill(zombie.pid, signal.SIGCONT)  # its offsets' generation is stale: fenced
    stages.wait_rows(150)
    stages.finish(keys)
