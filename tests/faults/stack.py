"""Stack control: the campaign's own stack instances, its data, healing, libfaketime.

The campaign runs on a ``scripts/stack`` instance of its own (``--stack-dir``, every port
moved by ``--port-offset``, with Toxiproxy), never on the shared development stack; the
operator-mistake fault adds a second one (one broker, no Toxiproxy). Services are stopped
here at once by a signal to the pid in their pid file, and started again by
``scripts/stack`` (``tests/plugins/stack.py``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tests.plugins import stack as stack_ops
from tests.plugins.kafka_helpers import create_topic
from tests.plugins.stack import STACK

from .report import say
from .settings import OVERSIZE_LIMIT, ROOT, CampaignError, Settings
from .toxiproxy import Toxiproxy, ToxiproxyError

__all__ = [
    "Services",
    "clock_skew_env",
    "heal",
    "kill_broker",
    "prepare_data",
    "setup_clock_skew",
    "start_second_stack",
    "start_stack",
    "stop_postgres",
    "stop_second_stack",
    "stop_stack",
]


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
    stack_ops.stack("down")


def _stack_env(stack_dir: str, port_offset: int) -> dict[str, str]:
    return {**os.environ, "STACK_DIR": stack_dir, "STACK_PORT_OFFSET": str(port_offset)}


def start_second_stack(s: Settings) -> str:
    """The operator-mistake fault's second Kafka cluster: ``scripts/stack up`` (one broker,
    no Toxiproxy) on its own instance; returns its bootstrap servers."""
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
    for attempt in range(5):
        try:
            stack_ops.stack("up", "--toxiproxy", "--brokers", str(s.brokers), timeout=600)
            Toxiproxy(toxiproxy_url).reset()
            return
        except (AssertionError, ToxiproxyError) as exc:
            if attempt == 4:
                raise CampaignError(f"cannot heal the stack: {exc}") from None
            time.sleep(3)


# -- the run's data --------------------------------------------------------------------


def prepare_data(s: Settings, env: dict[str, str], run_id: str) -> tuple[Services, str, str,
                                                                          str]:
    """A fresh database (with the table), business topic; returns the names."""
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


# -- stopping services at once ---------------------------------------------------------


def kill_broker(stack_dir: str, broker: int) -> None:
    """``kill -9`` of broker ``broker`` by its pid file (what ``scripts/stack
    kill-kafka`` does, without starting a process first)."""
    bdir = Path(stack_dir) / "kafka" / f"broker-{broker}"
    pid = _pid_of(bdir / "kafka.pid", str(bdir / "server.properties"))
    if pid is None:
        raise CampaignError(f"Kafka broker {broker} is not running")
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, 10.0)


def stop_postgres(stack_dir: str) -> None:
    """``pg_ctl stop -m immediate`` is SIGQUIT to the postmaster: sent here directly,
    by the pid in postmaster.pid, then wait until the postmaster is gone."""
    data = Path(stack_dir) / "postgres" / "data"
    pid = _pid_of(data / "postmaster.pid", str(data))
    if pid is None:
        raise CampaignError("PostgreSQL is not running")
    os.kill(pid, signal.SIGQUIT)
    _wait_gone(pid, 30.0)


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
