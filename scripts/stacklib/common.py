"""Paths, errors, processes, ports and package installs shared by the stack's services."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".stack"
"""Downloads and builds shared by every stack instance (Kafka jars, Toxiproxy, Go caches)."""
STACK_DIR = (Path(os.environ["STACK_DIR"]).resolve() if os.environ.get("STACK_DIR")
             else CACHE_DIR)
"""This instance's data, pid files and logs. ``STACK_DIR=<dir>`` (with
``STACK_PORT_OFFSET=<n>``) runs a second, independent stack next to the default one."""
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
LOOPBACK = "127.0.0.1"


def _port_offset() -> int:
    raw = os.environ.get("STACK_PORT_OFFSET", "").strip() or "0"
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 20000:
        raise SystemExit(f"stack: error: STACK_PORT_OFFSET must be 0..20000, not {raw!r}")
    return value


PORT_OFFSET = _port_offset()
"""Added to every port of this instance (0 for the default stack)."""


class StackError(Exception):
    """An expected failure: printed as a clean message, never as a traceback."""


def say(message: str) -> None:
    """Progress output goes to stderr so that `scripts/stack env` keeps a clean stdout."""
    print(f"stack: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"    (no log at {path})"
    return "\n".join(f"    {line}" for line in text) or "    (log is empty)"


def run_logged(
    cmd: Sequence[str],
    log: Path,
    what: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    new_session: bool = False,
) -> None:
    """Run a command with its output appended to `log`; raise StackError with the log tail.

    `new_session` keeps daemons it starts out of our process group, so a Ctrl-C aimed at
    the caller (a test run, say) does not reach them.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            code = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, timeout=timeout, check=False, start_new_session=new_session,
            ).returncode
        except FileNotFoundError as exc:
            raise StackError(f"{what} failed: {cmd[0]} not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"{what} timed out after {timeout} s; log {log}:\n{tail(log)}") \
                from exc
    if code != 0:
        raise StackError(f"{what} failed (exit {code}); last lines of {log}:\n{tail(log)}")


def read_pid(path: Path) -> int | None:
    """The pid in the first line of a pid file, or None when absent or garbled."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def process_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def process_cmdline(pid: int) -> str:
    """The command line of a process with spaces between arguments ('' when gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def process_runs(pid: int, needle: str, settle: float = 2.0) -> bool:
    """True when `pid` is alive and its command line contains `needle`.

    A process started an instant ago can still show an empty (or its parent's) command
    line while the kernel finishes its exec; a live process that does not match yet is
    looked at again for up to `settle` seconds before it is declared someone else's.
    """
    deadline = time.monotonic() + settle
    while process_alive(pid):
        if needle in process_cmdline(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until `pid` is gone; True when it went away within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def port_answers(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_in_use(port: int) -> bool:
    """True when 127.0.0.1:port cannot be bound (someone listens there or holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return port_answers(port)


def ensure_port_free(port: int, what: str) -> None:
    """Refuse to start `what` when another program already uses its port."""
    if port_in_use(port):
        raise StackError(
            f"port {port} (wanted by {what}) is already in use by another program, not by "
            f"this stack; see `ss -ltnp 'sport = :{port}'`, stop that program and run "
            "`scripts/stack up` again"
        )


_apt_updated = False


def apt_install(packages: Sequence[str], reason: str) -> None:
    """Install Debian packages, or explain how when this is not possible."""
    global _apt_updated
    command = f"apt-get install -y {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        raise StackError(f"{reason}; this is not a Debian system, please install it yourself")
    if os.geteuid() != 0:
        raise StackError(f"{reason}; install it as root: `{command}`")
    say(f"{reason}: installing {' '.join(packages)} with apt-get (log .stack/apt.log)")
    log = STACK_DIR / "apt.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        run_logged(["apt-get", "update"], log, "apt-get update", env=env)
        _apt_updated = True
    run_logged(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages], log, command, env=env
    )


def require_command(command: str, package: str, reason: str, *also: Path) -> str:
    """The path of `command` (on PATH or one of `also`), installing `package` when missing."""
    def find() -> str | None:
        return shutil.which(command) or next((str(p) for p in also if p.exists()), None)

    found = find()
    if found is None:
        apt_install([package], f"{reason} is missing")
        found = find()
    if found is None:
        raise StackError(f"{command} is still missing after installing {package}")
    return found


@contextlib.contextmanager
def stack_lock() -> Iterator[None]:
    """Serialise concurrent `scripts/stack` calls (for example parallel test sessions)."""
    with _flock(STACK_DIR / "lock"):
        yield


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Serialise downloads and builds into CACHE_DIR between stack instances."""
    with _flock(CACHE_DIR / "cache.lock"):
        yield


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
