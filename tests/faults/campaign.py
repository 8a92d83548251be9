"""The crash-and-fault campaign: ``scripts/faults`` (``python -m tests.faults``).

1. Starts (or reuses) the campaign's own stack instance -- ``scripts/stack up --toxiproxy``
   with ``STACK_DIR=.stack/faults`` and every port moved by ``--port-offset`` -- so that
   killing brokers and stopping PostgreSQL never disturbs the shared development stack.
   A fresh database, business topic and decision topic per run.
2. Runs one *phase* per fault kind (``--faults``): ``--workers`` client processes
   (``tests/faults/workload.py``, instances ``w0``, ``w1``...) share the phase's operations; the
   phase's fault is injected while they run; a process that dies is started again with the
   same instance id (as an orchestrator would), and carries on with its log. Coordinators
   reach PostgreSQL and Kafka through Toxiproxy; recovery and the checker connect directly.
3. Meanwhile the recovery command runs every few seconds (``python -m recovery ... --json``,
   like a CronJob), and even-numbered workers call ``recovery.recover_own`` at start-up.
4. After the last phase: every fault healed, recovery runs until it exits 0 with nothing
   left in its grace period, then the checker (``tests/faults/check.py``) compares PostgreSQL,
   the ``read_committed`` view of Kafka, the decision log and what every client was told.
5. Prints a table per fault kind and the line ``ops=N divergences=N duplicates=N
   leftovers=N lost=N``; exit status 1 when anything but ``ops`` is non-zero, when an
   attempt raised something else than the coordinator's errors, or when the
   second-opinion checker of ``tests/crash/checker.py`` found a problem; 2 when the
   campaign itself could not run or did not complete (a phase timed out).

Fault kinds that attack atomicity through recovery (docs/reliability.md):

* ``pause`` -- workers freeze themselves (SIGSTOP, a detached waker sends SIGCONT after
  ``--pause-seconds``) at each of the steps ``tests.crash.worker.PAUSE_STEPS``,
  ``--pauses-per-step`` times each (an ``oversize`` operation right before a pause at
  ``init_producer`` and half of those at ``after_prepare``, so that the slot's producer is
  re-created in the paused operation), and the campaign SIGSTOPs random workers at random
  moments inside attempts for 0.4 s .. storm grace + 3 s; a recovery storm runs throughout.
* ``recovery-storm`` -- the recovery command with ``--grace-seconds`` =
  ``--storm-grace-seconds`` (0) back to back against the live coordinators.
* ``slow-kafka`` -- a storm, and Toxiproxy latency above the storm's grace period on the
  coordinators' broker connections.
* ``operator-mistake`` -- between the normal recovery runs, recovery with grace 0 pointed
  at a wrong decision topic (existing, empty) and at a second Kafka cluster (a second stack
  instance, ``--second-stack-dir``, ``--second-port-offset``), while workers are killed
  after their Kafka commit.
* ``clock-skew`` -- worker w0 runs under libfaketime with its clock ``--skew-seconds``
  behind, w1 ahead (``tests/faults/faketime_fix.c`` keeps librdkafka and Python's sleeps working
  under it), and workers are killed after their Kafka commit, so recovery must find
  decisions written with skewed timestamps.
"""

from __future__ import annotations

import argparse
import contextlib
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

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

POINTS = ("before_prepare", "after_prepare", "during_commit", "after_commit",
          "during_pg_commit")
"""The protocol steps (the same names as ``tests.crash.worker.POINTS``)."""
PAUSE_STEPS = ("before_prepare", "after_prepare", "init_producer", "before_commit",
               "after_commit", "before_pg_commit")
"""Where armed pauses freeze a worker (``tests.crash.worker.PAUSE_STEPS``)."""
KILL_KINDS = tuple(f"kill:{p}" for p in POINTS)
RECOVERY_KINDS = ("pause", "recovery-storm", "slow-kafka", "operator-mistake", "clock-skew")
"""Faults that attack atomicity through recovery: it acts on transactions that are not
abandoned (grace 0, paused or slowed coordinators) or with wrong settings."""
KINDS = ("none", *KILL_KINDS, "kill-random", "kafka-restart", "pg-restart", "net-cut",
         "net-latency", *RECOVERY_KINDS, "mixed")
