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

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.crash.checker import WorkerLog, check

from .observed import (
    AttemptView,
    Logged,
    OpView,
    Visible,
    load_logs,
    read_logs,
    read_systems,
    settle,
)
from .operations import NOT_APPLIED_TOLD

__all__ = [
    "COLUMNS",
    "Result",
    "check_divergences",
    "check_duplicates",
    "check_leftovers",
    "check_lost",
    "load_logs",
    "run_check",
]

COLUMNS = ("ops", "faults", "committed", "rolled back", "told unknown", "by recovery",
           "divergences", "duplicates", "leftovers", "lost")


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


# -- the invariants: each flags the operations that break it, and returns the problems
# -- no operation can be blamed for


def check_divergences(logged: Logged, visible: Visible, messages_per_op: int,
                      topic: str) -> list[str]:
    """The two systems disagree about an attempt, or it is visible although its client was
    told it changed nothing, or something is visible that no logged attempt made."""
    unowned: list[str] = []
    if visible.unparsable:
        unowned.append(f"{visible.unparsable} unparsable message(s) in {topic}")
    for view in logged.ops.values():
        if view.phantom:
            view.flag("divergences", "visible but no client ever attempted it")
    for op_id, view in logged.ops.items():
        for number in view.numbers:
            a = view.attempts.get(number) or AttemptView(number)
            r, ns = visible.attempt(op_id, number)
            if number not in view.attempts and (r or ns):
                view.flag("divergences", f"attempt {number} is visible but was never logged")
            if r and len(ns) != messages_per_op:
                view.flag("divergences", f"attempt {number}: row committed but "
                          f"{len(ns)}/{messages_per_op} messages visible")
            if not r and ns:
                view.flag("divergences", f"attempt {number}: {len(ns)} message(s) visible "
                          "but no row")
            if a.gid is not None:
                d = visible.decisions.get(a.gid, 0)
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
        if view.final == "rolled_back" and view.committed_attempts:
            view.flag("divergences", "the client was told rolled_back but it is committed")
    for gid in sorted(visible.decisions):
        if gid not in logged.gid_owner:
            unowned.append(f"decision record of {gid}, which no logged attempt made")
    return unowned


def check_duplicates(logged: Logged, visible: Visible) -> None:
    """A row, a message or a decision record visible twice, or an operation committed by
    more than one attempt."""
    for op_id, view in logged.ops.items():
        for number in view.numbers:
            a = view.attempts.get(number) or AttemptView(number)
            r, ns = visible.attempt(op_id, number)
            if r > 1:
                view.flag("duplicates", f"attempt {number}: row committed {r} times")
            for n, count in sorted(ns.items()):
                if count > 1:
                    view.flag("duplicates", f"attempt {number}: message {n} visible {count} "
                              "times")
            d = visible.decisions.get(a.gid, 0) if a.gid is not None else 0
            if d > 1:
                view.flag("duplicates", f"attempt {number}: decision record of {a.gid} "
                          f"visible {d} times")
        if len(view.committed_attempts) > 1:
            view.flag("duplicates", f"committed by attempts {view.committed_attempts}")


def check_leftovers(logged: Logged, visible: Visible) -> list[str]:
    """A prepared transaction of the coordinator's name still in PostgreSQL."""
    unowned: list[str] = []
    for gid in visible.prepared:
        owner = logged.gid_owner.get(gid)
        if owner is None:
            unowned.append(f"prepared transaction {gid} left (no logged attempt)")
        else:
            logged.ops[owner[0]].flag("leftovers", f"attempt {owner[1]}: {gid} still prepared")
    return unowned


def check_lost(logged: Logged, visible: Visible) -> None:
    """The client was told committed and the operation is not committed."""
    for op_id, view in logged.ops.items():
        for number in view.numbers:
            a = view.attempts.get(number) or AttemptView(number)
            if a.told in ("committed", "pending") and not visible.attempt(op_id, number)[0]:
                view.flag("lost", f"attempt {number}: told {a.told!r} but not committed")
        told = [a.told for a in view.attempts.values()]
        if (view.final == "committed" or "already_committed" in told) and not \
                view.committed_attempts:
            view.flag("lost", "the client was told committed but no attempt is committed")


