"""The crash-and-fault campaign: ``scripts/faults`` (``python -m faults``).

1. Starts (or reuses) the campaign's own stack instance -- ``scripts/stack up --toxiproxy``
   with ``STACK_DIR=.stack/faults`` and every port moved by ``--port-offset`` -- so that
   killing brokers and stopping PostgreSQL never disturbs the shared development stack.
   A fresh database, business topic and decision topic per run.
2. Runs one *phase* per fault kind (``--faults``): ``--workers`` client processes
   (``faults/workload.py``, instances ``w0``, ``w1``...) share the phase's operations; the
   phase's fault is injected while they run; a process that dies is started again with the
   same instance id (as an orchestrator would), and carries on with its log. Coordinators
   reach PostgreSQL and Kafka through Toxiproxy; recovery and the checker connect directly.
3. Meanwhile the recovery command runs every few seconds (``python -m recovery ... --json``,
   like a CronJob), and even-numbered workers call ``recovery.recover_own`` at start-up.
4. After the last phase: every fault healed, recovery runs until it exits 0 with nothing
   left in its grace period, then the checker (``faults/check.py``) compares PostgreSQL,
   the ``read_committed`` view of Kafka, the decision log and what every client was told.
5. Prints a table per fault kind and the line ``ops=N divergences=N duplicates=N
   leftovers=N lost=N``; exit status 1 when anything but ``ops`` is non-zero, when an
   attempt raised something else than the coordinator's errors, or when the
   second-opinion checker of ``tests/crash/checker.py`` found a problem; 2 when the
   campaign itself could not run or did not complete (a phase timed out).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

POINTS = ("before_prepare", "after_prepare", "during_commit", "after_commit",
          "during_pg_commit")
"""The protocol steps (the same names as ``tests.crash.worker.POINTS``)."""
KILL_KINDS = tuple(f"kill:{p}" for p in POINTS)
KINDS = ("none", *KILL_KINDS, "kill-random", "kafka-restart", "pg-restart", "net-cut",
         "net-latency", "mixed")
GROUPS = {
    "all": KINDS,
    "kill-points": KILL_KINDS,
    "kills": (*KILL_KINDS, "kill-random"),
    "services": ("kafka-restart", "pg-restart"),
    "network": ("net-cut", "net-latency"),
}
NAME = "faults"
EXIT_FAILED, EXIT_ERROR = 1, 2


class CampaignError(Exception):
    """The campaign could not run (not a finding about the library)."""


@dataclass
class Settings:
    ops: int
    faults: list[str]
    seed: int
    workers: int
    brokers: int
    kills_per_point: int
    phase_seconds: float
    grace_seconds: float
    recovery_interval: float
    messages_per_op: int
    jitter_kafka_ms: float
    jitter_pg_ms: float
    stack_dir: str
    port_offset: int
    keep_stack: bool
    out: str
    group_commit: bool = False
    threads: int = 1
    command: str = ""


def _parse_faults(text: str) -> list[str]:
    out: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        names = GROUPS.get(word, (word,))
        for n in names:
            if n not in KINDS:
                raise argparse.ArgumentTypeError(
                    f"unknown fault {n!r}; known: {', '.join(KINDS)}; groups: "
                    f"{', '.join(GROUPS)}")
            if n not in out:
                out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no fault selected")
    return [k for k in KINDS if k in out]  # protocol order, the mixed phase last


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/faults", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=300, help="operations in all (default 300)")
    p.add_argument("--faults", type=_parse_faults, default=list(KINDS),
                   help="comma-separated fault kinds or groups (default all): "
                   f"{', '.join(KINDS)}; groups: {', '.join(GROUPS)}")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random; "
                   "printed, so that a run can be replayed)")
    p.add_argument("--workers", type=int, default=3, help="client processes (default 3)")
    p.add_argument("--brokers", type=int, choices=(1, 3), default=1,
                   help="Kafka brokers of the campaign's stack (3: RF 3, min.insync.replicas "
                   "2; kafka-restart then kills one broker during commits)")
    p.add_argument("--kills-per-point", type=int, default=10,
                   help="kill -9 at each protocol step (one phase per step; default 10)")
    p.add_argument("--phase-seconds", type=float, default=30.0,
                   help="target duration of each service/network/random-kill phase")
    p.add_argument("--grace-seconds", type=float, default=15.0,
                   help="recovery's grace period (> transaction.timeout.ms = 10 s)")
    p.add_argument("--recovery-interval", type=float, default=5.0,
                   help="seconds between runs of the recovery command during the phases")
    p.add_argument("--group-commit", action="store_true",
                   help="coordinators with group commit (GroupCommit()): concurrent "
                   "transactions of a client process share Kafka transactions")
    p.add_argument("--threads", type=int, default=None,
                   help="client threads per process, sharing its coordinator (default 1; "
                   "4 with --group-commit)")
    p.add_argument("--messages-per-op", type=int, default=2)
    p.add_argument("--jitter-kafka-ms", type=float, default=12.0,
                   help="kill:during_commit kills up to this long after commit_transaction() "
                   "was entered (log-uniform from 20 us; a fifth at once)")
    p.add_argument("--jitter-pg-ms", type=float, default=4.0,
                   help="kill:during_pg_commit kills up to this long after COMMIT PREPARED "
                   "was entered (likewise)")
    p.add_argument("--stack-dir", default=str(ROOT / ".stack" / "faults"),
                   help="the campaign's stack instance (default .stack/faults)")
    p.add_argument("--port-offset", type=int, default=1000,
                   help="its ports: the default stack's plus this (default 1000)")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave the campaign's stack running afterwards")
    p.add_argument("--out", default=None,
                   help="results folder (default faults-results/<time>-s<seed>)")
    return p


# --- the stack instance ------------------------------------------------------------------


@dataclass
class Services:
    admin_dsn: str
    dsn: str
    """The run's database, direct (recovery, checker)."""
    proxy_dsn: str
    """The run's database through Toxiproxy (coordinators)."""
    bootstrap: str
    proxy_bootstrap: str
    toxiproxy_url: str


