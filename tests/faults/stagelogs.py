"""What the pipeline stages' logs say (``tests/faults/stage.py``): their transactions
(batches), deliberate kills and pauses, waits for recovery, failures, restarts."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import PipelinePhase

__all__ = ["Batch", "StageLogs", "read_stage_logs"]


@dataclass
class Batch:
    """One transaction of a stage: the input messages it consumed, its gid, how it ended."""

    label: str
    phase: int
    instance: str
    inputs: list[tuple[int, int, int]]
    """(phase, partition, offset) of its input messages."""
    arm: str | None = None
    gid: str | None = None
    status: str | None = None
    """The transaction's status once over (``committed``, ``decided``, ``rolled_back``,
    ``in_doubt``...); None: the stage was killed before it reported."""
    waited: bool = False
    """``run_consumer`` waited for recovery to decide it."""


@dataclass
class StageLogs:
    batches: dict[str, Batch] = field(default_factory=dict)
    gid_label: dict[str, str] = field(default_factory=dict)
    crashes: list[tuple[str, str | None]] = field(default_factory=list)
    """(protocol point, gid) of every deliberate kill."""
    pauses: list[tuple[str, str | None]] = field(default_factory=list)
    """(step, gid) of every deliberate pause (a zombie)."""
    lost_commits: list[tuple[str, str | None]] = field(default_factory=list)
    """(mode, gid) of every lost commit request or reply."""
    kills: Counter[str] = field(default_factory=Counter)
    faults_per_phase: Counter[int] = field(default_factory=Counter)
    """Deliberate kills and pauses per phase."""
    waits: list[float] = field(default_factory=list)
    """Seconds ``run_consumer`` waited for recovery, each time it went on."""
    waits_cut: int = 0
    """Waits that ended with the process (killed, or stopped at the end)."""
    failures: Counter[str] = field(default_factory=Counter)
    """What ``run_consumer`` raised (the process then exits and is started again)."""
    reasons: Counter[str] = field(default_factory=Counter)
    """Why transactions rolled back (the error code in the coordinator's warning)."""
    starts: int = 0
    redelivered: list[str] = field(default_factory=list)
    """``run_consumer``'s warnings: messages below the committed offset handed over again
    (and dropped)."""
    recovered: set[str] = field(default_factory=set)
    """gids ``recover_own`` committed or rolled back."""


def read_stage_logs(phases: list[PipelinePhase]) -> StageLogs:
    out = StageLogs()
    for ph in phases:
        for path in sorted(ph.pdir.glob("log-stage*.jsonl")):
            _read_one(out, ph.idx, path.stem.removeprefix("log-"),
                      path.read_text(encoding="utf-8").splitlines())
    return out


def _read_one(out: StageLogs, phase: int, instance: str, raw: list[str]) -> None:
    waiting = False
    for text in raw:
        try:
            ln = json.loads(text)
        except ValueError:
            continue  # torn by a kill
        ev = ln.get("event")
        if ev == "start":
            out.starts += 1
            out.waits_cut += int(waiting)
            waiting = False
        elif ev == "batch":
            label = str(ln["tx"])
            out.batches[label] = Batch(label, phase, instance,
                                       [(phase, int(p), int(o)) for _, p, o in ln["msgs"]],
                                       arm=ln.get("arm"))
        elif ev == "gid" and str(ln.get("tx")) in out.batches:
            out.batches[str(ln["tx"])].gid = str(ln["gid"])
            out.gid_label[str(ln["gid"])] = str(ln["tx"])
        elif ev == "result" and str(ln.get("tx")) in out.batches:
            b = out.batches[str(ln["tx"])]
            b.status = str(ln.get("status"))
            if b.status == "rolled_back":
                out.reasons[_reason(ln.get("reason"))] += 1
            b.waited = b.waited or bool(ln.get("waiting"))
            if ln.get("gid") and b.gid is None:
                b.gid = str(ln["gid"])
                out.gid_label[b.gid] = b.label
        elif ev == "wait":
            waiting = True
        elif ev == "resumed":
            waiting = False
            out.waits.append(float(ln.get("seconds", 0.0)))
        elif ev == "crash":
            point = str(ln.get("point"))
            out.crashes.append((point, ln.get("gid")))
            out.kills[point] += 1
            out.faults_per_phase[phase] += 1
        elif ev == "pause":
            out.pauses.append((str(ln.get("step")), ln.get("gid")))
            out.faults_per_phase[phase] += 1
        elif ev == "lost-commit":
            out.lost_commits.append((str(ln.get("mode")), ln.get("gid")))
            out.faults_per_phase[phase] += 1
        elif ev == "failed":
            out.failures[str(ln.get("error"))] += 1
        elif ev == "redelivered":
            out.redelivered.append(f"{instance}: {ln.get('text')}")
        elif ev == "recover_own":
            out.recovered.update(ln.get("committed", []))
            out.recovered.update(ln.get("rolled_back", []))
        elif ev == "end":
            out.waits_cut += int(waiting)
            waiting = False
    out.waits_cut += int(waiting)


def _reason(text: object) -> str:
    """The error code of a coordinator warning (``UNKNOWN_MEMBER_ID``...), or its start."""
    if not text:
        return "no warning"
    found = re.search(r"\b_?[A-Z][A-Z_]{4,}\b", str(text))
    return found.group(0) if found else str(text)[:60]