# -- the driver -------------------------------------------------------------------------


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
    exclude_gid: Callable[[str], bool] | None = None,
) -> Result:
    """Check everything; ``plan`` maps op id -> {"phase", "kind", ...}. Decision records
    and prepared transactions of gids ``exclude_gid`` picks are someone else's (the
    pipeline stages', checked by ``tests/faults/pipecheck.py``)."""
    logged = read_logs(lines, plan)
    visible = read_systems(dsn=dsn, bootstrap=bootstrap, name=name, table=table, topic=topic,
                           decision_topic=decision_topic, timeout=timeout)
    if exclude_gid is not None:
        visible.decisions = Counter({g: n for g, n in visible.decisions.items()
                                     if not exclude_gid(g)})
        visible.prepared = [g for g in visible.prepared if not exclude_gid(g)]
    settle(logged, visible, resolved_by_recovery)
    divergent = check_divergences(logged, visible, messages_per_op, topic)
    check_duplicates(logged, visible)
    leftover = check_leftovers(logged, visible)
    check_lost(logged, visible)

    table_rows = tabulate(logged.ops, plan, faults_per_kind)
    totals = dict.fromkeys(COLUMNS, 0)
    for row in table_rows.values():
        for k, v in row.items():
            totals[k] += v
    totals["leftovers"] += len(leftover)
    totals["divergences"] += len(divergent)  # phantom messages or decision records

    # Guarantee 4 of docs/guarantees.md: every error is a coordinator.Error that says the
    # outcome. An attempt told "error" got something else (or an Error the workload does
    # not expect): reported, and the campaign fails, though it is not counted above.
    problems = [*divergent, *leftover, *unexpected_errors(logged)]
    for view in logged.ops.values():
        for category in ("divergences", "duplicates", "leftovers", "lost"):
            problems.extend(view.problems.get(category, []))

    # A second opinion: tests/crash/checker.py on the same data.
    attempted = [o for o, v in logged.ops.items() if v.attempts]
    verdict = check(dsn=dsn, bootstrap=bootstrap, name=name, table=table,
                    topic=topic, decision_topic=decision_topic, op_ids=attempted,
                    log=WorkerLog([ln for ln in lines if ln.get("op") in plan or
                                   ln.get("op") is None]),
                    messages_per_op=messages_per_op, timeout=timeout)
    answers, workload = describe_workload(logged, plan)
    return Result(logged.ops, table_rows, totals, problems, verdict.problems, logged.kills,
                  kill_outcomes(logged, visible), answers, workload,
                  pause_outcomes(logged, visible))


# -- the tables and counts ------------------------------------------------------------------


def tabulate(ops: Mapping[str, OpView], plan: Mapping[str, Mapping[str, Any]],
             faults_per_kind: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """One row per phase: operations, faults, outcomes and operations with problems."""
    summary: dict[str, dict[str, int]] = {}
    for op_id, view in sorted(ops.items()):
        phase = str(plan.get(op_id, {}).get("phase", "?"))
        row = summary.setdefault(phase, dict.fromkeys(COLUMNS, 0))
        if not view.attempts and not view.phantom:
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
    return summary


def kill_outcomes(logged: Logged, visible: Visible) -> dict[str, Counter[str]]:
    """point -> how the attempts killed there ended (committed / rolled back / ?)."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for point, crash_gid in logged.crash_gids:
        owner = logged.gid_owner.get(crash_gid) if crash_gid else None
        if owner is None:
            out[point]["?"] += 1
        else:
            committed = visible.rows.get(owner, 0) > 0
            out[point]["committed" if committed else "rolled back"] += 1
    return dict(out)


def pause_outcomes(logged: Logged, visible: Visible) -> dict[str, Counter[str]]:
    """step -> how the attempts paused there ended, and how many have a problem."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for op_id, step, paused in logged.pauses:
        if paused is None:
            outcome = "?"
        else:
            outcome = ("committed" if visible.rows.get((op_id, paused), 0) > 0
                       else "rolled back")
        out[step][outcome] += 1
        if any(logged.ops[op_id].problems.get(c) for c in ("divergences", "duplicates",
                                                            "lost")):
            out[step]["problem"] += 1
    return dict(out)


def unexpected_errors(logged: Logged) -> list[str]:
    """Attempts told "error": not a coordinator error that tells the outcome."""
    return [f"{op_id}: attempt {a.number} raised {a.error} (not a coordinator error "
            "that tells the outcome)" for op_id, view in sorted(logged.ops.items())
            for a in view.attempts.values() if a.told == "error"]


def describe_workload(logged: Logged, plan: Mapping[str, Mapping[str, Any]]
                      ) -> tuple[Counter[str], Counter[str]]:
    """What the attempts were told, and the operations by kind."""
    answers: Counter[str] = Counter()
    workload: Counter[str] = Counter()
    for op_id, view in logged.ops.items():
        if not view.attempts:
            continue
        spec = plan.get(op_id, {})
        answers.update(a.told or "none" for a in view.attempts.values())
        workload["operations"] += 1
        workload["attempts"] += len(view.attempts)
        workload[f"kind {view.kind}"] += 1
        workload["idempotency key"] += int(bool(spec.get("idem")))
        workload["retried"] += int(len(view.attempts) > 1)
    return answers, workload
