"""CPU and memory accounting from ``/proc``: machine-wide, this process, and every
process on the machine labelled by what it is to the benchmark."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["OWN_PROCESSES", "CpuMeter", "ProcessCpu", "cpu_delta", "rss_kb"]

OWN_PROCESSES = ("bench process", "outbox relay", "outbox consumer", "kafka broker", "postgres")
"""The labels of the processes that do the benchmark's work (the rest is other tenants)."""


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """Cores busy machine-wide and cores used by this process over an interval."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, _ = _cpu_jiffies()
        t = os.times()
        self.proc0 = t.user + t.system

    def read(self) -> tuple[float, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        busy, _ = _cpu_jiffies()
        t = os.times()
        hz = os.sysconf("SC_CLK_TCK")
        return (busy - self.busy0) / hz / dt, (t.user + t.system - self.proc0) / dt


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ProcessCpu:
    """CPU seconds of every process, labelled: the bench's own processes by pid
    (:meth:`name`), the Kafka broker and PostgreSQL server this bench uses by their
    ports, anything else ``'<command> (other)'``."""

    def __init__(self, pg_port: int, kafka_port: int) -> None:
        self._ports = (pg_port, kafka_port)
        self._named: dict[int, str] = {os.getpid(): "bench process"}
        self._cache: dict[int, str] = {}

    def name(self, pid: int, label: str) -> None:
        self._named[pid] = label

    def _service_label(self, pid: int, comm: str, cmdline: list[bytes], ppid: int) -> str:
        pg_port, kafka_port = self._ports
        try:
            if comm == "java" and any(b"kafka.Kafka" in a for a in cmdline):
                conf = next((a.decode() for a in reversed(cmdline)
                             if a.endswith(b".properties")), "")
                path = Path(os.readlink(f"/proc/{pid}/cwd")) / conf
                mine = f":{kafka_port}" in _read_text(str(path))
                return "kafka broker" if mine else "kafka broker (other)"
            if comm.startswith("postgres"):
                master = pid if b"-D" in cmdline else ppid
                args = _read_bytes(f"/proc/{master}/cmdline").split(b"\0")
                datadir = args[args.index(b"-D") + 1].decode()
                if not datadir.startswith("/"):
                    datadir = str(Path(os.readlink(f"/proc/{master}/cwd")) / datadir)
                port = _read_text(f"{datadir}/postmaster.pid").splitlines()[3].strip()
                return "postgres" if port == str(pg_port) else "postgres (other)"
        except (OSError, ValueError, IndexError):
            pass
        if comm.startswith("postgres"):
            return "postgres (other)"
        return f"{comm} (other)"

    def snapshot(self) -> dict[tuple[int, str], float]:
        """CPU seconds (user+system) of every process now running, by (pid, label)."""
        out: dict[tuple[int, str], float] = {}
        hz = os.sysconf("SC_CLK_TCK")
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            try:
                raw = _read_text(f"/proc/{d}/stat")
                comm = raw[raw.index("(") + 1: raw.rindex(")")]
                fields = raw[raw.rindex(")") + 2:].split()
                secs = (int(fields[11]) + int(fields[12])) / hz
                label = self._named.get(pid) or self._cache.get(pid)
                if label is None:
                    cmdline = _read_bytes(f"/proc/{d}/cmdline").split(b"\0")
                    label = self._service_label(pid, comm, cmdline, int(fields[1]))
                    self._cache[pid] = label
            except OSError:
                continue
            out[(pid, label)] = secs
        return out


def cpu_delta(before: dict[tuple[int, str], float],
              after: dict[tuple[int, str], float]) -> list[tuple[str, float]]:
    """CPU seconds used between two snapshots, by label (processes that exited in
    between are not counted), largest first."""
    sums: dict[str, float] = {}
    for key, secs in after.items():
        sums[key[1]] = sums.get(key[1], 0.0) + secs - before.get(key, 0.0)
    return sorted(((k, v) for k, v in sums.items() if v > 0), key=lambda kv: -kv[1])


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
