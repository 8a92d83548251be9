"""The campaign's invariant checker: PostgreSQL vs Kafka vs the decision log vs the clients.

After the faults stopped and recovery exited 0, for every operation of the campaign and
every attempt of it (an attempt is one coordinated transaction; its row and messages carry
``(op id, attempt)``):

* **divergence** -- the two systems disagree about the attempt: its row is committed but
  not all of its messages are visible to ``read_committed`` (or messages are visible
  without the row); its decision record is visible but the row is not (or the reverse);
  or the attempt is visible although its client was told it changed nothing
  (``rolled_back``, ``busy``); or something is visible that no logged attempt made;
* **duplicate** -- a message, a row or a decision record visible twice, or an operation
  committed by more than one attempt (the idempotency key must prevent that, and a client
  retries an operation without a key only after a definite roll-back);
* **leftover** -- a prepared transaction of the coordinator's name still in PostgreSQL;
* **lost** -- the client was told committed (``committed``, ``already_committed``,
  ``CommittedPendingRecovery``) and the operation is not committed (its row absent --
  whether or not its messages are visible, which is also a divergence).

``oversize`` operations (a message over the topic's ``max.message.bytes``) must be told
rolled back with nothing visible, like the other deliberate failures. Deliberate pauses
(``pause`` records of the workers) are counted per step with how the paused attempt ended.

"unknown" answers may go either way, but consistently (the checks above still apply).
Each problem is counted once per operation, in the table row of the operation's fault
kind; :attr:`Result.problems` says what exactly is wrong. The independent checker of
``tests/crash/checker.py`` runs on the same data as a second opinion.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.crash.checker import WorkerLog, check, decision_records, prepared_gids
from tests.plugins.kafka_helpers import read_committed

from .workload import NOT_APPLIED_TOLD

__all__ = ["COLUMNS", "OpView", "Result", "load_logs", "run_check"]

COLUMNS = ("ops", "faults", "committed", "rolled back", "told unknown", "by recovery",
           "divergences", "duplicates", "leftovers", "lost")


@dataclass
class AttemptView:
    number: int
    told: str | None = None
    error: str | None = None
    gid: str | None = None


@dataclass
class OpView:
    op: str
    kind: str
    attempts: dict[int, AttemptView] = field(default_factory=dict)
    final: str | None = None
    crashes: list[str] = field(default_factory=list)
    pauses: int = 0
    committed_attempts: list[int] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    by_recovery: bool = False

    def flag(self, category: str, text: str) -> None:
        self.problems[category].append(f"{self.op}: {text}")


@dataclass
class Result:
    ops: dict[str, OpView]
    table: dict[str, dict[str, int]]
    totals: dict[str, int]
    problems: list[str]
    reference_problems: list[str]
    kills: Counter[str]
    kill_outcomes: dict[str, Counter[str]]
    """point -> outcome of the attempts killed there (committed / rolled back)."""
    answers: Counter[str]
    """What the attempts were told, over all operations."""
    workload: Counter[str]
    """Operations by kind: deliberate failures, idempotent, retried."""
    pause_outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    """step -> outcome of the attempts paused there (committed / rolled back / ?), plus
    ``problem``: the operation has a problem."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.reference_problems and all(
            self.totals[k] == 0 for k in ("divergences", "duplicates", "leftovers", "lost"))

    def final_line(self) -> str:
        t = self.totals
        return (f"ops={t['ops']} divergences={t['divergences']} duplicates={t['duplicates']} "
                f"leftovers={t['leftovers']} lost={t['lost']}")


def load_logs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every JSON line of the workers' logs (a line torn by a kill is skipped)."""
    lines: list[dict[str, Any]] = []
    for path in paths:
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
    return lines


