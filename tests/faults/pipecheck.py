"""The pipeline workload's checker: each input message must give exactly one row and one
output message visible to ``read_committed`` consumers, and each phase's committed offsets
must end at the end of its input.

After the faults stopped and recovery exited 0, for every input message (a record of a
phase's input topic: phase, partition, offset), against the rows of ``pipeline`` and the
output messages (both carry the input's partition and offset and the label of the
transaction that made them), and for every transaction the stages logged (its batch, its
gid, how it ended):

* **lost** -- the input has neither a row nor an output message; or a transaction the
  stage was told committed (status ``committed``/``decided``) is not;
* **duplicate** -- two rows or two output messages for one input, or a decision record
  visible twice;
* **divergence** -- a row without an output message or the reverse, or a row and an
  output of different transactions; an input processed although its offset is not
  committed (a consumer of the group would process it again); a transaction committed
  with only part of its batch, or without a gid logged before its PREPARE; a decision
  record visible for a transaction whose rows are not, or the reverse; a transaction
  told rolled back that is visible; a row, an output or a decision record that no logged
  transaction or no input message explains;
* **leftover** -- a prepared transaction of a stage still in PostgreSQL.

Each problem is counted once per input message, in the row of its phase.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from tests.crash.checker import decision_records, prepared_gids
from tests.plugins.kafka_helpers import read_committed

from .check import COLUMNS, Result
from .pipeline import PARTITIONS, TABLE, PipelinePhase, is_stage_gid
from .settings import Settings
from .stagelogs import Batch, StageLogs, read_stage_logs

__all__ = ["PipeResult", "check_pipeline", "describe", "fold"]

Input = tuple[int, int, int]
"""(phase, partition, offset) of an input message."""
CATEGORIES = ("divergences", "duplicates", "lost")


@dataclass
class PipeResult:
    table: dict[str, dict[str, int]]
    totals: dict[str, int]
    problems: list[str]
    logs: StageLogs
    kill_outcomes: dict[str, Counter[str]]
    pause_outcomes: dict[str, Counter[str]]
    offsets_at_end: dict[str, bool]
    """phase kind -> whether the group's committed offsets are at the end of its input."""
    lost_outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    """lost commit request / reply -> how the transaction ended."""
    not_fed: int = 0
    transactions: Counter[str] = field(default_factory=Counter)
    not_consumed: list[str] = field(default_factory=list)
    """Input messages at or past their partition's committed offset with no row and no
    output: never handled (the phase ended first), not lost."""


