"""A throw-away PostgreSQL cluster for a benchmark: initdb, pg_ctl start and stop.

Used by ``tests/bench/recovery.py``, which needs ``max_prepared_transactions`` far above
what the development stack allows.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

__all__ = ["Cluster", "bin_dir", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bin_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise SystemExit("pg_ctl not found: install PostgreSQL or pass --pg-bin")
    return Path(pg_ctl).parent


class Cluster:
    """initdb + pg_ctl start/stop of a throw-away cluster in ``base``."""

    def __init__(self, bin_dir: Path, base: Path, port: int) -> None:
        self.bin = bin_dir
        self.base = base
        self.data = base / "pgdata"
        self.log = base / "postgres.log"
        self.port = port
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.started = False

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self._as_server_user(cmd), capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}"
                             f"\n{done.stderr}")

    def reachable(self) -> bool:
        """Whether the server's OS user can traverse to ``base`` (not under /root 0700)."""
        self.base.mkdir(parents=True, exist_ok=True)
        probe = subprocess.run(self._as_server_user(["test", "-x", str(self.base.parent)]),
                               capture_output=True, check=False)
        return probe.returncode == 0

    def start(self) -> None:
        if self.data.exists():
            self.stop_stale()
            shutil.rmtree(self.data)
        self.base.mkdir(parents=True, exist_ok=True)
        self._chown(self.base)
        self.log.unlink(missing_ok=True)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync"])
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write(
                "\n# tests/bench/pgcluster.py\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\n"
                "max_prepared_transactions = 12000\n"
                "max_connections = 100\n"
                "shared_buffers = '256MB'\n"
            )
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-w", "-t", "120", "start"])
        self.started = True

    def stop(self) -> None:
        if self.started:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                       "-t", "120", "stop"])
            self.started = False

    def stop_stale(self) -> None:
        """A cluster left running by an earlier --keep-cluster run: stop it via its pid file."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_server_user(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                capture_output=True, check=False)
