"""Reporting: progress lines, the record of injected faults, the tables and the summary."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import PAUSE_STEPS, POINTS, Settings

if TYPE_CHECKING:
    from .check import Result

__all__ = ["Journal", "fault_totals", "kafka_sizes", "render_table", "say", "write_summary"]


def say(message: str) -> None:
    print(f"faults: {message}", file=sys.stderr, flush=True)



class Journal:
    """``events.jsonl``: every fault injected (and a few other events), with the phase it
    happened in; counts the faults per phase for the table."""

    def __init__(self, path: Path) -> None:
        self.phase = "setup"
        self.faults_per_kind: dict[str, int] = {}
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def event(self, fault: str, **detail: object) -> None:
        """Record ``fault``; it counts as an injected fault unless ``counts=False``."""
        counts = bool(detail.pop("counts", True))
        with self._lock:
            if counts:
                self.faults_per_kind[self.phase] = self.faults_per_kind.get(self.phase, 0) + 1
            self._file.write(json.dumps({"t": time.time(), "phase": self.phase,
                                         "fault": fault, **detail}, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


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
        elif fault == "undo-retried":
            count["Toxiproxy calls retried while undoing a network fault"] += int(
                ev.get("calls", 0))
        elif fault in ("undo-failed", "injector-error"):
            count[f"harness: {fault} (Toxiproxy reset)"] += 1
    parts = [f"kill -9 at a protocol step {sum(kills.values())}"]
    parts += [f"{k} {v}" for k, v in count.items() if "network" not in k]
    if count["network cuts"]:
        detail = ", ".join(f"{m} {n}" for m, n in sorted(cuts.items()))
        parts.append(f"network cuts {count['network cuts']} ({detail})")
    return "; ".join(parts)


def write_summary(s: Settings, out: Path, result: Result, *, plan: dict[str, Any],
                  phase_info: Sequence[dict[str, Any]], lines: list[dict[str, Any]],
                  faults_per_kind: dict[str, int], started_stack: float,
                  elapsed: float, extra: Sequence[str] = ()) -> tuple[str, bool]:
    """The run's summary (printed, and kept as ``summary.txt`` and ``result.json`` in
    ``out``); returns it and whether the run was incomplete. ``extra``: the pipeline
    workload's lines (``INCOMPLETE: ...`` ones make the run incomplete)."""
    from .check import COLUMNS

    table_text = render_table(result.table, s.faults, result.kill_outcomes, COLUMNS,
                              result.pause_outcomes)
    not_attempted = sum(1 for o in plan if o not in result.ops or
                        not result.ops[o].attempts)
    summary = [
        f"seed={s.seed}",
        f"command: {s.command}",
        f"brokers={s.brokers} workers={s.workers} driver={s.driver} threads={s.threads} "
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
    if extra:
        summary.append(
            "pipeline rows: ops = input messages; committed = input messages with a "
            "committed row; rolled back = input messages delivered again after a transaction "
            "of theirs rolled back; told unknown = input messages of a transaction whose "
            "outcome was unknown (run_consumer waited for recovery); by recovery = input "
            "messages of a transaction recovery resolved; faults include the stages' kills "
            "at a protocol step and zombie pauses")
    timed_out = [p["phase"] for p in phase_info if p["timed_out"]]
    incomplete = bool(not_attempted or timed_out
                      or any(x.startswith("INCOMPLETE") for x in extra))
    summary.append("workload: " + ", ".join(f"{k} {v}" for k, v in sorted(result.workload.items())))
    summary.append("answers to attempts: " + ", ".join(
        f"{k} {v}" for k, v in result.answers.most_common()))
    summary.extend(extra)
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
        "settings": asdict(s), "phases": list(phase_info), "table": result.table,
        "totals": result.totals, "kills": dict(result.kills),
        "kill_outcomes": {k: dict(v) for k, v in result.kill_outcomes.items()},
        "answers": dict(result.answers), "workload": dict(result.workload),
        "problems": result.problems,
        "reference_problems": result.reference_problems,
        "faults_per_kind": faults_per_kind, "not_attempted": not_attempted,
        "seconds": round(elapsed, 1)}, indent=1))
    return text, incomplete
