"""A private PostgreSQL cluster from Debian's postgresql package, run as the `postgres` OS user.

Layout: .stack/postgres/ (owned by the OS user that runs the server, mode 0700) holds
    data/          the cluster made by initdb (settings in data/stack.conf, rewritten on start)
    run/           the unix socket directory
    postgres.log   the server log (pg_ctl -l)
    initdb.done    written after a complete initdb, else an unfinished data/ is redone
When the repository sits where the postgres user cannot traverse (for example under /root,
mode 0700), this folder lives in ~postgres/pg-kafka-2pc-<hash> and .stack/postgres is a symlink.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from .common import (
    LOOPBACK,
    PORT_OFFSET,
    STACK_DIR,
    StackError,
    apt_install,
    ensure_port_free,
    port_answers,
    process_alive,
    process_cmdline,
    read_pid,
    run_logged,
    say,
    tail,
)

PG_PORT = 25432 + PORT_OFFSET
PG_PROXY_PORT = PG_PORT + 1
"""Toxiproxy's listener in front of PostgreSQL (with `up --toxiproxy`)."""
PG_ROLE = "postgres"
DSN = f"postgresql://{PG_ROLE}@{LOOPBACK}:{PG_PORT}/postgres"
PROXY_DSN = f"postgresql://{PG_ROLE}@{LOOPBACK}:{PG_PROXY_PORT}/postgres"
HOME = STACK_DIR / "postgres"
DATA = HOME / "data"
RUN = HOME / "run"
LOG = HOME / "postgres.log"
INIT_MARKER = HOME / "initdb.done"
READY_TIMEOUT = 60.0
NO_MAIN_CLUSTER = Path("/etc/postgresql-common/createcluster.d/50-pg-kafka-2pc.conf")

# The private cluster listens on 127.0.0.1 only, so "trust" (no password) is limited to
# programs on this machine. Never copy this file to a server reachable from a network.
PG_HBA = """\
# Written by scripts/stack: a private loopback-only development cluster, no passwords.
local all all trust
host  all all 127.0.0.1/32 trust
"""


def os_user() -> str:
    """Root may not run the server: as root it runs as `postgres`, else as the caller."""
    return "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def _as_os_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise StackError("the `postgres` OS user is missing (Debian's postgresql package "
                         "creates it): `apt-get install -y postgresql`") from exc
    return ["runuser", "-u", "postgres", "--", *cmd]


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _cluster_major() -> str | None:
    """The major version of a complete cluster (None when there is none yet)."""
    if not INIT_MARKER.exists():
        return None
    try:
        return (DATA / "PG_VERSION").read_text().strip()
    except OSError:
        return None


def find_bin_dir() -> Path | None:
    """The server binaries: the version that made the cluster, else the newest installed."""
    found = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
        key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0,
    )
    major = _cluster_major()
    if major is not None:
        found = [b for b in found if b.parent.name == major] or found
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def ensure_installed() -> Path:
    """The PostgreSQL bin directory, installing Debian's postgresql package when missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.geteuid() == 0 and not NO_MAIN_CLUSTER.exists():
            # Our private cluster is all we need: no Debian "main" cluster on port 5432.
            NO_MAIN_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
            NO_MAIN_CLUSTER.write_text("# pg-kafka-2pc uses its own cluster\n"
                                       "create_main_cluster = false\n")
        apt_install(["postgresql"], "PostgreSQL (initdb, pg_ctl) is missing")
        bin_dir = find_bin_dir()
    if bin_dir is None:
        raise StackError("PostgreSQL's pg_ctl is still missing after installing postgresql")
    major = _cluster_major()
    if major is not None and bin_dir.parent.name.isdigit() and bin_dir.parent.name != major:
        raise StackError(f"the cluster in {DATA} is PostgreSQL {major} but only "
                         f"{bin_dir} is installed; run `scripts/stack reset` to make a new one")
    return bin_dir


def running_pid() -> int | None:
    """The postmaster pid of our cluster when it runs."""
    pid = read_pid(DATA / "postmaster.pid")
    if pid is not None and process_alive(pid) and str(DATA) in process_cmdline(pid):
        return pid
    return None


def serving() -> bool:
    return running_pid() is not None and port_answers(PG_PORT)


# --- creating the cluster ---------------------------------------------------------------------


def _can_reach(path: Path) -> bool:
    probe = subprocess.run(_as_os_user(["test", "-x", str(path)]), capture_output=True,
                           check=False)
    return probe.returncode == 0


def _prepare_home() -> None:
    """Create .stack/postgres owned by the server's OS user (or the symlink, see above)."""
    if HOME.exists():
        return
    STACK_DIR.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and not _can_reach(STACK_DIR):
        digest = hashlib.sha256(str(STACK_DIR).encode()).hexdigest()[:10]
        target = Path(pwd.getpwnam("postgres").pw_dir) / f"pg-kafka-2pc-{digest}"
        say(f"the postgres user cannot reach {STACK_DIR}; the cluster lives in {target}")
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        _chown(target)
        HOME.symlink_to(target)
        return
    HOME.mkdir(mode=0o700)
    _chown(HOME)


def _initdb(bin_dir: Path) -> None:
    if INIT_MARKER.exists():
        return
    if DATA.exists():
        say(f"removing the unfinished cluster in {DATA} left by an interrupted initdb")
        shutil.rmtree(DATA)
    say(f"creating a PostgreSQL cluster in {DATA}")
    cmd = [str(bin_dir / "initdb"), "-D", str(DATA), "-U", PG_ROLE, "--auth=trust",
           "-E", "UTF8", "--no-locale", "--no-instructions"]
    run_logged(_as_os_user(cmd), HOME / "initdb.log", "initdb", cwd=HOME)
    with (DATA / "postgresql.conf").open("a") as conf:
        conf.write("\n# Settings of scripts/stack, rewritten on every start\n")
        conf.write("include 'stack.conf'\n")
    (DATA / "pg_hba.conf").write_text(PG_HBA)
    INIT_MARKER.write_text("initdb complete\n")


