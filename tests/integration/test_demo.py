"""The demo (scripts/demo -> examples/demo.py) runs and finds both sides agreeing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_demo(pg_db: str, kafka_bootstrap: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.demo", "--instance", f"demo-{uuid.uuid4().hex[:8]}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PG_DSN": pg_db, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )


def test_demo_runs_and_both_sides_agree(pg_db: str, kafka_bootstrap: str) -> None:
    for _ in range(2):  # it can run again
        done = run_demo(pg_db, kafka_bootstrap)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert out.count("  committed  gid pk2pc2:demo:") == 5
        assert "rolled_back: PaymentDeclined" in out
        assert "AlreadyCommitted" in out
        assert "PostgreSQL rows: 5   Kafka events: 5" in out
        assert ": 5 for 5 committed transactions" in out
        assert out.rstrip().splitlines()[-1].startswith("Both sides agree")


def test_pipeline_example_survives_a_kill(pg_db: str, kafka_bootstrap: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.pipeline", "--instance", f"p-{uuid.uuid4().hex[:8]}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PG_DSN": pg_db, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage exit status -9" in done.stdout
    assert "invoices: 300   payments (read_committed): 300   duplicates: 0" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("Exactly once")


def test_demo_without_services_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PG_DSN", "KAFKA_BOOTSTRAP_SERVERS")}
    done = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "scripts/demo" in done.stdout