GROUPS = {
    "all": KINDS,
    "kill-points": KILL_KINDS,
    "kills": (*KILL_KINDS, "kill-random"),
    "services": ("kafka-restart", "pg-restart"),
    "network": ("net-cut", "net-latency"),
    "recovery-faults": RECOVERY_KINDS,
}
STORM_KINDS = ("pause", "recovery-storm", "slow-kafka", "mixed")
"""Phases during which the recovery storm runs."""
PACED_KINDS = ("recovery-storm", "slow-kafka", "operator-mistake", "clock-skew", "mixed")
"""Phases (besides the environment faults) whose operations are spread over
``--phase-seconds``."""
OVERSIZE_LIMIT = 100_000
"""The business topic's ``max.message.bytes``; an ``oversize`` op sends 2x that."""
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
    pauses_per_step: int = 5
    pause_seconds: float = 3.0
    storm_grace: float = 0.0
    oversize_rate: float = 0.03
    skew_seconds: float = 600.0
    second_stack_dir: str = ""
    second_port_offset: int = 2000


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
    p.add_argument("--pauses-per-step", type=int, default=5,
                   help="pause phase: SIGSTOP a worker at each of the steps before_prepare, "
                   "after_prepare, init_producer, before_commit, after_commit, "
                   "before_pg_commit this many times (default 5; 20+ in a full run)")
    p.add_argument("--pause-seconds", type=float, default=3.0,
                   help="an armed pause lasts this long to 1.5 times as long (default 3; "
                   "longer than --storm-grace-seconds plus one recovery run)")
    p.add_argument("--storm-grace-seconds", type=float, default=0.0,
                   help="grace period of the recovery storm (default 0) and of the "
                   "operator-mistake runs' recovery is always 0")
    p.add_argument("--oversize-rate", type=float, default=0.03,
                   help="share of operations that send a message over the topic's "
                   f"max.message.bytes ({OVERSIZE_LIMIT}), in every phase (default 0.03)")
    p.add_argument("--skew-seconds", type=float, default=600.0,
                   help="clock-skew: w0's clock is this far behind, w1's this far ahead")
    p.add_argument("--second-stack-dir", default=str(ROOT / ".stack" / "faults2"),
                   help="operator-mistake: the second Kafka cluster's stack instance "
                   "(default .stack/faults2; started only for that fault)")
    p.add_argument("--second-port-offset", type=int, default=2000,
                   help="its port offset (default 2000)")
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


def _stack_env(stack_dir: str, port_offset: int) -> dict[str, str]:
    return {**os.environ, "STACK_DIR": stack_dir, "STACK_PORT_OFFSET": str(port_offset)}


def start_second_stack(s: Settings) -> str:
    """The operator-mistake fault's second Kafka cluster: ``scripts/stack up`` (one broker,
    no Toxiproxy) on its own instance; returns its bootstrap servers."""
    from tests.plugins.stack import STACK

    env = _stack_env(s.second_stack_dir, s.second_port_offset)
    say(f"starting a second stack instance for operator-mistake ({s.second_stack_dir}, "
        f"ports +{s.second_port_offset})")
    for args in (["up", "--brokers", "1"], ["env"]):
        done = subprocess.run([str(STACK), *args], capture_output=True, text=True, env=env,
                              timeout=1800, check=False)
        if done.returncode != 0:
            raise CampaignError(f"second stack: scripts/stack {' '.join(args)} failed:\n"
                                f"{done.stderr[-2000:]}")
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[1].startswith("KAFKA_BOOTSTRAP_SERVERS="):
            return words[1].split("=", 1)[1]
    raise CampaignError("second stack: no KAFKA_BOOTSTRAP_SERVERS in `scripts/stack env`")


