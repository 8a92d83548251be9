"""Process supervision: each phase's client processes (``tests/faults/workload.py``),
started, watched and started again after a kill (with the same instance id, as an
orchestrator would), with the phase's injectors and recovery loops alongside."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import logtail
from .injectors import CYCLES, ENV_KINDS, Injector
from .pipeline import Pipeline, PipelinePhase
from .recoveries import Recoveries
from .report import Journal, say
from .settings import (
    NAME,
    OVERSIZE_LIMIT,
    PACED_KINDS,
    PIPELINE_KINDS,
    PYTHON,
    ROOT,
    STORM_KINDS,
    CampaignError,
    Settings,
)
from .stack import Services, clock_skew_env, heal, kill_broker, stop_postgres
from .toxiproxy import Toxiproxy

__all__ = ["Campaign", "Slot"]


@dataclass
class Slot:
    index: int
    instance: str
    plan: Path
    log: Path
    stderr: Path
    recover_own: bool
    proc: subprocess.Popen[bytes] | None = None
    err: IO[bytes] | None = None
    done: bool = False
    restart_at: float = 0.0
    starts: int = 0
    failures_in_a_row: int = 0
    killed: int = 0
    ready: bool = False
    """The current process has opened its coordinator (its ``start`` record is logged)."""
    log_pos: int = 0
    command: list[str] | None = None
    """The process's command line; None: the workload's (:meth:`Campaign._command`)."""


class Campaign:
    """The phases: their client processes, supervised and restarted, their injectors; the
    :class:`~tests.faults.injectors.Lab` the injectors act through."""

    def __init__(self, s: Settings, services: Services, table: str, topic: str,
                 decision_topic: str, out: Path, journal: Journal,
                 recoveries: Recoveries) -> None:
        self.s = s
        self.services = services
        self.table = table
        self.topic = topic
        self.decision_topic = decision_topic
        self.out = out
        self.journal = journal
        self.recoveries = recoveries
        self.brokers = s.brokers
        self.toxiproxy = Toxiproxy(services.toxiproxy_url)
        self.storm_grace = s.storm_grace
        self.slots: list[Slot] = []
        self._lock = threading.Lock()
        self._pace = 0.0
        self.stopped: set[int] = set()
        """Worker pids this process stopped (SIGSTOP) and has not continued yet."""
        self.skew_env: dict[str, dict[str, str]] = {}
        """instance -> environment that runs it under libfaketime (clock-skew phase)."""
        self.pipeline: Pipeline | None = None
        """The pipeline workload's table and topics (when a pipeline phase is planned)."""

    # -- Lab protocol (injectors) --------------------------------------------------------

    def event(self, fault: str, **detail: object) -> None:
        self.journal.event(fault, **detail)

    def alive_workers(self, ready_only: bool = True) -> list[tuple[str, int]]:
        """Running worker processes; ``ready_only``: those past their start-up. A pipeline
        stage waiting for recovery to decide an unknown outcome is left out: the wait is
        what is under test (does recovery's grace period let it go on?), so the injectors
        do not kill or freeze it."""
        with self._lock:
            return [(sl.instance, sl.proc.pid) for sl in self.slots
                    if sl.proc is not None and sl.proc.poll() is None
                    and (sl.ready or not ready_only) and not logtail.waiting(sl.log)]

    def in_attempt(self, instance: str) -> bool:
        """Whether the worker's last log record says it is inside an attempt."""
        sl = next((x for x in self.slots if x.instance == instance), None)
        return sl is not None and logtail.in_attempt(sl.log)

    def kill_worker(self, instance: str, pid: int) -> bool:
        """SIGKILL the worker process ``pid`` if it is still that slot's live process."""
        with self._lock:
            sl = next((x for x in self.slots if x.instance == instance), None)
            if sl is None or sl.proc is None or sl.proc.pid != pid or sl.proc.poll() is not None:
                return False
            sl.proc.kill()
            return True

    def pause_worker(self, instance: str, pid: int, seconds: float) -> bool:
        """SIGSTOP the worker process ``pid`` (if it is still that slot's live process) for
        ``seconds``, then SIGCONT it."""
        with self._lock:
            sl = next((x for x in self.slots if x.instance == instance), None)
            if sl is None or sl.proc is None or sl.proc.pid != pid or sl.proc.poll() is not None:
                return False
            os.kill(pid, signal.SIGSTOP)
            self.stopped.add(pid)
        try:
            time.sleep(seconds)
        finally:
            self._continue(pid)
        return True

    def _continue(self, pid: int) -> None:
        with self._lock:
            self.stopped.discard(pid)
            sl = next((x for x in self.slots if x.proc is not None and x.proc.pid == pid),
                      None)
            if sl is not None and sl.proc is not None and sl.proc.poll() is None:
                os.kill(pid, signal.SIGCONT)

    def continue_all(self) -> None:
        """SIGCONT every live worker: those this process stopped, and those that stopped
        themselves at an armed pause (their waker would wake them too)."""
        with self._lock:
            procs = [sl.proc for sl in self.slots if sl.proc is not None]
            self.stopped.clear()
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)

    def kill_broker_now(self, broker: int) -> None:
        kill_broker(self.s.stack_dir, broker)

    def stop_postgres_now(self) -> None:
        stop_postgres(self.s.stack_dir)

    # -- workers -------------------------------------------------------------------------

    def _command(self, sl: Slot) -> list[str]:
        if sl.command is not None:
            return sl.command
        cmd = [PYTHON, "-m", "tests.faults.workload", "--plan", str(sl.plan), "--log", str(sl.log),
               "--postgres", self.services.proxy_dsn, "--bootstrap",
               self.services.proxy_bootstrap, "--name", NAME, "--instance", sl.instance,
               "--topic", self.topic, "--table", self.table, "--decision-topic",
               self.decision_topic, "--messages-per-op", str(self.s.messages_per_op),
               "--pace", str(self._pace), "--threads", str(self.s.threads),
               "--oversize-bytes", str(2 * OVERSIZE_LIMIT), "--driver", self.s.driver]
        if self.s.group_commit:
            # One producer: every transaction of the process in flight together shares
            # its Kafka transaction.
            cmd += ["--group-commit", "--producers", "1"]
        if sl.recover_own:
            cmd.append("--recover-own")
        if sl.instance in self.skew_env:
            # Its clock is skewed on purpose: the coordinator's start-up check would refuse.
            cmd.append("--no-clock-check")
        return cmd

    def _start(self, sl: Slot) -> None:
        if sl.err is None:
            sl.err = sl.stderr.open("ab")
        sl.ready = False
        sl.log_pos = sl.log.stat().st_size if sl.log.exists() else 0
        env = {**os.environ, **self.skew_env.get(sl.instance, {})}
        sl.proc = subprocess.Popen(self._command(sl), cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=sl.err, stderr=sl.err, env=env)
        sl.starts += 1

    def run_phase(self, idx: int, kind: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.s
        self.journal.phase = kind
        self.journal.faults_per_kind.setdefault(kind, 0)
        pdir = self.out / f"phase-{idx:02d}"
        pdir.mkdir(parents=True, exist_ok=True)
        env_fault = kind in ENV_KINDS or kind in PACED_KINDS
        self.skew_env = clock_skew_env(s) if kind == "clock-skew" else {}
        # Faults come in cycles through the phase: the operations are spread over it.
        self._pace = ((s.phase_seconds * s.workers * s.threads / max(1, len(ops)))
                      if env_fault else 0.0)
        pipe: PipelinePhase | None = None
        if kind in PIPELINE_KINDS:
            assert self.pipeline is not None
            pipe = self.pipeline.phase(idx, kind, ops, pdir)
            self._pace = 0.0
            slots = [Slot(k, inst, plan, log, err, recover_own=k % 2 == 0,
                          command=pipe.command(inst, plan, log, k % 2 == 0))
                     for k, (inst, plan, log, err) in enumerate(pipe.stage_plans())]
            what = f"{len(ops)} input messages, {len(slots)} stages"
        else:
            slots = self._workload_slots(ops, pdir)
            unit = "tasks" if s.driver == "async" else "threads"
            what = (f"{len(ops)} ops, {s.workers} workers"
                    + (f" ({s.driver})" if s.driver != "sync" else "")
                    + (f" x {s.threads} {unit}" if s.threads > 1 else "")
                    + (f", pace {self._pace:.2f} s/op/worker" if self._pace else ""))
        with self._lock:
            self.slots = slots
        started = time.monotonic()
        say(f"phase {idx + 1}/{len(s.faults)}: {kind}: {what}")
        for sl in slots:
            self._start(sl)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        # pipeline: random kill -9 besides the armed kills; pipeline-mixed: as mixed.
        loop_kind = {"pipeline": "kill-random", "pipeline-mixed": "mixed"}.get(kind, kind)
        if loop_kind in CYCLES or loop_kind == "mixed":
            rng = random.Random(f"{s.seed}/{idx}/{kind}")
            injector = Injector(self, rng, stop, calm={"pipeline": 3.0,
                                                       "pipeline-mixed": 2.0}.get(kind, 1.0))
            for n in range(2 if loop_kind == "mixed" else 1):
                t = threading.Thread(target=injector.loop, args=(loop_kind,), daemon=True,
                                     name=f"inject-{kind}-{n}")
                t.start()
                threads.append(t)
        if kind in STORM_KINDS:
            t = threading.Thread(target=self.recoveries.storm_loop, args=(stop,), daemon=True,
                                 name="recovery-storm")
            t.start()
            threads.append(t)
        if kind == "operator-mistake":
            t = threading.Thread(target=self.recoveries.mistake_loop, args=(stop, idx), daemon=True,
                                 name="operator-mistakes")
            t.start()
            threads.append(t)
        deadline = started + max(300.0, 6 * s.phase_seconds) + 2.0 * len(ops)
        timed_out = False
        if pipe is not None:
            pipe.start_feeder()
        try:
            while not (pipe.finished() if pipe is not None else all(sl.done for sl in slots)):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                self._supervise(slots)
                if pipe is not None:
                    self._probe(slots, pipe)
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(400)
            self.continue_all()
            if pipe is not None:
                pipe.close()
                self._stop_stages(slots)
            if kind == "clock-skew":
                self._check_skew(slots)
            if kind in STORM_KINDS:
                self.event("storm", runs=self.recoveries.storm_runs[kind], counts=False)
            for sl in slots:
                if sl.proc is not None and sl.proc.poll() is None:
                    sl.proc.kill()
                    sl.proc.wait()
                if sl.err is not None:
                    sl.err.close()
            heal(s, self.services.toxiproxy_url)
        elapsed = time.monotonic() - started
        restarts = sum(sl.starts - 1 for sl in slots)
        say(f"phase {kind} done in {elapsed:.0f} s: {restarts} restarts"
            f", {self.journal.faults_per_kind.get(kind, 0)} injected faults"
            + (" -- TIMED OUT" if timed_out else ""))
        info = {"phase": kind, "seconds": round(elapsed, 1), "restarts": restarts,
                "timed_out": timed_out}
        if pipe is not None:
            info["pipeline"] = pipe.info()
        return info

    def _probe(self, slots: list[Slot], pipe: PipelinePhase) -> None:
        """A liveness probe, as an orchestrator's: a stage that retries the same batch
        without success for too long (:func:`tests.faults.logtail.stuck`) is killed and
        started again; reported, not counted as an injected fault. Every 2 s."""
        if time.monotonic() < pipe.next_probe:
            return
        pipe.next_probe = time.monotonic() + 2.0
        for sl in slots:
            proc = sl.proc
            if proc is None or proc.poll() is not None or not sl.ready or proc.pid in self.stopped:
                continue
            why = logtail.stuck(sl.log, sl.log_pos)
            if why is not None and self.kill_worker(sl.instance, proc.pid):
                self.event("liveness-restart", worker=sl.instance, pid=proc.pid, why=why,
                           counts=False)
                say(f"liveness probe: {sl.instance} restarted ({why})")

    def _workload_slots(self, ops: list[dict[str, Any]], pdir: Path) -> list[Slot]:
        slots = []
        for w in range(self.s.workers):
            plan = pdir / f"plan-w{w}.json"
            plan.write_text(json.dumps({"ops": ops[w::self.s.workers]}, indent=1))
            slots.append(Slot(w, f"w{w}", plan, pdir / f"log-w{w}.jsonl",
                              pdir / f"stderr-w{w}.log", recover_own=w % 2 == 0))
        return slots

    def _stop_stages(self, slots: list[Slot], timeout: float = 20.0) -> None:
        """SIGTERM to every live stage (it finishes its batch, logs ``end`` and leaves the
        group); those still running after ``timeout`` seconds are killed by the caller."""
        with self._lock:
            procs = [sl.proc for sl in slots if sl.proc is not None and sl.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for sl in slots:
            sl.done = True

    def _supervise(self, slots: list[Slot]) -> None:
        now = time.monotonic()
        for sl in slots:
            if sl.done:
                continue
            if sl.proc is not None:
                rc = sl.proc.poll()
                if rc is None:
                    if not sl.ready:
                        sl.ready = logtail.started(sl.log, sl.log_pos)
                    continue
                sl.proc = None
                if rc == 0 and logtail.ended(sl.log):
                    sl.done = True
                    continue
                if rc < 0:
                    sl.killed += 1
                    sl.failures_in_a_row = 0
                    sl.restart_at = now + random.uniform(0.05, 0.5)
                else:
                    sl.failures_in_a_row += 1
                    if sl.failures_in_a_row >= 60:
                        raise CampaignError(f"worker {sl.instance} failed {sl.failures_in_a_row}"
                                            f" times in a row; see {sl.stderr}")
                    sl.restart_at = now + 1.0
            if sl.proc is None and now >= sl.restart_at:
                self._start(sl)

    def _check_skew(self, slots: list[Slot]) -> None:
        """Record how far the skewed workers' clocks really were off (their ``start``
        records carry their time.time() and are written at about the campaign's time)."""
        for sl in slots:
            if sl.instance not in self.skew_env:
                continue
            try:
                raw = sl.log.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            seen = []
            for line in raw:
                with contextlib.suppress(ValueError):
                    ln = json.loads(line)
                    if ln.get("event") in ("attempt", "start", "result") and "t" in ln:
                        seen.append(float(ln["t"]))
            if seen:
                # Written up to the end of the phase: about the skew, a little less.
                self.event("clock-skew", worker=sl.instance, counts=False,
                           faketime=self.skew_env[sl.instance].get("FAKETIME"),
                           clock_offset_seen=round(max(seen) - time.time(), 1),
                           records=len(seen))