def _conninfo_with_db(dsn: str, db: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{db}"


def start_stack(s: Settings) -> dict[str, str]:
    """``scripts/stack up --toxiproxy`` on the campaign's instance; its ``env`` values."""
    from tests.plugins import stack as stack_ops

    os.environ["STACK_DIR"] = s.stack_dir
    os.environ["STACK_PORT_OFFSET"] = str(s.port_offset)
    cluster_file = Path(s.stack_dir) / "kafka" / "cluster.json"
    if cluster_file.exists():
        try:
            size = int(json.loads(cluster_file.read_text())["brokers"])
        except (ValueError, KeyError, TypeError):
            size = -1
        if size != s.brokers:
            say(f"the campaign's stack has {size} broker(s), {s.brokers} wanted: reset")
            stack_ops.stack("reset")
    try:
        stack_ops.stack("up", "--toxiproxy", "--brokers", str(s.brokers), timeout=1800)
    except AssertionError as exc:
        if "PROXIED listener" not in str(exc):
            raise CampaignError(str(exc)) from None
        stack_ops.stack("down")
        stack_ops.stack("up", "--toxiproxy", "--brokers", str(s.brokers), timeout=1800)
    env: dict[str, str] = {}
    for line in stack_ops.stack("env").splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def stop_stack() -> None:
    from tests.plugins import stack as stack_ops

    stack_ops.stack("down")


def heal(s: Settings, toxiproxy_url: str) -> None:
    """Every fault undone: no toxic, every proxy enabled, every service up."""
    from tests.plugins import stack as stack_ops

    from .toxiproxy import Toxiproxy, ToxiproxyError

    for attempt in range(5):
        try:
            stack_ops.stack("up", "--toxiproxy", "--brokers", str(s.brokers), timeout=600)
            Toxiproxy(toxiproxy_url).reset()
            return
        except (AssertionError, ToxiproxyError) as exc:
            if attempt == 4:
                raise CampaignError(f"cannot heal the stack: {exc}") from None
            time.sleep(3)


# --- the run's data --------------------------------------------------------------------


def prepare_data(s: Settings, env: dict[str, str], run_id: str) -> tuple[Services, str, str,
                                                                          str]:
    """A fresh database (with the table), business topic; returns the names."""
    import psycopg
    from psycopg import sql

    from tests.plugins.kafka_helpers import create_topic

    db = f"faults_{run_id.replace('-', '_')}"
    admin = env["PG_DSN"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    services = Services(
        admin_dsn=admin,
        dsn=_conninfo_with_db(admin, db),
        proxy_dsn=_conninfo_with_db(env["PG_PROXY_DSN"], db),
        bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"],
        proxy_bootstrap=env["KAFKA_PROXY_BOOTSTRAP_SERVERS"],
        toxiproxy_url=env["TOXIPROXY_URL"],
    )
    table = "ops"
    with psycopg.connect(services.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, op_id text NOT NULL, "
                             "attempt int NOT NULL, instance text NOT NULL, "
                             "at timestamptz NOT NULL DEFAULT clock_timestamp())")
                     .format(sql.Identifier(table)))
    topic = f"faults.{run_id}.events"
    decision_topic = f"faults.{run_id}.decisions"
    rf = 3 if s.brokers >= 3 else 1
    create_topic(services.bootstrap, topic, partitions=3, replication_factor=rf,
                 config={"min.insync.replicas": "2"} if rf >= 3 else {})
    return services, table, topic, decision_topic


# --- plans -------------------------------------------------------------------------------


def make_plans(s: Settings, rng: random.Random) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(phase kind, its operations)], deterministic for a seed."""
    kinds = s.faults
    share = max(1, s.ops // len(kinds))
    extra = s.ops - share * len(kinds)
    phases: list[tuple[str, list[dict[str, Any]]]] = []
    for idx, kind in enumerate(kinds):
        n = share + (1 if idx < extra else 0)
        if kind in KILL_KINDS:
            n = max(n, math.ceil(s.kills_per_point / 0.8) + s.workers)
        ops: list[dict[str, Any]] = []
        for i in range(n):
            r = rng.random()
            op_kind = "raise" if r < 0.08 else "sql_error" if r < 0.12 else "ok"
            ops.append({"op": f"p{idx:02d}.{i:05d}", "phase": kind, "kind": op_kind,
                        "idem": rng.random() < 0.5, "crash": None, "kill_delay_us": 0})
        ok = [o for o in ops if o["kind"] == "ok"]
        if kind in KILL_KINDS:
            point = kind.split(":", 1)[1]
            for o in rng.sample(ok, min(s.kills_per_point, len(ok))):
                _arm(o, point, s, rng)
        elif kind == "mixed":
            for o in ok:
                if rng.random() < 0.12:
                    _arm(o, rng.choice(POINTS), s, rng)
        phases.append((kind, ops))
    return phases


def _arm(op: dict[str, Any], point: str, s: Settings, rng: random.Random) -> None:
    op["crash"] = point
    limit = {"during_commit": s.jitter_kafka_ms, "during_pg_commit": s.jitter_pg_ms}.get(point)
    if limit and rng.random() >= 0.2:  # a fifth: killed as the call is entered
        # Log-uniform from 20 us: the commit request leaves within about a millisecond,
        # so the start of the call is sampled as densely as its end.
        op["kill_delay_us"] = int(math.exp(rng.uniform(math.log(20.0), math.log(limit * 1000))))


# --- supervision -------------------------------------------------------------------------


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


class Campaign:
    def __init__(self, s: Settings, services: Services, table: str, topic: str,
                 decision_topic: str, out: Path) -> None:
        from .toxiproxy import Toxiproxy

        self.s = s
        self.services = services
        self.table = table
        self.topic = topic
        self.decision_topic = decision_topic
        self.out = out
        self.brokers = s.brokers
        self.toxiproxy = Toxiproxy(services.toxiproxy_url)
        self.phase = "setup"
        self.faults_per_kind: dict[str, int] = {}
        self.slots: list[Slot] = []
        self._lock = threading.Lock()
        self._events = (out / "events.jsonl").open("a", encoding="utf-8")
        self._recovery_log = (out / "recovery.jsonl").open("a", encoding="utf-8")
        self.resolved: set[str] = set()
        self._pace = 0.0

    # -- Lab protocol (injectors) --------------------------------------------------------

    def event(self, fault: str, **detail: object) -> None:
        counts = bool(detail.pop("counts", True))
        with self._lock:
            if counts:
                self.faults_per_kind[self.phase] = self.faults_per_kind.get(self.phase, 0) + 1
            self._events.write(json.dumps({"t": time.time(), "phase": self.phase,
                                           "fault": fault, **detail}, default=str) + "\n")
            self._events.flush()

    def alive_workers(self, ready_only: bool = True) -> list[tuple[str, int]]:
        """Running worker processes; ``ready_only``: those past their start-up."""
        with self._lock:
            return [(sl.instance, sl.proc.pid) for sl in self.slots
                    if sl.proc is not None and sl.proc.poll() is None
                    and (sl.ready or not ready_only)]

    def in_attempt(self, instance: str) -> bool:
        """Whether the worker's last log record says it is inside an attempt."""
        sl = next((x for x in self.slots if x.instance == instance), None)
        if sl is None:
            return False
        try:
            with sl.log.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
                tail = f.read().splitlines()
        except OSError:
            return False
        last = tail[-1] if tail else b""
        return b'"event": "attempt"' in last or b'"event": "gid"' in last

    def kill_worker(self, instance: str, pid: int) -> bool:
        """SIGKILL the worker process ``pid`` if it is still that slot's live process."""
        with self._lock:
            sl = next((x for x in self.slots if x.instance == instance), None)
            if sl is None or sl.proc is None or sl.proc.pid != pid or sl.proc.poll() is not None:
                return False
            sl.proc.kill()
            return True

    def kill_broker_now(self, broker: int) -> None:
        """``kill -9`` of broker ``broker`` by its pid file (what ``scripts/stack
        kill-kafka`` does, without starting a process first)."""
        bdir = Path(self.s.stack_dir) / "kafka" / f"broker-{broker}"
        pid = _pid_of(bdir / "kafka.pid", str(bdir / "server.properties"))
        if pid is None:
            raise CampaignError(f"Kafka broker {broker} is not running")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)

    def stop_postgres_now(self) -> None:
        """``pg_ctl stop -m immediate`` is SIGQUIT to the postmaster: sent here directly,
        by the pid in postmaster.pid, then wait until the postmaster is gone."""
        data = Path(self.s.stack_dir) / "postgres" / "data"
        pid = _pid_of(data / "postmaster.pid", str(data))
        if pid is None:
            raise CampaignError("PostgreSQL is not running")
        os.kill(pid, signal.SIGQUIT)
        _wait_gone(pid, 30.0)

    # -- workers -------------------------------------------------------------------------

    def _command(self, sl: Slot) -> list[str]:
        cmd = [PYTHON, "-m", "faults.workload", "--plan", str(sl.plan), "--log", str(sl.log),
               "--postgres", self.services.proxy_dsn, "--bootstrap",
               self.services.proxy_bootstrap, "--name", NAME, "--instance", sl.instance,
               "--topic", self.topic, "--table", self.table, "--decision-topic",
               self.decision_topic, "--messages-per-op", str(self.s.messages_per_op),
               "--pace", str(self._pace), "--threads", str(self.s.threads)]
        if self.s.group_commit:
            # One producer: every transaction of the process in flight together shares
            # its Kafka transaction.
            cmd += ["--group-commit", "--producers", "1"]
        if sl.recover_own:
            cmd.append("--recover-own")
        return cmd

    def _start(self, sl: Slot) -> None:
        if sl.err is None:
            sl.err = sl.stderr.open("ab")
        sl.ready = False
        sl.log_pos = sl.log.stat().st_size if sl.log.exists() else 0
        sl.proc = subprocess.Popen(self._command(sl), cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=sl.err, stderr=sl.err)
        sl.starts += 1

    def run_phase(self, idx: int, kind: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        from .injectors import ENV_KINDS, Injector

        s = self.s
        self.phase = kind
        self.faults_per_kind.setdefault(kind, 0)
        pdir = self.out / f"phase-{idx:02d}"
        pdir.mkdir(parents=True, exist_ok=True)
        env_fault = kind in ENV_KINDS or kind == "mixed"
        # Faults come in cycles through the phase: the operations are spread over it.
        self._pace = ((s.phase_seconds * s.workers * s.threads / max(1, len(ops)))
                      if env_fault else 0.0)
        slots = []
        for w in range(s.workers):
            mine = ops[w::s.workers]
            plan = pdir / f"plan-w{w}.json"
            plan.write_text(json.dumps({"ops": mine}, indent=1))
            slots.append(Slot(w, f"w{w}", plan, pdir / f"log-w{w}.jsonl",
                              pdir / f"stderr-w{w}.log", recover_own=w % 2 == 0))
        with self._lock:
            self.slots = slots
        started = time.monotonic()
        say(f"phase {idx + 1}/{len(s.faults)}: {kind}: {len(ops)} ops, {s.workers} workers"
            + (f" x {s.threads} threads" if s.threads > 1 else "")
            + (f", pace {self._pace:.2f} s/op/worker" if self._pace else ""))
        for sl in slots:
            self._start(sl)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        if env_fault:
            rng = random.Random(f"{s.seed}/{idx}/{kind}")
            injector = Injector(self, rng, stop)
            for n in range(2 if kind == "mixed" else 1):
                t = threading.Thread(target=injector.loop, args=(kind,), daemon=True,
                                     name=f"inject-{kind}-{n}")
                t.start()
                threads.append(t)
        deadline = started + max(300.0, 6 * s.phase_seconds) + 2.0 * len(ops)
        timed_out = False
        try:
            while not all(sl.done for sl in slots):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                self._supervise(slots)
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
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
            f", {self.faults_per_kind.get(kind, 0)} injected faults"
            + (" -- TIMED OUT" if timed_out else ""))
        return {"phase": kind, "seconds": round(elapsed, 1), "restarts": restarts,
                "timed_out": timed_out}

    def _supervise(self, slots: list[Slot]) -> None:
        now = time.monotonic()
        for sl in slots:
            if sl.done:
                continue
            if sl.proc is not None:
                rc = sl.proc.poll()
                if rc is None:
                    if not sl.ready:
                        sl.ready = _started(sl)
                    continue
                sl.proc = None
                if rc == 0 and _log_ended(sl.log):
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

    # -- recovery ----------------------------------------------------------------------

    def recover_once(self, grace: float, kill_after: float | None = None
                     ) -> tuple[int, dict[str, Any] | None]:
        """One run of the recovery command; ``kill_after``: SIGKILL it after that many
        seconds if it still runs (a fault of its own)."""
        cmd = [PYTHON, "-m", "recovery", "--postgres", self.services.dsn,
               "--bootstrap-servers", self.services.bootstrap, "--name", NAME,
               "--decision-topic", self.decision_topic, "--grace-seconds", str(grace),
               "--json", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=kill_after if kill_after else 300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            if kill_after:
                self.event("kill-recovery", after_seconds=round(kill_after, 3))
                self._log_recovery(-9, None, f"killed after {kill_after:.3f} s")
            else:
                self._log_recovery(-1, None, "timed out after 300 s")
            return -1, None
        report: dict[str, Any] | None = None
        try:
            report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None
        except ValueError:
            report = None
        if report is not None:
            with self._lock:
                self.resolved.update(report.get("committed", []))
                self.resolved.update(report.get("rolled_back", []))
        self._log_recovery(proc.returncode, report, stderr[-2000:])
        return proc.returncode, report

    def _log_recovery(self, rc: int, report: dict[str, Any] | None, stderr: str) -> None:
        with self._lock:
            self._recovery_log.write(json.dumps({"t": time.time(), "phase": self.phase,
                                                 "exit": rc, "report": report,
                                                 "stderr": stderr if rc not in (0, 1) else ""})
                                     + "\n")
            self._recovery_log.flush()

    def recovery_loop(self, stop: threading.Event) -> None:
        """The recovery command every few seconds, like a CronJob. During the random-kill
        and mixed phases half of its runs are killed with SIGKILL at a random moment."""
        rng = random.Random(f"{self.s.seed}/recovery")
        while not stop.wait(self.s.recovery_interval):
            kill_after = None
            if self.phase in ("kill-random", "mixed") and rng.random() < 0.5:
                kill_after = rng.uniform(0.2, 1.5)
            self.recover_once(self.s.grace_seconds, kill_after)

    def final_recovery(self) -> int:
        """Recovery until it exits 0 with nothing waiting in the grace period."""
        deadline = time.monotonic() + 600
        runs = 0
        while True:
            rc, report = self.recover_once(self.s.grace_seconds)
            runs += 1
            if rc == 0 and report is not None and not report.get("waiting"):
                return runs
            if time.monotonic() > deadline:
                raise CampaignError(f"recovery did not exit 0 within 600 s (last exit {rc}, "
                                    f"report {report})")
            time.sleep(2.0)


def _pid_of(pid_file: Path, must_contain: str) -> int | None:
    """The live process of a pid file whose command line mentions ``must_contain``."""
    try:
        first = pid_file.read_text().split("\n", 1)[0].strip()
        pid = int(first)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if must_contain in cmdline else None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise CampaignError(f"process {pid} still alive {timeout:g} s after the signal")


def _started(sl: Slot) -> bool:
    """Whether the slot's current process logged its ``start`` record."""
    try:
        with sl.log.open("rb") as f:
            f.seek(sl.log_pos)
            new = f.read()
    except OSError:
        return False
    return b'"event": "start"' in new


def _log_ended(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    return any('"event": "end"' in ln for ln in lines[-3:])


# --- output ------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"faults: {message}", file=sys.stderr, flush=True)


def render_table(table: dict[str, dict[str, int]], kinds: list[str],
                 kill_outcomes: dict[str, Counter[str]], columns: tuple[str, ...]) -> str:
    head = ["fault", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    totals = dict.fromkeys(columns, 0)
    for kind in [*kinds, *sorted(set(table) - set(kinds))]:
        row = table.get(kind, dict.fromkeys(columns, 0))
        for c in columns:
            totals[c] += row.get(c, 0)
        lines.append("| " + " | ".join([kind, *(str(row.get(c, 0)) for c in columns)]) + " |")
    lines.append("| " + " | ".join(["**total**", *(f"**{totals[c]}**" for c in columns)])
                 + " |")
    lines.append("")
    lines.append("kill -9 at each protocol step (all phases), and how the killed attempt ended:")
    lines.append("")
    lines.append("| step | kills | committed | rolled back |")
    lines.append("|---|---|---|---|")
    for point in POINTS:
        n = kill_outcomes.get(point, Counter())
        lines.append(f"| {point} | {sum(n.values())} | {n['committed']} | {n['rolled back']} |")
    return "\n".join(lines)


def kafka_sizes(lines: list[dict[str, Any]]) -> str:
    """How many decision records the clients' Kafka transactions carried (the last
    report of every client process; a process killed between two reports leaves up to
    19 transactions uncounted)."""
    last: dict[int, dict[str, int]] = {}
    for ln in lines:
        if ln.get("event") == "kafka_txns":
            last[int(ln["pid"])] = ln["sizes"]
    total: Counter[int] = Counter()
    for sizes in last.values():
        for k, v in sizes.items():
            total[int(k)] += int(v)
    detail = ", ".join(f"{n} with {k} decision record{'s' if k > 1 else ''}"
                       for k, n in sorted(total.items()))
    return f"{sum(total.values())} counted ({detail})"


def fault_totals(events: Path, kills: Counter[str]) -> str:
    """One line: how many faults of each kind the whole run injected."""
    count: Counter[str] = Counter()
    cuts: Counter[str] = Counter()
    for raw in events.read_text(encoding="utf-8").splitlines():
        ev = json.loads(raw)
        fault, action = ev.get("fault"), ev.get("action")
        if fault == "kafka-restart" and action == "kill -9":
            count["broker kill -9 + restart"] += 1
        elif fault == "pg-restart" and action == "stop -m immediate":
            count["PostgreSQL stop -m immediate + restart"] += 1
        elif fault == "kill-random":
            count["random kill -9 of a client"] += 1
        elif fault == "kill-recovery":
            count["kill -9 of the recovery command"] += 1
        elif fault == "net-cut":
            count["network cuts"] += 1
            cuts[str(ev.get("mode"))] += 1
        elif fault == "net-latency":
            count["latency periods"] += 1
    parts = [f"kill -9 at a protocol step {sum(kills.values())}"]
    parts += [f"{k} {v}" for k, v in count.items() if "network" not in k]
    if count["network cuts"]:
        detail = ", ".join(f"{m} {n}" for m, n in sorted(cuts.items()))
        parts.append(f"network cuts {count['network cuts']} ({detail})")
    return "; ".join(parts)


# --- main --------------------------------------------------------------------------------


def run(s: Settings) -> int:

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-s{s.seed}"
    out = Path(s.out or ROOT / "faults-results" / run_id)
    out.mkdir(parents=True, exist_ok=True)
    s.out = str(out)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))
    print(f"seed={s.seed}", flush=True)
    print(f"command: {s.command}", flush=True)
    say(f"results in {out}")
    t0 = time.monotonic()
    Path(s.stack_dir).mkdir(parents=True, exist_ok=True)
    lock = (Path(s.stack_dir) / "campaign.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise CampaignError(f"another campaign is running on the stack instance {s.stack_dir}; "
                            "give this one its own: --stack-dir DIR --port-offset N") from None
    try:
        return _run(s, run_id, out, t0)
    finally:
        if not s.keep_stack:
            try:
                stop_stack()
            except AssertionError as exc:
                say(f"could not stop the campaign's stack: {exc}")
        lock.close()


def _run(s: Settings, run_id: str, out: Path, t0: float) -> int:
    from .check import COLUMNS, load_logs, run_check

    env = start_stack(s)
    started_stack = time.monotonic() - t0
    services, table, topic, decision_topic = prepare_data(s, env, run_id)
    heal(s, services.toxiproxy_url)
    camp = Campaign(s, services, table, topic, decision_topic, out)
    rng = random.Random(s.seed)
    phases = make_plans(s, rng)
    plan = {o["op"]: o for _, ops in phases for o in ops}
    stop_recovery = threading.Event()
    recovery_thread = threading.Thread(target=camp.recovery_loop, args=(stop_recovery,),
                                       daemon=True, name="recovery-loop")
    recovery_thread.start()
    phase_info = []
    try:
        for idx, (kind, ops) in enumerate(phases):
            phase_info.append(camp.run_phase(idx, kind, ops))
    finally:
        stop_recovery.set()
        recovery_thread.join(400)
    camp.phase = "final-recovery"
    heal(s, services.toxiproxy_url)
    # Past transaction.timeout.ms (10 s): open Kafka transactions of killed producers are
    # aborted by the broker; past the grace period: every in-doubt one is recovery's.
    say(f"faults stopped; recovery until it exits 0 (grace {s.grace_seconds:g} s)")
    runs = camp.final_recovery()
    say(f"recovery exited 0 after {runs} run(s); checking")
    lines = load_logs(sorted(out.glob("phase-*/log-w*.jsonl")))
    for ln in lines:
        if ln.get("event") == "recover_own":
            camp.resolved.update(ln.get("committed", []))
            camp.resolved.update(ln.get("rolled_back", []))
    result = run_check(
        dsn=services.dsn, bootstrap=services.bootstrap, name=NAME, table=table, topic=topic,
        decision_topic=decision_topic, messages_per_op=s.messages_per_op, plan=plan,
        lines=lines, resolved_by_recovery=camp.resolved, faults_per_kind=camp.faults_per_kind,
    )
    table_text = render_table(result.table, s.faults, result.kill_outcomes, COLUMNS)
    not_attempted = sum(1 for o in plan if o not in result.ops or
                        not result.ops[o].attempts)
    elapsed = time.monotonic() - t0
    summary = [
        f"seed={s.seed}",
        f"command: {s.command}",
        f"brokers={s.brokers} workers={s.workers} threads={s.threads} "
        f"commit={'group' if s.group_commit else 'per-operation'} grace={s.grace_seconds:g}s "
        f"stack up {started_stack:.0f} s, campaign {elapsed:.0f} s",
        "",
        table_text,
        "",
        "faults injected: " + fault_totals(out / "events.jsonl", result.kills),
        "Kafka transactions: " + kafka_sizes(lines),
        "",
        "columns: ops = operations attempted; faults = faults injected in that phase (kill -9 "
        "at a protocol step, random kill -9 of a client or of the recovery command, broker "
        "or PostgreSQL restart, network cut or latency period); committed / "
        "rolled back = the outcome the checker found; told unknown = the client's final "
        "answer was 'unknown'; by recovery = an attempt was resolved by the recovery "
        "command or recover_own",
    ]
    timed_out = [p["phase"] for p in phase_info if p["timed_out"]]
    incomplete = bool(not_attempted or timed_out)
    summary.append("workload: " + ", ".join(f"{k} {v}" for k, v in sorted(result.workload.items())))
    summary.append("answers to attempts: " + ", ".join(
        f"{k} {v}" for k, v in result.answers.most_common()))
    if incomplete:
        summary.append(f"INCOMPLETE: phases timed out: {timed_out or 'none'}; "
                       f"{not_attempted} planned operation(s) never attempted")
    for p in result.problems[:50]:
        summary.append(f"PROBLEM: {p}")
    if len(result.problems) > 50:
        summary.append(f"... and {len(result.problems) - 50} more problems")
    for p in result.reference_problems[:50]:
        summary.append(f"tests/crash/checker.py: {p}")
    summary.append(f"tests/crash/checker.py (second opinion): "
                   f"{len(result.reference_problems)} problem(s)")
    summary.append(result.final_line())
    text = "\n".join(summary)
    (out / "summary.txt").write_text(text + "\n")
    (out / "result.json").write_text(json.dumps({
        "settings": asdict(s), "phases": phase_info, "table": result.table,
        "totals": result.totals, "kills": dict(result.kills),
        "kill_outcomes": {k: dict(v) for k, v in result.kill_outcomes.items()},
        "answers": dict(result.answers), "workload": dict(result.workload),
        "problems": result.problems,
        "reference_problems": result.reference_problems,
        "faults_per_kind": camp.faults_per_kind, "not_attempted": not_attempted,
        "seconds": round(elapsed, 1)}, indent=1))
    print(text, flush=True)
    if not result.ok:
        return EXIT_FAILED
    return EXIT_ERROR if incomplete else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Stop cleanly (workers killed, stack down) on SIGTERM, and on SIGINT even when started
    # in the background (which ignores it).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    if args.workers < 1 or args.ops < 1:
        print("faults: error: --workers and --ops must be positive", file=sys.stderr)
        return EXIT_ERROR
    s = Settings(
        ops=args.ops, faults=args.faults, seed=seed, workers=args.workers,
        brokers=args.brokers, kills_per_point=args.kills_per_point,
        phase_seconds=args.phase_seconds, grace_seconds=args.grace_seconds,
        recovery_interval=args.recovery_interval, messages_per_op=args.messages_per_op,
        jitter_kafka_ms=args.jitter_kafka_ms, jitter_pg_ms=args.jitter_pg_ms,
        stack_dir=str(Path(args.stack_dir).resolve()), port_offset=args.port_offset,
        keep_stack=args.keep_stack, out=args.out or "", group_commit=args.group_commit,
        threads=args.threads if args.threads is not None else (4 if args.group_commit else 1),
    )
    s.command = "scripts/faults " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    if args.seed is None:
        s.command += f" --seed {seed}"
    try:
        return run(s)
    except CampaignError as exc:
        print(f"faults: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("faults: interrupted", file=sys.stderr)
        return 130