def stop_second_stack(s: Settings) -> None:
    from tests.plugins.stack import STACK

    done = subprocess.run([str(STACK), "down"], capture_output=True, text=True, timeout=600,
                          env=_stack_env(s.second_stack_dir, s.second_port_offset),
                          check=False)
    if done.returncode != 0:
        say(f"could not stop the second stack: {done.stderr[-500:]}")


FAKETIME_FIX = Path(__file__).with_name("faketime_fix.c")


def setup_clock_skew(s: Settings) -> None:
    """libfaketime (Debian package ``faketime``) and ``tests/faults/faketime_fix.c`` compiled
    into the campaign's stack folder; installed with apt-get when missing, like
    ``scripts/stack`` installs its packages."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from stacklib.common import StackError, require_command
    finally:
        sys.path.pop(0)
    try:
        require_command("faketime", "faketime", "libfaketime (the clock-skew fault)")
        gcc = require_command("gcc", "gcc", "a C compiler (libfaketime's companion for "
                              "the clock-skew fault, tests/faults/faketime_fix.c)")
    except StackError as exc:
        raise CampaignError(str(exc)) from None
    if _libfaketime() is None:
        raise CampaignError("libfaketime.so.1 not found after installing faketime")
    lib = _faketime_fix(s)
    if not lib.exists() or lib.stat().st_mtime < FAKETIME_FIX.stat().st_mtime:
        done = subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(lib),
                               str(FAKETIME_FIX), "-ldl"], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise CampaignError(f"compiling {FAKETIME_FIX} failed:\n{done.stderr[-2000:]}")


def _faketime_fix(s: Settings) -> Path:
    return Path(s.stack_dir) / "faketime-fix.so"


def _libfaketime() -> Path | None:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def clock_skew_env(s: Settings) -> dict[str, dict[str, str]]:
    """w0 ``--skew-seconds`` behind, w1 as far ahead. FAKETIME_DONT_FAKE_MONOTONIC=1: a
    faked monotonic clock hangs Python's waits (and goes negative on a machine up for less
    than the skew); faketime-fix.so (first in LD_PRELOAD) keeps librdkafka's C11
    cnd_timedwait() and Python's monotonic clock_nanosleep() right under libfaketime."""
    lib = _libfaketime()
    assert lib is not None
    preload = f"{_faketime_fix(s)}:{lib}"
    out = {}
    for instance, sign in (("w0", "-"), ("w1", "+")):
        out[instance] = {"LD_PRELOAD": preload, "FAKETIME": f"{sign}{s.skew_seconds:g}s",
                         "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    return out


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
    config = {"max.message.bytes": str(OVERSIZE_LIMIT)}
    if rf >= 3:
        config["min.insync.replicas"] = "2"
    create_topic(services.bootstrap, topic, partitions=3, replication_factor=rf,
                 config=config)
    return services, table, topic, decision_topic


# --- plans -------------------------------------------------------------------------------


def make_plans(s: Settings, rng: random.Random) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(phase kind, its operations)], deterministic for a seed."""
    kinds = s.faults
    share = max(1, s.ops // len(kinds))
    extra = s.ops - share * len(kinds)
    phases: list[tuple[str, list[dict[str, Any]]]] = []
    stride = s.workers * s.threads
    """ops[j] and ops[j - stride] go to the same worker process and thread, in a row."""
    for idx, kind in enumerate(kinds):
        n = share + (1 if idx < extra else 0)
        if kind in KILL_KINDS:
            n = max(n, math.ceil(s.kills_per_point / 0.8) + s.workers)
        elif kind == "pause":
            armed = s.pauses_per_step * len(PAUSE_STEPS)
            n = max(n, math.ceil(armed * 1.6 / 0.75) + 3 * stride)
        elif kind in ("operator-mistake", "clock-skew"):
            n = max(n, math.ceil(s.kills_per_point / 0.12 / 0.8) + s.workers)
        ops: list[dict[str, Any]] = []
        for i in range(n):
            r = rng.random()
            op_kind = ("raise" if r < 0.08 else "sql_error" if r < 0.12
                       else "oversize" if r < 0.12 + s.oversize_rate else "ok")
            ops.append({"op": f"p{idx:02d}.{i:05d}", "phase": kind, "kind": op_kind,
                        "idem": rng.random() < 0.5, "crash": None, "kill_delay_us": 0})
        ok = [o for o in ops if o["kind"] == "ok"]
        if kind in KILL_KINDS:
            point = kind.split(":", 1)[1]
            for o in rng.sample(ok, min(s.kills_per_point, len(ok))):
                _arm(o, point, s, rng)
        elif kind == "pause":
            _arm_pauses(ops, s, rng, stride)
        elif kind in ("operator-mistake", "clock-skew"):
            # Kills after the Kafka commit (and during it): in-doubt transactions whose
            # decision is in the log, for recovery to find (clock-skew: by the skewed
            # workers w0 and w1).
            pool = ok if kind == "operator-mistake" else [
                o for j, o in enumerate(ops) if o["kind"] == "ok" and j % s.workers < 2]
            for o in rng.sample(pool, min(len(pool), max(s.kills_per_point,
                                                         len(pool) // 6))):
                _arm(o, "after_commit" if rng.random() < 0.75 else "during_commit", s, rng)
        elif kind == "mixed":
            for o in ok:
                r = rng.random()
                if r < 0.12:
                    _arm(o, rng.choice(POINTS), s, rng)
                elif r < 0.18:
                    o["crash"] = f"pause:{rng.choice(PAUSE_STEPS)}"
                    o["pause_seconds"] = round(rng.uniform(s.pause_seconds,
                                                           1.5 * s.pause_seconds), 3)
        phases.append((kind, ops))
    return phases


def _arm_pauses(ops: list[dict[str, Any]], s: Settings, rng: random.Random,
                stride: int) -> None:
    """``--pauses-per-step`` pauses at each step. Every pause at ``init_producer`` and every
    other one at ``after_prepare`` follows ``oversize`` operations on the same worker and
    thread -- as many as the coordinator has producers -- so that the paused operation
    finds its slot's producer dropped and creates it again: at ``init_producer`` the pause
    lands in that ``init_transactions()``, at ``after_prepare`` before it."""
    producers = 1 if s.group_commit else 2
    reserved: set[int] = set()
    jobs = [(step, i) for step in PAUSE_STEPS for i in range(s.pauses_per_step)]
    rng.shuffle(jobs)
    for step, i in jobs:
        prefixed = step == "init_producer" or (step == "after_prepare" and i % 2 == 0)

        def fits(j: int, prefixed: bool = prefixed) -> bool:
            if ops[j]["kind"] != "ok" or j in reserved:
                return False
            if not prefixed:
                return True
            before = [j - k * stride for k in range(1, producers + 1)]
            return all(b >= 0 and b not in reserved for b in before)

        candidates = [j for j in range(len(ops)) if fits(j)]
        if not candidates:
            break
        j = rng.choice(candidates)
        reserved.add(j)
        ops[j]["crash"] = f"pause:{step}"
        ops[j]["pause_seconds"] = round(rng.uniform(s.pause_seconds, 1.5 * s.pause_seconds), 3)
        if prefixed:
            for k in range(1, producers + 1):
                ops[j - k * stride]["kind"] = "oversize"
                reserved.add(j - k * stride)


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
        self.storm_grace = s.storm_grace
        self.stopped: set[int] = set()
        """Worker pids this process stopped (SIGSTOP) and has not continued yet."""
        self.wrong_decision_topic: str | None = None
        self.second_bootstrap: str | None = None
        self.skew_env: dict[str, dict[str, str]] = {}
        """instance -> environment that runs it under libfaketime (clock-skew phase)."""
        self.storm_runs: Counter[str] = Counter()

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
        cmd = [PYTHON, "-m", "tests.faults.workload", "--plan", str(sl.plan), "--log", str(sl.log),
               "--postgres", self.services.proxy_dsn, "--bootstrap",
               self.services.proxy_bootstrap, "--name", NAME, "--instance", sl.instance,
               "--topic", self.topic, "--table", self.table, "--decision-topic",
               self.decision_topic, "--messages-per-op", str(self.s.messages_per_op),
               "--pace", str(self._pace), "--threads", str(self.s.threads),
               "--oversize-bytes", str(2 * OVERSIZE_LIMIT)]
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
        env = {**os.environ, **self.skew_env.get(sl.instance, {})}
        sl.proc = subprocess.Popen(self._command(sl), cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=sl.err, stderr=sl.err, env=env)
        sl.starts += 1

    def run_phase(self, idx: int, kind: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        from .injectors import CYCLES, ENV_KINDS, Injector

        s = self.s
        self.phase = kind
        self.faults_per_kind.setdefault(kind, 0)
        pdir = self.out / f"phase-{idx:02d}"
        pdir.mkdir(parents=True, exist_ok=True)
        env_fault = kind in ENV_KINDS or kind in PACED_KINDS
        self.skew_env = clock_skew_env(s) if kind == "clock-skew" else {}
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
        if kind in CYCLES or kind == "mixed":
            rng = random.Random(f"{s.seed}/{idx}/{kind}")
            injector = Injector(self, rng, stop)
            for n in range(2 if kind == "mixed" else 1):
                t = threading.Thread(target=injector.loop, args=(kind,), daemon=True,
                                     name=f"inject-{kind}-{n}")
                t.start()
                threads.append(t)
        if kind in STORM_KINDS:
            t = threading.Thread(target=self.storm_loop, args=(stop,), daemon=True,
                                 name="recovery-storm")
            t.start()
            threads.append(t)
        if kind == "operator-mistake":
            t = threading.Thread(target=self.mistake_loop, args=(stop, idx), daemon=True,
                                 name="operator-mistakes")
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
                t.join(400)
            self.continue_all()
            if kind == "clock-skew":
                self._check_skew(slots)
            if kind in STORM_KINDS:
                self.event("storm", runs=self.storm_runs[kind], counts=False)
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

    def recover_once(self, grace: float, kill_after: float | None = None, *,
                     bootstrap: str | None = None, decision_topic: str | None = None,
                     label: str = "normal") -> tuple[int, dict[str, Any] | None]:
        """One run of the recovery command; ``kill_after``: SIGKILL it after that many
        seconds if it still runs (a fault of its own). ``bootstrap`` and
        ``decision_topic`` override the right ones (an operator's mistake)."""
        cmd = [PYTHON, "-m", "recovery", "--postgres", self.services.dsn,
               "--bootstrap-servers", bootstrap or self.services.bootstrap, "--name", NAME,
               "--decision-topic", decision_topic or self.decision_topic,
               "--grace-seconds", str(grace), "--json", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=kill_after if kill_after else 300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            if kill_after:
                self.event("kill-recovery", after_seconds=round(kill_after, 3))
                self._log_recovery(-9, None, f"killed after {kill_after:.3f} s", label)
            else:
                self._log_recovery(-1, None, "timed out after 300 s", label)
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
        self._log_recovery(proc.returncode, report, stderr[-2000:], label)
        return proc.returncode, report

    def _log_recovery(self, rc: int, report: dict[str, Any] | None, stderr: str,
                      label: str = "normal") -> None:
        with self._lock:
            self._recovery_log.write(json.dumps({"t": time.time(), "phase": self.phase,
                                                 "kind": label, "exit": rc,
                                                 "report": report,
                                                 "stderr": stderr if rc not in (0, 1) else ""})
                                     + "\n")
            self._recovery_log.flush()

    def storm_loop(self, stop: threading.Event) -> None:
        """The recovery command with the storm's grace period (0), back to back."""
        phase = self.phase
        while not stop.is_set():
            self.recover_once(self.storm_grace, label="storm")
            self.storm_runs[phase] += 1
            stop.wait(0.05)

    def mistake_loop(self, stop: threading.Event, idx: int) -> None:
        """Operator mistakes between the normal runs: recovery (grace 0) with a wrong
        decision topic -- existing and empty -- or against another Kafka cluster."""
        rng = random.Random(f"{self.s.seed}/{idx}/mistakes")
        mistakes = ["wrong-topic", "wrong-cluster"]
        n = 0
        while not stop.wait(rng.uniform(0.5, 2.5)):
            mistake = mistakes[n % 2]
            n += 1
            if mistake == "wrong-topic":
                rc, report = self.recover_once(0.0, decision_topic=self.wrong_decision_topic,
                                               label=mistake)
            else:
                rc, report = self.recover_once(0.0, bootstrap=self.second_bootstrap,
                                               label=mistake)
            self.event("operator-mistake", mistake=mistake, exit=rc, report=report)

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
                 kill_outcomes: dict[str, Counter[str]], columns: tuple[str, ...],
                 pause_outcomes: dict[str, Counter[str]] | None = None) -> str:
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
    if pause_outcomes:
        lines.append("")
        lines.append("armed pauses (SIGSTOP, all phases), how the paused attempt ended, and "
                     "how many of its operations have a problem:")
        lines.append("")
        lines.append("| step | pauses | committed | rolled back | with a problem |")
        lines.append("|---|---|---|---|---|")
        for step in PAUSE_STEPS:
            n = pause_outcomes.get(step, Counter())
            total = n["committed"] + n["rolled back"] + n["?"]
            lines.append(f"| {step} | {total} | {n['committed']} | {n['rolled back']} | "
                         f"{n['problem']} |")
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
        elif fault == "pause-random":
            count["random SIGSTOP of a client"] += 1
        elif fault == "slow-kafka":
            count["slow-Kafka periods"] += 1
        elif fault == "storm":
            count["storm recovery runs (grace 0)"] += int(ev.get("runs", 0))
        elif fault == "operator-mistake":
            count[f"recovery runs with a {ev.get('mistake')}"] += 1
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
            if "operator-mistake" in s.faults:
                stop_second_stack(s)
        lock.close()


def _run(s: Settings, run_id: str, out: Path, t0: float) -> int:
    from .check import COLUMNS, load_logs, run_check

    env = start_stack(s)
    if "clock-skew" in s.faults:
        setup_clock_skew(s)
    second_bootstrap = None
    if "operator-mistake" in s.faults:
        second_bootstrap = start_second_stack(s)
    started_stack = time.monotonic() - t0
    services, table, topic, decision_topic = prepare_data(s, env, run_id)
    heal(s, services.toxiproxy_url)
    camp = Campaign(s, services, table, topic, decision_topic, out)
    if second_bootstrap is not None:
        from tests.plugins.kafka_helpers import create_topic

        # The mistakes' topics exist and are empty: a decision topic of the right name on
        # the other cluster, and a wrong name on the right one.
        camp.second_bootstrap = second_bootstrap
        camp.wrong_decision_topic = f"{decision_topic}-wrong"
        create_topic(second_bootstrap, decision_topic, partitions=3, replication_factor=1)
        create_topic(services.bootstrap, camp.wrong_decision_topic, partitions=3,
                     replication_factor=3 if s.brokers >= 3 else 1)
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
    camp.continue_all()
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
    table_text = render_table(result.table, s.faults, result.kill_outcomes, COLUMNS,
                              result.pause_outcomes)
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
        pauses_per_step=args.pauses_per_step, pause_seconds=args.pause_seconds,
        storm_grace=args.storm_grace_seconds, oversize_rate=args.oversize_rate,
        skew_seconds=args.skew_seconds,
        second_stack_dir=str(Path(args.second_stack_dir).resolve()),
        second_port_offset=args.second_port_offset,
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