class _Flags:
    def __init__(self) -> None:
        self.by_input: dict[Input, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.unowned: dict[str, list[str]] = defaultdict(list)

    def flag(self, key: Input, category: str, text: str) -> None:
        self.by_input[key][category].append(f"input {key[0]}/{key[1]}:{key[2]}: {text}")

    def batch(self, b: Batch, category: str, text: str) -> None:
        for key in b.inputs:
            self.flag(key, category, f"transaction {b.label}: {text}")


def _visible(dsn: str, bootstrap: str, sink: str, timeout: float
             ) -> tuple[dict[Input, list[str]], dict[Input, list[str]], list[str]]:
    """Rows and outputs per input (the labels of the transactions that made them), and
    what cannot be attributed to an input."""
    bad: list[str] = []
    rows: dict[Input, list[str]] = defaultdict(list)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for phase, part, off, in_id, tx in conn.execute(sql.SQL(
                "SELECT phase, part, off, in_id, tx FROM {}").format(sql.Identifier(TABLE))):
            rows[(int(str(phase)), int(str(part)), int(str(off)))].append(f"{tx}|{in_id}")
    outputs: dict[Input, list[str]] = defaultdict(list)
    for rec in read_committed(bootstrap, sink, timeout):
        try:
            body = json.loads(rec.value or b"")
            label, (part, off) = str(body["tx"]), str(body["src"]).split(":")
            key = (int(label.split(".")[0]), int(part), int(off))
            in_id = str(body["in"])
        except (ValueError, KeyError, TypeError, IndexError):
            bad.append(f"unparsable output message at {rec.partition}/{rec.offset}")
            continue
        if (rec.key or b"").decode() != in_id:
            bad.append(f"output message at {rec.partition}/{rec.offset}: key "
                       f"{rec.key!r} is not its input {in_id}")
        outputs[key].append(f"{label}|{in_id}")
    return rows, outputs, bad


def _committed(bootstrap: str, ph: PipelinePhase) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": ph.group,
                  "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        tps = c.committed([TopicPartition(ph.source, p) for p in range(PARTITIONS)], timeout=60)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def check_pipeline(*, dsn: str, bootstrap: str, name: str, sink: str, decision_topic: str,
                   phases: list[PipelinePhase], resolved_by_recovery: set[str],
                   faults_per_kind: Mapping[str, int], timeout: float = 120.0) -> PipeResult:
    logs = read_stage_logs(phases)
    resolved = resolved_by_recovery | logs.recovered
    f = _Flags()
    inputs: dict[Input, str] = {}
    kind_of: dict[int, str] = {ph.idx: ph.kind for ph in phases}
    offsets_at_end: dict[str, bool] = {}
    not_fed = 0
    not_consumed: list[str] = []
    committed_offset: dict[tuple[int, int], int] = {}
    for ph in phases:
        seen = set()
        for rec in read_committed(bootstrap, ph.source, timeout):
            key_text = (rec.key or b"").decode()
            inputs[(ph.idx, rec.partition, rec.offset)] = key_text
            seen.add(key_text)
        not_fed += len(set(ph.inputs) - seen)
        committed = _committed(bootstrap, ph)
        end: dict[int, int] = Counter(p for (i, p, _) in inputs if i == ph.idx)
        offsets_at_end[ph.kind] = all(committed.get(p, -1) >= n for p, n in end.items())
        for p in range(PARTITIONS):
            committed_offset[(ph.idx, p)] = committed.get(p, -1)
    rows, outputs, bad = _visible(dsn, bootstrap, sink, timeout)
    f.unowned["divergences"].extend(bad)

    # -- per input message ----------------------------------------------------------------
    for key in sorted((set(rows) | set(outputs)) - set(inputs)):
        f.unowned["divergences"].append(f"input {key} has {len(rows.get(key, []))} row(s) and "
                                        f"{len(outputs.get(key, []))} output(s) but no such "
                                        "input message exists")
    for key, in_id in inputs.items():
        r, u = rows.get(key, []), outputs.get(key, [])
        for made in (*r, *u):
            if made.split("|", 1)[1] != in_id:
                f.flag(key, "divergences", f"made for {made.split('|', 1)[1]!r}, not {in_id!r}")
        if not r and not u:
            if key[2] >= committed_offset.get((key[0], key[1]), -1):
                not_consumed.append(f"{key[0]}/{key[1]}:{key[2]}")  # never got that far
            else:  # the group's offsets passed it: skipped
                f.flag(key, "lost", f"{in_id}: no row and no output message, below the "
                       f"committed offset {committed_offset.get((key[0], key[1]))}")
            continue
        if len(r) > 1 or len(u) > 1:
            f.flag(key, "duplicates", f"{in_id}: {len(r)} rows, {len(u)} output messages")
        if bool(r) != bool(u):
            f.flag(key, "divergences", f"{in_id}: {len(r)} row(s) but {len(u)} output(s)")
        elif sorted(r) != sorted(u):
            f.flag(key, "divergences", f"{in_id}: rows of {r}, outputs of {u}")
        if key[2] >= committed_offset.get((key[0], key[1]), -1):
            f.flag(key, "divergences", f"{in_id}: processed, but the group's committed "
                   f"offset is {committed_offset.get((key[0], key[1]))}")

    # -- per transaction ------------------------------------------------------------------
    made_by: dict[str, set[Input]] = defaultdict(set)
    for key, labels in (*rows.items(), *outputs.items()):
        for made in labels:
            made_by[made.split("|", 1)[0]].add(key)
    decisions = Counter({g: n for g, n in decision_records(bootstrap, decision_topic,
                                                           timeout).items() if is_stage_gid(g)})
    for label in sorted(set(made_by) - set(logs.batches)):
        f.unowned["divergences"].append(f"transaction {label} is visible but was never logged")
    txs: Counter[str] = Counter()
    for b in logs.batches.values():
        visible = made_by.get(b.label, set())
        txs["committed" if visible else "not committed"] += 1
        txs[f"status {b.status or 'none (killed)'}"] += 1
        if visible and visible != set(b.inputs):
            f.batch(b, "divergences", f"committed {len(visible)} of its {len(b.inputs)} inputs")
        if visible and b.gid is None:
            f.batch(b, "divergences", "committed but no gid was logged before its PREPARE")
        if b.gid is not None:
            d = decisions.get(b.gid, 0)
            if (d > 0) != bool(visible):
                f.batch(b, "divergences", f"decision record {'visible' if d else 'absent'} "
                        f"but its rows are {'absent' if d else 'committed'} ({b.gid})")
            if d > 1:
                f.batch(b, "duplicates", f"decision record of {b.gid} visible {d} times")
        if b.status in ("committed", "decided") and not visible:
            f.batch(b, "lost", f"the stage was told {b.status} but it is not committed")
        if b.status == "rolled_back" and visible:
            f.batch(b, "divergences", "the stage was told rolled back but it is visible")
    for gid in sorted(set(decisions) - set(logs.gid_label)):
        f.unowned["divergences"].append(f"decision record of {gid}, which no stage logged")
    leftover: Counter[str] = Counter()
    for gid in prepared_gids(dsn, name):
        if not is_stage_gid(gid):
            continue
        owner = logs.batches.get(logs.gid_label.get(gid, ""))
        if owner is None:
            f.unowned["leftovers"].append(f"prepared transaction {gid} left (not logged)")
        else:
            leftover[kind_of.get(owner.phase, "?")] += 1
            f.unowned["leftover-detail"].append(f"transaction {owner.label}: {gid} still "
                                                "prepared")

    # -- the table rows -------------------------------------------------------------------
    table: dict[str, dict[str, int]] = {}
    rolled: set[Input] = set()
    unknown: set[Input] = set()
    by_recovery: set[Input] = set()
    for b in logs.batches.values():
        if not made_by.get(b.label):
            rolled.update(b.inputs)
        if b.status == "in_doubt" or b.waited:
            unknown.update(b.inputs)
        if b.gid in resolved:
            by_recovery.update(b.inputs)
    for ph in phases:
        row = table.setdefault(ph.kind, dict.fromkeys(COLUMNS, 0))
        row["faults"] = (faults_per_kind.get(ph.kind, 0) + logs.faults_per_phase[ph.idx])
        row["leftovers"] = leftover[ph.kind]
    for key in inputs:
        row = table[kind_of[key[0]]]
        row["ops"] += 1
        row["committed"] += int(bool(rows.get(key)))
        row["rolled back"] += int(key in rolled)
        row["told unknown"] += int(key in unknown)
        row["by recovery"] += int(key in by_recovery)
        for c in CATEGORIES:
            row[c] += int(bool(f.by_input.get(key, {}).get(c)))
    totals = dict.fromkeys(COLUMNS, 0)
    for row in table.values():
        for k, v in row.items():
            totals[k] += v
    totals["divergences"] += len(f.unowned["divergences"])
    totals["leftovers"] += len(f.unowned["leftovers"])
    problems = [*f.unowned["divergences"], *f.unowned["leftovers"],
                *f.unowned["leftover-detail"]]
    for key in sorted(f.by_input):
        for c in CATEGORIES:
            problems.extend(f.by_input[key].get(c, []))
    return PipeResult(table, totals, problems, logs,
                      _outcomes(logs.crashes, logs, made_by, f),
                      _outcomes(logs.pauses, logs, made_by, f), offsets_at_end,
                      _outcomes(logs.lost_commits, logs, made_by, f), not_fed, txs,
                      not_consumed)