def run_check(
    *,
    dsn: str,
    bootstrap: str,
    name: str,
    table: str,
    topic: str,
    decision_topic: str,
    messages_per_op: int,
    plan: Mapping[str, Mapping[str, Any]],
    lines: list[dict[str, Any]],
    resolved_by_recovery: set[str],
    faults_per_kind: Mapping[str, int],
    timeout: float = 120.0,
) -> Result:
    """Check everything; ``plan`` maps op id -> {"phase", "kind", ...}."""
    ops: dict[str, OpView] = {}
    gid_owner: dict[str, tuple[str, int]] = {}
    kills: Counter[str] = Counter()
    crash_gids: list[tuple[str, str | None]] = []
    pauses: list[tuple[str, str, int | None]] = []
    open_attempt: dict[str, int] = {}
    for ln in lines:
        ev, op_id = ln.get("event"), ln.get("op")
        if op_id is None or op_id not in plan:
            continue
        view = ops.setdefault(op_id, OpView(op_id, str(plan[op_id].get("kind", "ok"))))
        if ev == "attempt":
            view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            open_attempt[op_id] = int(ln["attempt"])
        elif ev == "pause":
            view.pauses += 1
            pauses.append((op_id, str(ln.get("step")), open_attempt.get(op_id)))
        elif ev == "gid":
            a = view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            a.gid = str(ln["gid"])
            gid_owner[a.gid] = (op_id, a.number)
        elif ev == "result":
            a = view.attempts.setdefault(int(ln["attempt"]), AttemptView(int(ln["attempt"])))
            a.told, a.error = str(ln["told"]), ln.get("error")
            if ln.get("gid") and a.gid is None:
                a.gid = str(ln["gid"])
                gid_owner[a.gid] = (op_id, a.number)
        elif ev == "op":
            view.final = str(ln["told"])
        elif ev == "crash":
            view.crashes.append(str(ln.get("point")))
            kills[str(ln.get("point"))] += 1
            crash_gids.append((str(ln.get("point")), ln.get("gid")))

    # -- what the two systems show --------------------------------------------------
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT op_id, attempt, count(*) FROM {} GROUP BY 1, 2")
                            .format(sql.Identifier(table))).fetchall()
    row_count: dict[tuple[str, int], int] = {(str(o), int(str(a))): int(str(c))
                                             for o, a, c in rows}
    msgs: Counter[tuple[str, int, int]] = Counter()
    unparsable = 0
    for rec in read_committed(bootstrap, topic, timeout):
        try:
            body = json.loads(rec.value or b"")
            msgs[(str(body["op"]), int(body["attempt"]), int(body["n"]))] += 1
        except (ValueError, KeyError, TypeError):
            unparsable += 1
    decisions = decision_records(bootstrap, decision_topic, timeout)
    prepared = prepared_gids(dsn, name)

    global_problems: list[str] = []
    if unparsable:
        global_problems.append(f"{unparsable} unparsable message(s) in {topic}")
    msgs_by_attempt: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for (op_id, attempt, n), count in msgs.items():
        msgs_by_attempt[(op_id, attempt)][n] = count
    visible_ops = {o for o, _ in row_count} | {o for o, _ in msgs_by_attempt}
    for op_id in sorted(visible_ops - set(ops)):
        phantom = ops.setdefault(op_id, OpView(op_id, "?"))
        phantom.flag("divergences", "visible but no client ever attempted it")

    # -- per operation ----------------------------------------------------------------
    for op_id, view in ops.items():
        numbers = (set(view.attempts) | {a for o, a in row_count if o == op_id}
                   | {a for o, a in msgs_by_attempt if o == op_id})
        for number in sorted(numbers):
            a = view.attempts.get(number) or AttemptView(number)
            r = row_count.get((op_id, number), 0)
            ns = msgs_by_attempt.get((op_id, number), {})
            if number not in view.attempts and (r or ns):
                view.flag("divergences", f"attempt {number} is visible but was never logged")
            if r > 1:
                view.flag("duplicates", f"attempt {number}: row committed {r} times")
            for n, count in sorted(ns.items()):
                if count > 1:
                    view.flag("duplicates", f"attempt {number}: message {n} visible {count} "
                              "times")
            if r and len(ns) != messages_per_op:
                view.flag("divergences", f"attempt {number}: row committed but "
                          f"{len(ns)}/{messages_per_op} messages visible")
            if not r and ns:
                view.flag("divergences", f"attempt {number}: {len(ns)} message(s) visible "
                          "but no row")
            if a.gid is not None:
                d = decisions.get(a.gid, 0)
                if d > 1:
                    view.flag("duplicates", f"attempt {number}: decision record of {a.gid} "
                              f"visible {d} times")
                if (d > 0) != (r > 0):
                    view.flag("divergences", f"attempt {number} ({a.gid}): decision record "
                              f"{'visible' if d else 'absent'} but the row is "
                              f"{'absent' if d else 'committed'}")
            elif r:
                view.flag("divergences", f"attempt {number}: committed but no gid was logged "
                          "before its PREPARE")
            if a.told in NOT_APPLIED_TOLD and (r or ns):
                view.flag("divergences", f"attempt {number}: told {a.told!r} ({a.error}) but "
                          "it is visible")
            if a.told in ("committed", "pending") and not r:
                view.flag("lost", f"attempt {number}: told {a.told!r} but not committed")
            if r:
                view.committed_attempts.append(number)
        if len(view.committed_attempts) > 1:
            view.flag("duplicates", f"committed by attempts {view.committed_attempts}")
        told = [a.told for a in view.attempts.values()]
        if (view.final == "committed" or "already_committed" in told) and not \
                view.committed_attempts:
            view.flag("lost", "the client was told committed but no attempt is committed")
        if view.final == "rolled_back" and view.committed_attempts:
            view.flag("divergences", "the client was told rolled_back but it is committed")
        view.by_recovery = any(a.gid in resolved_by_recovery for a in view.attempts.values())
    for gid in sorted(decisions):
        if gid not in gid_owner:
            global_problems.append(f"decision record of {gid}, which no logged attempt made")
    for gid in prepared:
        owner = gid_owner.get(gid)
        if owner is None:
            global_problems.append(f"prepared transaction {gid} left (no logged attempt)")
        else:
            ops[owner[0]].flag("leftovers", f"attempt {owner[1]}: {gid} still prepared")

    # -- the table ------------------------------------------------------------------------
    summary: dict[str, dict[str, int]] = {}
    for op_id, view in sorted(ops.items()):
        phase = str(plan.get(op_id, {}).get("phase", "?"))
        row = summary.setdefault(phase, dict.fromkeys(COLUMNS, 0))
        if not view.attempts and view.kind != "?":
            continue
        row["ops"] += 1
        row["committed" if view.committed_attempts else "rolled back"] += 1
        if view.final in (None, "unknown"):
            row["told unknown"] += 1
        row["by recovery"] += int(view.by_recovery)
        for category in ("divergences", "duplicates", "lost"):
            row[category] += int(bool(view.problems.get(category)))
        row["leftovers"] += len(view.problems.get("leftovers", []))
    crashes_per_phase: Counter[str] = Counter()
    for view in ops.values():
        crashes_per_phase[str(plan.get(view.op, {}).get("phase", "?"))] += (
            len(view.crashes) + view.pauses)
    for phase in set(faults_per_kind) | set(crashes_per_phase):
        summary.setdefault(phase, dict.fromkeys(COLUMNS, 0))["faults"] = (
            faults_per_kind.get(phase, 0) + crashes_per_phase[phase])
    totals = dict.fromkeys(COLUMNS, 0)
    for row in summary.values():
        for k, v in row.items():
            totals[k] += v
    leftovers_unattributed = sum(1 for p in global_problems if p.startswith("prepared"))
    totals["leftovers"] += leftovers_unattributed
    if global_problems:  # phantom rows, messages or decision records
        totals["divergences"] += len(global_problems) - leftovers_unattributed

    kill_outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for point, crash_gid in crash_gids:
        owner = gid_owner.get(crash_gid) if crash_gid else None
        if owner is None:
            kill_outcomes[point]["?"] += 1
        else:
            committed = row_count.get(owner, 0) > 0
            kill_outcomes[point]["committed" if committed else "rolled back"] += 1

    pause_outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for op_id, step, paused in pauses:
        if paused is None:
            outcome = "?"
        else:
            outcome = ("committed" if row_count.get((op_id, paused), 0) > 0
                       else "rolled back")
        pause_outcomes[step][outcome] += 1
        if any(ops[op_id].problems.get(c) for c in ("divergences", "duplicates", "lost")):
            pause_outcomes[step]["problem"] += 1

    # Guarantee 4 of docs/guarantees.md: every error is a coordinator.Error that says the
    # outcome. An attempt told "error" got something else (or an Error the workload does
    # not expect): reported, and the campaign fails, though it is not counted above.
    unexpected = [f"{op_id}: attempt {a.number} raised {a.error} (not a coordinator error "
                  "that tells the outcome)" for op_id, view in sorted(ops.items())
                  for a in view.attempts.values() if a.told == "error"]
    global_problems.extend(unexpected)

    problems = list(global_problems)
    for view in ops.values():
        for texts in view.problems.values():
            problems.extend(texts)

    # -- a second opinion: tests/crash/checker.py on the same data ------------------------
    attempted = [o for o, v in ops.items() if v.attempts]
    verdict = check(dsn=dsn, bootstrap=bootstrap, name=name, table=table,
                    topic=topic, decision_topic=decision_topic, op_ids=attempted,
                    log=WorkerLog([ln for ln in lines if ln.get("op") in plan or
                                   ln.get("op") is None]),
                    messages_per_op=messages_per_op, timeout=timeout)
    answers: Counter[str] = Counter()
    workload: Counter[str] = Counter()
    for op_id, view in ops.items():
        if not view.attempts:
            continue
        spec = plan.get(op_id, {})
        answers.update(a.told or "none" for a in view.attempts.values())
        workload["operations"] += 1
        workload["attempts"] += len(view.attempts)
        workload[f"kind {view.kind}"] += 1
        workload["idempotency key"] += int(bool(spec.get("idem")))
        workload["retried"] += int(len(view.attempts) > 1)
    return Result(ops, summary, totals, problems, verdict.problems, kills, dict(kill_outcomes),
                  answers, workload, dict(pause_outcomes))