def _socket_dir() -> str:
    """Unix socket paths are limited to 107 bytes; use TCP only when .stack is too deep."""
    return "" if len(f"{RUN}/.s.PGSQL.{PG_PORT}") > 100 else str(RUN)


def _write_settings() -> None:
    RUN.mkdir(exist_ok=True)
    _chown(RUN)
    conf = DATA / "stack.conf"
    conf.write_text(
        "# Written by scripts/stack on every start; edit scripts/stacklib/postgres.py instead.\n"
        f"port = {PG_PORT}\n"
        f"listen_addresses = '{LOOPBACK}'\n"
        f"unix_socket_directories = '{_socket_dir()}'\n"
        "max_connections = 300\n"
        "max_prepared_transactions = 128\n"
        "shared_buffers = 256MB\n"
        "# durable defaults, stated explicitly: crash tests rely on them\n"
        "fsync = on\n"
        "synchronous_commit = on\n"
        "full_page_writes = on\n"
    )
    _chown(conf)


def _clear_stale_pid_file() -> None:
    """A crash can leave postmaster.pid naming a pid that now belongs to another program."""
    pid_file = DATA / "postmaster.pid"
    pid = read_pid(pid_file)
    if pid is None:
        return
    cmdline = process_cmdline(pid) if process_alive(pid) else ""
    if "postgres" not in cmdline:
        say(f"removing stale {pid_file} (pid {pid} is not a PostgreSQL process)")
        pid_file.unlink(missing_ok=True)
    elif str(DATA) not in cmdline:
        raise StackError(f"{pid_file} names pid {pid}, a PostgreSQL process that is not this "
                         "stack's; stop it, or run `scripts/stack reset`")


# --- starting and stopping ----------------------------------------------------------------


def _reset_hint() -> str:
    return ("If the cluster is damaged (for example after a crash), `scripts/stack reset` "
            "deletes it and the next `scripts/stack up` makes a new one.")


def start() -> None:
    """Start the cluster (making it first if needed) unless it already runs."""
    bin_dir = ensure_installed()
    if running_pid() is not None:
        return
    ensure_port_free(PG_PORT, "PostgreSQL")
    _prepare_home()
    _initdb(bin_dir)
    _write_settings()
    _clear_stale_pid_file()
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(DATA), "-l", str(LOG), "-w", "-t", "120", "start"]
    try:
        run_logged(_as_os_user(cmd), HOME / "pg_ctl.log", "pg_ctl start", cwd=HOME,
                   new_session=True)
    except StackError:
        raise StackError(f"PostgreSQL did not start (`pg_ctl start` failed, see "
                         f"{HOME / 'pg_ctl.log'}); last lines of {LOG}:\n{tail(LOG, 12)}\n"
                         f"{_reset_hint()}") from None
    say(f"started PostgreSQL {bin_dir.parent.name} (pid {running_pid()}, log {LOG})")


def _show_max_prepared(bin_dir: Path) -> str:
    cmd = [str(bin_dir / "psql"), "-X", "-A", "-t", "-h", LOOPBACK, "-p", str(PG_PORT),
           "-U", PG_ROLE, "-d", "postgres", "-c", "SHOW max_prepared_transactions"]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "3"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def wait_ready() -> None:
    """Wait until a connection works and max_prepared_transactions > 0."""
    bin_dir = ensure_installed()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if running_pid() is None:
            raise StackError(f"PostgreSQL is not running; last lines of {LOG}:\n{tail(LOG)}\n"
                             f"{_reset_hint()}")
        value = _show_max_prepared(bin_dir)
        if value.isdigit() and int(value) > 0:
            return
        if value.isdigit():
            raise StackError(f"PostgreSQL answers but max_prepared_transactions = {value}")
        if time.monotonic() > deadline:
            raise StackError(f"PostgreSQL did not accept connections within {READY_TIMEOUT:.0f} "
                             f"s; last lines of {LOG}:\n{tail(LOG)}")
        time.sleep(0.3)


def stop(mode: str = "fast") -> None:
    """`pg_ctl stop -m <mode>`; a fast stop that fails falls back to immediate."""
    pid = running_pid()
    if pid is None:
        return
    bin_dir = ensure_installed()
    say(f"stopping PostgreSQL (pid {pid}, -m {mode})")
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(DATA), "-m", mode, "-w", "-t", "60", "stop"]
    try:
        run_logged(_as_os_user(cmd), HOME / "pg_ctl.log", f"pg_ctl stop -m {mode}", cwd=HOME)
    except StackError:
        if mode == "immediate":
            raise
        say("fast shutdown failed; trying -m immediate")
        stop("immediate")


def remove_cluster() -> None:
    """Delete the cluster folder (and its symlink target)."""
    target = HOME.resolve() if HOME.is_symlink() else HOME
    if HOME.is_symlink():
        HOME.unlink()
    shutil.rmtree(target, ignore_errors=True)


def status_line() -> tuple[bool, str]:
    pid = running_pid()
    up = pid is not None and port_answers(PG_PORT)
    state = f"running, pid {pid}" if up else (f"NOT SERVING, pid {pid}" if pid else "stopped")
    return up, (f"postgres: {state}; {LOOPBACK}:{PG_PORT} (sockets in {RUN}); data {DATA}; "
                f"log {LOG}")