def _outcomes(events: list[tuple[str, str | None]], logs: StageLogs,
              made_by: Mapping[str, set[Input]], f: _Flags) -> dict[str, Counter[str]]:
    """step -> how the transactions killed or paused there ended, and (pauses) how many
    of them have an input with a problem."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for step, gid in events:
        b = logs.batches.get(logs.gid_label.get(gid or "", ""))
        if b is None:
            out[step]["?"] += 1
            continue
        out[step]["committed" if made_by.get(b.label) else "rolled back"] += 1
        if any(f.by_input.get(k, {}).get(c) for k in b.inputs for c in CATEGORIES):
            out[step]["problem"] += 1
    return dict(out)


def fold(result: Result, pres: PipeResult) -> None:
    """Add the pipeline's rows, problems, kills and pauses to the campaign's result, so
    that its tables and final line cover both workloads."""
    result.table.update(pres.table)
    for k, v in pres.totals.items():
        result.totals[k] = result.totals.get(k, 0) + v
    result.problems.extend(pres.problems)
    result.kills.update(pres.logs.kills)
    for into, add in ((result.kill_outcomes, pres.kill_outcomes),
                      (result.pause_outcomes, pres.pause_outcomes)):
        for step, counts in add.items():
            into.setdefault(step, Counter()).update(counts)


def describe(pres: PipeResult, s: Settings, phase_info: list[dict[str, object]],
             events: Path) -> list[str]:
    """The summary's pipeline lines."""
    logs = pres.logs
    probe = [json.loads(x) for x in events.read_text(encoding="utf-8").splitlines()
             if '"liveness-restart"' in x]
    tx = pres.transactions
    statuses = ", ".join(f"{k.removeprefix('status ')} {v}" for k, v in sorted(tx.items())
                         if k.startswith("status "))
    at_end = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in pres.offsets_at_end.items())
    seconds = ", ".join(f"{p['phase']} {p['seconds']:.0f} s ({p['restarts']} restarts)"
                        for p in phase_info if str(p["phase"]).startswith("pipeline"))
    waits = sorted(logs.waits)
    lines = [
        f"pipeline: {s.stages} stages per phase ({seconds}); {len(logs.batches)} transactions, "
        f"{tx['committed']} committed, {tx['not committed']} not; how they ended for the "
        f"stage: {statuses}",
        f"pipeline: committed offsets at the end of the input: {at_end}",
        "pipeline: lost commit requests / replies (an error from commit_transaction(), "
        "instead of the call / after it) and how they ended: " + (", ".join(
            f"{mode} {sum(n[k] for k in ('committed', 'rolled back', '?'))} (committed "
            f"{n['committed']}, rolled back {n['rolled back']})"
            for mode, n in sorted(pres.lost_outcomes.items())) or "none"),
        f"pipeline: run_consumer waited for recovery after an unknown outcome {len(waits)} "
        f"time(s)" + (f", {waits[len(waits) // 2]:.1f} s median, {waits[-1]:.1f} s longest"
                      if waits else "")
        + f" ({logs.waits_cut} wait(s) ended by a kill or the phase's end); recovery every "
        f"{s.recovery_interval:g} s, grace {s.grace_seconds:g} s",
        f"pipeline: stage processes started {logs.starts} times; run_consumer raised "
        + (", ".join(f"{k} {v}" for k, v in logs.failures.most_common()) or "nothing")
        + " (the stage then exits and is started again)",
        "pipeline: transactions rolled back, by reason: "
        + (", ".join(f"{k} {v}" for k, v in logs.reasons.most_common()) or "none"),
        f"pipeline: committed messages the consumer handed over again (run_consumer dropped "
        f"them): {len(logs.redelivered)} time(s)"
        + "".join(f"; {r}" for r in logs.redelivered[:3]),
        f"pipeline: LIVENESS: stages restarted by the liveness probe {len(probe)} time(s) "
        "(the same batch rolled back again and again)"
        + "".join(f"; {p['worker']}: {p['why']}" for p in probe[:3]),
    ]
    if pres.not_fed:
        lines.append(f"INCOMPLETE: {pres.not_fed} pipeline input message(s) never delivered")
    if pres.not_consumed:
        lines.append(f"INCOMPLETE: {len(pres.not_consumed)} pipeline input message(s) never "
                     "handled, at or past their partition's committed offset: "
                     + ", ".join(pres.not_consumed[:10]))
    return lines
