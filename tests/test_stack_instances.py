"""scripts/stack: a second instance (STACK_DIR, STACK_PORT_OFFSET) and the PROXIED Kafka
listener for Toxiproxy (used by the fault campaign, scripts/faults). Nothing is started."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "scripts" / "stack"


def _stack(tmp: Path, offset: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STACK_DIR": str(tmp), "STACK_PORT_OFFSET": str(offset)}
    return subprocess.run([sys.executable, str(STACK), *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_second_instance_moves_every_port(tmp_path: Path) -> None:
    done = _stack(tmp_path, 5000, "env")
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1:30432/postgres" in done.stdout  # 25432 + 5000
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:34092" in done.stdout  # 29092 + 5000
    assert "TOXIPROXY_URL" not in done.stdout  # not a proxied stack


def test_proxied_cluster_advertises_toxiproxy(tmp_path: Path) -> None:
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "cluster.json").write_text(
        json.dumps({"cluster_id": "x", "brokers": 3, "proxied": True}))
    done = _stack(tmp_path, 5000, "env")
    assert done.returncode == 0, done.stderr
    assert "KAFKA_PROXY_BOOTSTRAP_SERVERS=127.0.0.1:34131,127.0.0.1:34132,127.0.0.1:34133" \
        in done.stdout
    assert "PG_PROXY_DSN=postgresql://postgres@127.0.0.1:30433/postgres" in done.stdout
    assert "TOXIPROXY_URL=http://127.0.0.1:34080" in done.stdout

    code = (
        "import sys; sys.path.insert(0, 'scripts'); from stacklib import kafka; "
        "c = kafka.load_cluster(); print(kafka.server_properties(c, c.broker(2)))"
    )
    env = {**os.environ, "STACK_DIR": str(tmp_path), "STACK_PORT_OFFSET": "5000"}
    props = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=60, check=True).stdout
    assert ("listeners=PLAINTEXT://127.0.0.1:34094,CONTROLLER://127.0.0.1:34095,"
            "PROXIED://127.0.0.1:34122") in props
    assert ("advertised.listeners=PLAINTEXT://127.0.0.1:34094,"
            "PROXIED://127.0.0.1:34132") in props
    assert "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT," \
        "PROXIED:PLAINTEXT" in props
    assert "inter.broker.listener.name=PLAINTEXT" in props


def test_process_runs_waits_for_a_process_that_is_still_starting() -> None:
    """A pid file written right after spawning can be read while the new process still
    shows its parent's (or an empty) command line: that is not a stale pid file."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        process_runs = importlib.import_module("stacklib.common").process_runs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "marker-for-process-runs"])
    try:
        assert process_runs(proc.pid, "marker-for-process-runs")
        assert not process_runs(proc.pid, "something-else", settle=0.2)
    finally:
        proc.kill()
        proc.wait()
    assert not process_runs(proc.pid, "marker-for-process-runs", settle=0.2)
