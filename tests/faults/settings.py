"""The campaign's vocabulary: fault kinds and groups, protocol points, settings, errors."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "GROUPS",
    "KILL_KINDS",
    "KINDS",
    "NAME",
    "OVERSIZE_LIMIT",
    "PACED_KINDS",
    "PAUSE_STEPS",
    "PIPELINE_KINDS",
    "POINTS",
    "PYTHON",
    "RECOVERY_KINDS",
    "ROOT",
    "STORM_KINDS",
    "CampaignError",
    "Settings",
    "parse_faults",
]

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
PIPELINE_KINDS = ("pipeline", "pipeline-mixed")
"""Phases of the pipeline workload (``tests/faults/pipeline.py``): consumer stages instead of
the workload's clients."""
KINDS = ("none", *KILL_KINDS, "kill-random", "kafka-restart", "pg-restart", "net-cut",
         "net-latency", *RECOVERY_KINDS, "mixed", *PIPELINE_KINDS)
GROUPS = {
    "all": KINDS,
    "kill-points": KILL_KINDS,
    "kills": (*KILL_KINDS, "kill-random"),
    "services": ("kafka-restart", "pg-restart"),
    "network": ("net-cut", "net-latency"),
    "recovery-faults": RECOVERY_KINDS,
    "pipelines": PIPELINE_KINDS,
}
STORM_KINDS = ("pause", "recovery-storm", "slow-kafka", "mixed", "pipeline-mixed")
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
    stages: int = 3
    driver: str = "sync"
    """The clients' coordinator: ``sync`` (Coordinator, threads) or ``async``
    (AsyncCoordinator, asyncio tasks)."""


def parse_faults(text: str) -> list[str]:
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
    return [k for k in KINDS if k in out]  # protocol order, the mixed phases last

